"""Check a shard directory end to end before training on it.

    python -m shards.verify data/imagenet [--workers P]

Every shard listed in ``_info.json`` is read in full: each sample must have an image member
that PIL decodes and a ``.cls`` label that is an integer in ``[0, len(classes.txt))``, keys must
be unique in the split, and each shard must hold the number of samples ``_info.json`` gives it.
Listed shards that are missing, ``.tar`` files that are not listed (loaders ignore them) and a
folder holding shards of two splits (the harness refuses it: one folder per split, see
:mod:`shards.layout`) are reported too.

Problems are printed as ``shard:key: problem`` lines (``shard: problem`` for whole-shard ones),
then one summary line; the exit code is 1 if there was any problem, 0 if none, 2 if the
directory cannot be checked at all.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image
from webdataset.tariterators import base_plus_ext

from shards.write import Progress

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what harness.data and timm's reader accept as the image


class VerifyError(Exception):
    """The directory cannot be checked at all (no _info.json, no class list)."""


@dataclass(frozen=True)
class ShardCheck:
    """One listed shard to read: its path, its name for messages and what it should hold."""

    path: str
    name: str
    expected: int
    num_classes: int


@dataclass
class ShardReport:
    name: str
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_sample(key: str, members: dict[str, bytes], num_classes: int) -> list[str]:
    """Problems of one sample (image and label); empty if it is usable for training."""
    problems = []
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        problems.append(f"no image member ({', '.join('.' + e for e in IMAGE_EXTS)}); "
                        f"members: {', '.join('.' + e for e in members) or 'none'}")
    else:
        try:
            with Image.open(io.BytesIO(members[image_ext])) as img:
                img.load()
        except Exception as e:  # PIL raises many types for bad data; any of them means "unusable"
            problems.append(f".{image_ext} does not decode: {type(e).__name__}: {e}")
    if "cls" not in members:
        problems.append("no .cls member (label)")
    else:
        text = members["cls"].decode("ascii", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            problems.append(f".cls {text[:20]!r} is not an integer")
        else:
            if not 0 <= label < num_classes:
                problems.append(f"label {label} outside [0, {num_classes}) (classes.txt has {num_classes} classes)")
    return problems


def _samples(tar: tarfile.TarFile):
    """``(key, {ext: bytes})`` for consecutive members sharing a key, as webdataset groups them."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        base, ext = base_plus_ext(member.name)
        if base is None:  # no extension: not part of any sample; reported as one without image or label
            yield member.name, {}
            continue
        if base != key and key is not None:
            yield key, members
            members = {}
        key = base
        members[ext] = tar.extractfile(member).read()  # raises ReadError when the data is cut off
    if key is not None:
        yield key, members


def check_shard(check: ShardCheck) -> ShardReport:
    """Read one shard in full; every problem becomes a ``shard:key: problem`` line."""
    warnings.simplefilter("ignore")  # PIL's EXIF / decompression-bomb warnings are not shard problems
    report = ShardReport(check.name)
    try:
        with tarfile.open(check.path, mode="r:") as tar:
            for key, members in _samples(tar):
                report.samples += 1
                report.keys.append(key)
                report.problems += [f"{check.name}:{key}: {p}" for p in check_sample(key, members, check.num_classes)]
    except (tarfile.TarError, OSError, EOFError) as e:
        report.problems.append(f"{check.name}: truncated or unreadable tar after {report.samples} samples "
                               f"({type(e).__name__}: {e}); rewrite this shard")
    report.problems += [f"{check.name}:{k}: key appears {n} times in the shard"
                        for k, n in Counter(report.keys).items() if n > 1]
    if report.samples != check.expected:
        report.problems.append(f"{check.name}: {report.samples} samples, _info.json says {check.expected}")
    return report


