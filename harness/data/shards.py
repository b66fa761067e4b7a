"""Which shards a recipe key names, and what the dataset's ``_info.json`` says about them.

A recipe gives each split as a folder, a shard file or a brace pattern; :func:`select_shards`
turns that into the URLs to read, checked against the ``_info.json`` index the shard writers
keep (timm's format: every shard listed under its split with its sample count). The sample
counts are what lets the epoch be planned before any shard is read (:mod:`harness.data.plan`),
and the split's size what lets an evaluation prove it saw the whole split
(:meth:`Shards.check_evaluated`). Shards of two splits given as one, listed shards that are
missing and the older flat layout are refused here with a message meant for the user.

Paths and JSON only (no torch): the recipe check and ``python -m harness.data plan`` use it.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import braceexpand


class DataError(ValueError):
    """Shards the run cannot use as configured. The message is meant for the user."""


INFO_FILE = "_info.json"  # timm's index of a shard directory (shards/layout.py writes it)


@dataclass(frozen=True)
class Shards:
    """The shards a recipe key names, and what the dataset's ``_info.json`` says about them.

    Writers put each split in a folder of its own (``OUT/train/``, ``OUT/val/``) and list every
    shard in ``OUT/_info.json`` under its split, with its sample count; a folder's shards are
    the ones listed there, not every ``.tar`` in it. Shards no ``_info.json`` lists (remote
    URLs, foreign shards) are read as given, sizes unknown.
    """

    spec: str  # as the recipe gives it: a folder, a file or a brace pattern
    urls: list[str]
    split: Optional[str] = None  # the split _info.json lists them under; None: not listed
    info: Optional[str] = None  # that _info.json
    lengths: dict[str, int] = field(default_factory=dict)  # samples per listed shard
    split_samples: Optional[int] = None  # the split's num_samples when every shard of it is given
    unlisted: tuple[str, ...] = ()  # .tar files in a given folder that _info.json does not list: not read

    def check_evaluated(self, samples: int) -> None:
        """Refuse an evaluation that did not see exactly the whole split it was given.

        A top-1 over part of a split is not that split's top-1 (nor comparable with a paper's),
        so a sample that did not decode, or shards shorter or longer than ``_info.json`` says,
        stop the run instead of quietly changing what the number means.
        """
        if self.split_samples is None or samples == self.split_samples:
            return
        root = os.path.dirname(self.info or self.spec)
        short = samples < self.split_samples
        cause = ("samples that do not decode or whose label is out of range are skipped, each logged above with "
                 "its shard and key" if short else "the shards hold more samples than _info.json lists")
        raise DataError(f"the evaluation on {self.spec} saw {samples} samples, but {self.info} gives split "
                        f"{self.split} {self.split_samples} ({abs(samples - self.split_samples)} "
                        f"{'missing' if short else 'too many'}): {cause}. A top-1 over part of a split is not its "
                        f"top-1; find the problems with `python -m shards.verify {root}` and rewrite those shards")


@dataclass(frozen=True)
class _Index:
    """One ``_info.json``: where each listed shard is, its split and sample count."""

    path: str
    shards: dict[str, tuple[str, int]]  # normalised shard path -> (split, samples), in listing order
    num_samples: dict[str, int]  # split -> num_samples

    def split_files(self, split: str) -> list[str]:
        return [p for p, (s, _) in self.shards.items() if s == split]


def _read_index(folder: str) -> Optional[_Index]:
    """``folder/_info.json`` as an :class:`_Index`; None if there is none or it is not timm-style."""
    path = os.path.join(folder, INFO_FILE)
    try:
        with open(path) as f:
            splits = json.load(f)["splits"]
        shards, totals = {}, {}
        for split, entry in splits.items():
            for name, n in zip(entry["filenames"], entry["shard_lengths"]):
                shards[os.path.normpath(os.path.join(folder, name))] = (split, int(n))
            totals[split] = int(entry.get("num_samples", sum(entry["shard_lengths"])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return _Index(path, shards, totals)


def _indexes_near(folder: str) -> list[_Index]:
    """The ``_info.json`` files that can list a folder's shards: its own, then its parent's."""
    folder = os.path.normpath(folder)
    return [i for i in (_read_index(folder), _read_index(os.path.dirname(folder))) if i is not None]


def _flat_layout_hint(folder: str) -> str:
    """Advice for a path that is missing because its dataset still has the older, flat layout."""
    for index in _indexes_near(folder):
        root = os.path.dirname(index.path)
        if any(os.path.dirname(p) == root for p in index.shards):
            return (f"; {root} holds its shards in the older layout (every split side by side in one folder): move "
                    f"them into per-split folders with `python -m shards.layout {root}` (renames only)")
    return ""


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _index_listing(folder: str) -> Optional[_Index]:
    """The ``_info.json`` (the folder's own or its parent's) that lists shards in ``folder``, if any."""
    return next((i for i in _indexes_near(folder) if any(os.path.dirname(p) == folder for p in i.shards)), None)


def _described(key: str, spec: str, urls: list[str], unlisted: tuple[str, ...] = ()) -> Shards:
    """``urls`` with what their ``_info.json`` says: split, lengths, and the split's size if all of it is given.

    Shards of two splits (or of two datasets) given as one are refused, naming both.
    """
    indexes: dict[str, Optional[_Index]] = {}  # folder -> the index listing its shards, each read once
    by_split: dict[tuple[str, str], list[str]] = {}  # (index path, split) -> its URLs among these
    lengths: dict[str, int] = {}
    for url in filter(_is_local, urls):
        folder = os.path.dirname(os.path.normpath(url))
        index = indexes[folder] if folder in indexes else indexes.setdefault(folder, _index_listing(folder))
        entry = index.shards.get(os.path.normpath(url)) if index else None
        if entry:
            by_split.setdefault((index.path, entry[0]), []).append(url)
            lengths[url] = entry[1]
    if len(by_split) > 1:
        parts = [f"{split} ({len(u)} shard(s), e.g. {u[0]}, listed in {info})" for (info, split), u in by_split.items()]
        raise DataError(f"{key}{spec} names the shards of {len(parts)} splits: {' and '.join(parts)}; give one "
                        f"split's shards (its folder, e.g. {os.path.dirname(next(iter(by_split.values()))[0])})")
    if not by_split:
        return Shards(spec, urls, unlisted=unlisted)
    (info, split), listed = next(iter(by_split.items()))
    index = next(i for i in indexes.values() if i is not None and i.path == info)
    whole = len(listed) == len(urls) and {os.path.normpath(u) for u in urls} == set(index.split_files(split))
    return Shards(spec, urls, split, info, lengths, index.num_samples[split] if whole else None, unlisted)


def _folder_shards(key: str, folder: str) -> Shards:
    """A folder's shards: those ``_info.json`` lists in it, else (no index lists any) every .tar there."""
    folder = os.path.normpath(folder)
    present = sorted(glob.glob(os.path.join(folder, "*.tar")))
    index = _index_listing(folder)
    if index is not None:
        listed = [p for p in index.shards if os.path.dirname(p) == folder]
        missing = [p for p in listed if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{key}{folder}: {index.path} lists {len(listed)} shards here but {len(missing)} are "
                            f"missing (e.g. {missing[0]}); rerun the writer that made them (it resumes)")
        return _described(key, folder, listed, tuple(sorted(set(present) - set(listed))))
    own = _read_index(folder)
    if own is not None and own.shards:  # the dataset's own folder: its splits are in folders below
        folders: dict[str, str] = {}
        for path, (split, _) in own.shards.items():
            folders.setdefault(split, os.path.dirname(path))
        raise DataError(f"{key}{folder} is a dataset folder holding {len(folders)} split(s): "
                        f"{', '.join(f'{s} in {f}' for s, f in folders.items())}; give one split's folder "
                        f"(e.g. {next(iter(folders.values()))})")
    if not present:
        raise DataError(f"{key}no .tar shards in folder {folder}")
    return Shards(folder, present)


def select_shards(spec: str, key: str = "") -> Shards:
    """The shards ``spec`` names: a split's folder, a shard file, or a brace pattern ('d/train-{000000..000099}.tar').

    Local files must exist; shards of two splits given as one are refused. ``key`` (the recipe
    key, e.g. "data.val") starts every :class:`DataError` message.
    """
    key = f"`{key}`: " if key else ""
    if os.path.isdir(spec):
        return _folder_shards(key, spec)
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        hint = _flat_layout_hint(os.path.dirname(os.path.normpath(missing[0]))) or \
            "; write shards with `python -m shards.digits` (demo) or check the path"
        raise DataError(f"{key}shard not found: {missing[0]}{more}{hint}")
    return _described(key, spec, urls)


def expand_urls(pattern: str) -> list[str]:
    """The shard URLs of a split's folder, a shard file or a brace pattern (see :func:`select_shards`)."""
    return select_shards(pattern).urls