def load_index(root: Path) -> tuple[dict, int]:
    """``_info.json`` and the number of classes (``classes.txt``, else the info's ``classes``)."""
    info_path = root / "_info.json"
    if not root.is_dir():
        raise VerifyError(f"{root}: not a directory; pass the shard directory (the writer's --out)")
    if not info_path.is_file():
        raise VerifyError(f"{info_path} not found: the writer writes it last, so the shards are incomplete or "
                          f"this is not a shard directory; rerun `python -m shards.write ... --out {root}`")
    try:
        info = json.loads(info_path.read_text())
        splits = info["splits"]
        for entry in splits.values():
            entry["filenames"], entry["shard_lengths"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VerifyError(f"{info_path}: not a timm-style info file ({e!r}); rewrite the shards") from None
    classes_path = root / "classes.txt"
    if classes_path.is_file():
        return info, len(classes_path.read_text().split())
    if isinstance(info.get("classes"), list):
        return info, len(info["classes"])
    raise VerifyError(f"{classes_path} not found and _info.json has no 'classes': labels cannot be range-checked; "
                      f"rewrite the shards")


def listing(root: Path, info: dict, num_classes: int) -> tuple[list[ShardCheck], list[str]]:
    """The listed shards that exist (to read), and problems: listed but missing, present but unlisted,
    two splits in one folder."""
    checks, problems, listed = [], [], set()
    folders: dict[str, list[str]] = {}  # folder -> the splits with shards in it
    for split, entry in info["splits"].items():
        names, lengths = entry["filenames"], entry["shard_lengths"]
        if len(names) != len(lengths):
            problems.append(f"_info.json: split {split}: {len(names)} filenames but {len(lengths)} shard_lengths")
        if entry.get("num_samples") != sum(lengths):
            problems.append(f"_info.json: split {split}: num_samples {entry.get('num_samples')} but shard_lengths "
                            f"sum to {sum(lengths)}")
        for name, length in zip(names, lengths):
            listed.add(os.path.normpath(name))
            splits_here = folders.setdefault(os.path.dirname(os.path.normpath(name)), [])
            splits_here += [] if split in splits_here else [split]
            path = root / name
            if path.is_file():
                checks.append(ShardCheck(str(path), name, int(length), num_classes))
            else:
                problems.append(f"{name}: listed in _info.json (split {split}) but missing")
    for folder, splits in folders.items():
        if len(splits) > 1:
            problems.append(f"{os.path.join(folder, '') or './'}: holds the shards of splits {' and '.join(splits)}; "
                            f"the harness reads one split per folder: move them with `python -m shards.layout {root}`")
    for path in sorted(root.rglob("*.tar")):
        name = os.path.normpath(path.relative_to(root))
        if name not in listed:
            problems.append(f"{name}: .tar file not listed in _info.json (the harness and timm ignore it); delete it "
                            f"or rewrite the shards")
    return checks, problems


def verify(root: Path, workers: int, log=sys.stderr) -> tuple[list[str], int, int]:
    """All problems in ``root``, the number of samples and of shards read."""
    info, num_classes = load_index(root)
    checks, problems = listing(root, info, num_classes)
    split_of = {name: split for split, e in info["splits"].items() for name in e["filenames"]}
    reports: dict[str, ShardReport] = {}
    progress = Progress("verify", len(checks), sum(c.expected for c in checks), log)
    if checks:
        with multiprocessing.Pool(min(workers, len(checks))) as pool:
            for report in pool.imap_unordered(check_shard, checks):
                reports[report.name] = report
                progress.update(report.samples, resumed=False)
    owners: dict[str, dict[str, str]] = {}  # split -> key -> first shard (keys must be unique per split)
    for check in checks:  # listing order, so the output is the same on every run
        report = reports[check.name]
        problems += report.problems
        seen = owners.setdefault(split_of[check.name], {})
        for key in dict.fromkeys(report.keys):
            if key in seen:
                problems.append(f"{check.name}:{key}: key also in {seen[key]} (same split)")
            else:
                seen[key] = check.name
    return problems, sum(r.samples for r in reports.values()), len(checks)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.verify", description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="shard directory (with _info.json and classes.txt)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reader processes (default: all CPUs)")
    args = p.parse_args(argv)
    try:
        problems, samples, shards = verify(args.dir, max(1, args.workers))
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    verdict = f"{len(problems)} problem(s)" if problems else "no problems"
    print(f"{args.dir}: {samples} samples in {shards} shards read: {verdict}")
    sys.stdout.flush()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
