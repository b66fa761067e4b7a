"""Webdataset shards streamed to every rank: one loader for training and evaluation.

Design (after open_clip's ``data.py``, with the order made deterministic):

* The shard order of an epoch is a pure function of ``(seed, epoch)``: every rerun sees the
  same order, every epoch a different one. Samples, not shards, are dealt to ranks and loader
  workers (:mod:`harness.epoch_plan`): each rank an equal range of whole batches of the epoch's
  sample sequence, so an epoch is the whole split at any world size and each sample is read
  once. A rank left short (skipped samples) tops up from a second pass over its range instead
  of stopping, so no rank reaches a collective that the others have left (the classic
  multi-node hang).
* A :class:`Position` (batches consumed, raw samples used per worker) lets a checkpoint resume
  mid-epoch with the samples not yet seen, and each sample's augmentation is seeded by its key.
* Evaluation: each validation sample is read exactly once across all ranks and workers, and the
  batch may be short; counts are summed across ranks, so accuracy is exact for any world size.

Beside it: :mod:`harness.transforms` (the CPU path's crops and normalisation),
:mod:`harness.gpu_decode` (the GPU path: nvJPEG in the training process),
:mod:`harness.tarstream` (tar parsing) and :mod:`harness.shm_batches` (worker batch buffers).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import itertools
import json
import logging
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from harness.augment import BatchAugment, batch_seed, sample_policy
from harness.epoch_plan import EpochPlan, Span
from harness.gpu_decode import DeferredDecode, DeviceDecode, Encoded  # noqa: F401 (Encoded: re-exported)
from harness.shm_batches import PooledBatch
from harness.tarstream import META_MEMBER, TarFormatError, tar_members
# Preprocess and the transforms are re-exported: harness.data is where users and tools import them from
from harness.transforms import (Preprocess, cifar_train_transform, decode_sample, eval_transform,  # noqa: F401
                                normalize, pil_to_chw, train_transform)

log = logging.getLogger(__name__)


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


def read_samples(spans: Sequence[str | Span]) -> Iterator[dict]:
    """Raw tar samples of the given shards (or :class:`Span` pieces of them) in order; a broken shard is logged and ended.

    webdataset's ``tarfile_samples`` with its ``tarfile`` parsing swapped for the leaner
    :func:`harness.tarstream.tar_members` (a fifth of the cost per sample); the rest is
    webdataset's: shards opened with ``gopen`` (local, ``pipe:``, HTTP), ``__*__`` meta members
    skipped, members grouped into samples by ``group_by_keys`` (``__key__``, ``__url__``,
    lower-cased extensions), a shard that cannot be opened or read to its end logged as a
    warning with the samples before the break kept, and never a sample spanning two shards.
    A span that starts inside a shard skips to its first sample without reading the ones before
    (a seek per member on a local shard) and stops after its last.
    """
    def warn(exn: Exception) -> bool:
        log.warning("shard read error (rest of shard skipped): %s", exn)
        return True

    for span in spans:
        yield from group_by_keys(_tar_files(Span(span) if isinstance(span, str) else span, warn), handler=warn)


def _tar_files(span: Span, warn) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` per tar member of the span's samples, then ``{}`` (end of shard)."""
    url = span.url
    try:
        stream = gopen(url)
    except (OSError, ValueError) as e:
        warn(e)
        return
    try:
        for name, data in tar_members(stream, url, skip_samples=span.start, max_samples=span.count):
            if not META_MEMBER.match(name):
                yield {"fname": name, "data": data, "__url__": url}
    except (TarFormatError, OSError) as e:
        warn(e)
    finally:
        with contextlib.suppress(OSError):  # a pipe's exit status was checked at each read
            stream.close()
    yield {}


@dataclass
class Position:
    """Where an epoch stands: batches consumed, and per worker the raw samples they used.

    The granularity of a resume is one batch: batches the loader had prefetched but the
    trainer had not consumed are produced again, none consumed is produced twice.
    """

    epoch: int = 0
    batches: int = 0
    emitted: dict[int, int] = field(default_factory=dict)  # logical worker -> raw samples used
    skipped: int = 0  # undecodable or mislabelled samples met so far this epoch


class ShardStream(IterableDataset):
    """Batches from this rank's and worker's share of the samples, for one epoch at a time.

    Who reads what is an :class:`harness.epoch_plan.EpochPlan`: in training the epoch's shard
    order is a pure function of (seed, epoch), each rank reads an equal range of whole batches
    of the samples in that order and each worker whole batches of its rank's range (ranges start
    and end inside shards), a shuffle buffer mixes samples within a worker, and each worker
    yields only full batches. The epoch uses every sample once but the remainder of the last
    global batch, and every rank's batch count (:meth:`batches_in_epoch`) is the same, known
    from the shard lengths. Evaluation: every sample exactly once across ranks and workers.
    """

    def __init__(self, urls: Sequence[str], transform, num_classes: int, batch_size: int, *, train: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 lengths: Optional[dict[str, int]] = None, workers: int = 1, multiple_of: int = 1):
        self.urls, self.transform, self.num_classes = list(urls), transform, num_classes
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.lengths = dict(lengths or {})
        if train and len(self.lengths) < len(self.urls):
            missing = next(u for u in self.urls if u not in self.lengths)
            raise DataError(f"training needs the sample count of every shard: none is known for {missing}; write "
                            f"shards with `python -m shards.write` (its _info.json lists them) or set "
                            f"`data.train_samples`")
        self.workers = max(workers, 1)
        self.multiple_of = max(multiple_of, 1)  # batches per optimizer step: a rank's range is whole steps
        self.epoch, self.resume_from = 0, Position()

    def start(self, epoch: int, position: Optional[Position] = None) -> None:
        """Set the epoch (and a mid-epoch position to continue from) before iterating."""
        self.epoch = epoch
        self.resume_from = position if position and position.epoch == epoch else Position(epoch=epoch)

    # --- who reads what

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's deal of samples to ranks and workers (a shuffle and a prefix sum over the shards)."""
        key = (epoch, self.world_size, self.workers, self.multiple_of)
        if getattr(self, "_plan_key", None) != key:
            self._plan = EpochPlan(self.urls, self.lengths, world=self.world_size, workers=self.workers,
                                   batch_size=self.batch_size, train=self.train, seed=self.seed, epoch=epoch,
                                   multiple_of=self.multiple_of)
            self._plan_key = key
        return self._plan

    def _spans(self, worker: int, cycle: int = 0) -> list[Span]:
        """A logical worker's spans; ``cycle`` > 0: the rank's whole range, reshuffled (the top-up reserve)."""
        plan = self.plan(self.epoch)
        if not cycle:
            return plan.worker_spans(self.rank, worker)
        spans = plan.rank_spans(self.rank)
        random.Random(hash((self.seed, self.epoch, self.rank, cycle)) & 0xFFFFFFFF).shuffle(spans)
        return spans

    def batches_in_epoch(self, epoch: int) -> int:
        """Full batches every rank delivers this epoch: the same for all, a multiple of ``multiple_of``."""
        return self.plan(epoch).batches_per_rank

    # --- the stream

    def _worker(self) -> int:
        """This process's logical worker id (rotated so a resume keeps the round-robin order)."""
        info = get_worker_info()
        physical = info.id if info else 0
        return (physical + self.resume_from.batches) % self.workers

    def _raw(self, worker: int, cycle: int) -> Iterator[dict]:
        yield from read_samples(self._spans(worker, cycle))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        worker = self._worker()
        yield from self._worker_batches(worker, self._raw(worker, 0))

    def extra_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        """A second pass over this rank's shards, reshuffled: the reserve when samples were skipped."""
        for cycle in range(1, 1 << 30):
            produced = False
            for batch in self._worker_batches(-1, self._raw(0, cycle)):
                produced = True
                yield batch
            if not produced:
                raise DataError(f"rank {self.rank}: no readable training samples in its shards; "
                                f"check them with `python -m shards.verify`")

    def _worker_batches(self, worker: int, raw: Iterator[dict]):
        """Shuffle, skip what a resumed epoch already used, decode, batch (full batches only in training)."""
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF)
        samples = self._shuffled(raw, rng) if self.train else raw
        emitted = skipped = 0
        for _ in range(self.resume_from.emitted.get(worker, 0)):  # already trained on: not decoded
            if next(samples, None) is None:
                return
            emitted += 1
        items: list[tuple[torch.Tensor, int]] = []
        for sample in samples:
            emitted += 1
            seed = hash((self.seed, self.epoch)) & 0xFFFFFFFF
            item = (self.transform.plan(sample, self.num_classes, seed) if isinstance(self.transform, DeferredDecode)
                    else decode_sample(sample, self.transform, self.num_classes, seed))
            if item is None:
                skipped += 1
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield (*self._batch(items), (worker, emitted, skipped))
                items, skipped = [], 0
        if items and not self.train:
            yield (*self._batch(items), (worker, emitted, skipped))

    def _batch(self, items: list[tuple]) -> tuple:
        """(images, labels): uint8 images (CPU path), or an :class:`Encoded` batch (GPU path)."""
        return self.transform.collate(items) if isinstance(self.transform, DeferredDecode) else _collate(items)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor | PooledBatch, torch.Tensor]:
    """(images, labels) of a batch: the images in one uint8 tensor, the labels as int64.

    In a loader worker the images are written straight into a reused shared-memory buffer
    (:mod:`harness.shm_batches`), which reaches the training process as a plain tensor: a batch
    in ordinary memory would be copied into a freshly allocated shared segment to cross over.
    """
    images = [x for x, _ in items]
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    if get_worker_info() is None:
        return torch.stack(images), labels
    batch = PooledBatch((len(images), *images[0].shape), images[0].dtype)
    torch.stack(images, out=batch.tensor)
    return batch, labels


def worker_context():
    """Loader workers start from a fork server, never by forking the training process.

    Workers are started anew each epoch (the stream's epoch and resume position travel with
    them), by then in a process whose communication library runs threads of its own (gloo,
    NCCL): a fork copies any lock such a thread holds, held forever in the child, the
    multi-node hang at an epoch boundary that pytorch/pytorch#87995 and others report. The fork
    server is a clean process, started once per training process (2-3 s here), that imports
    torch, timm and the loader once and forks the workers: after the first, an epoch's workers
    start as fast as forked ones (55-70 ms to the first batch, 2 workers, digits shards).
    As with any non-fork start, a script that builds loaders itself needs the
    ``if __name__ == "__main__":`` guard (``harness/run.py`` has it).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", "torchvision", "timm", "harness.data", "harness.models"])
    return context


class EpochLoader:
    """A DataLoader over a :class:`ShardStream` that tracks its :class:`Position`.

    In training it yields exactly ``batches_in_epoch(epoch)`` batches on every rank; should
    skipped samples leave a rank short, it tops up from a reshuffled second pass rather than
    end early and leave the other ranks waiting in a collective.
    """

    def __init__(self, stream: ShardStream, workers: int, pin_memory: bool, pre: Preprocess,
                 device: torch.device | str = "cpu", multiple_of: int = 1, shards: Optional[Shards] = None,
                 augment: Optional[BatchAugment] = None):
        self.stream, self.multiple_of, self.pre, self.device = stream, multiple_of, pre, torch.device(device)
        # random erasing and Mixup/CutMix (training only): on the batch as it arrives, either data path
        self.augment = augment
        self.shards = shards or Shards(",".join(stream.urls), list(stream.urls))  # what it reads, for checks
        stream.workers, stream.multiple_of = max(workers, 1), max(multiple_of, 1)
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None, persistent_workers=False,
                                 multiprocessing_context=worker_context() if workers else None)
        self.position = Position()
        # the GPU path: workers hand over compressed batches, decoded here on `device`
        deferred = isinstance(stream.transform, DeferredDecode)
        self.decode = DeviceDecode(pre, self.device, stream.train, stream.transform.kind) if deferred else None

    def batches_in_epoch(self, epoch: int) -> Optional[int]:
        if not self.stream.train:
            return None
        return self.stream.batches_in_epoch(epoch)  # whole optimizer steps: the plan deals them

    def epoch(self, epoch: int, resume: Optional[Position] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.start(epoch, resume)
        self.position = copy.deepcopy(self.stream.resume_from)
        limit = self.batches_in_epoch(epoch)
        batches = iter(self.loader)
        if limit is not None:
            # exactly the batches still due: the GPU path's look-ahead must not reach past them
            batches = itertools.islice(itertools.chain(batches, self._top_up()), max(limit - self.position.batches, 0))
        # the position advances as a batch is handed to the trainer, not when it is prefetched
        for x, y, (worker, emitted, skipped) in self._on_device(batches):
            if self.augment is not None:  # seeded by the batch's place in the run: a resume replays it
                x, y = self.augment(x, y, batch_seed(self.stream.seed, epoch, self.position.batches, self.stream.rank))
            self.position.batches += 1
            if worker >= 0:
                self.position.emitted[worker] = emitted
            self.position.skipped += skipped
            yield x, y

    def _on_device(self, batches: Iterator[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        if self.decode is not None:
            yield from self.decode(batches)
            return
        for x, y, book in batches:  # the CPU path: workers decoded and cropped; scale and normalise here
            yield normalize(x.to(self.device, non_blocking=True), self.pre), y.to(self.device, non_blocking=True), book

    def _top_up(self):
        log.warning("rank %d ran short of samples this epoch (skipped samples?); topping up from a second "
                    "pass over its shards", self.stream.rank)
        yield from self.stream.extra_batches()


def decode_on(setting: str, device: torch.device, augment: str = "rrc", pixels: bool = False) -> str:
    """`data.decode` resolved for this process's device and `data.augment.kind`: "cpu" or "gpu".

    ``auto`` is the CPU path for the ``cifar`` augmentation: its small images (CIFAR's 32 px
    PNGs) decode in microseconds in the workers, so there is nothing to move to the GPU; and
    with per-sample PIL policies (``pixels``: auto-augment, colour jitter), which need the
    decoded image in a worker (recipe validation refuses them with an explicit "gpu"). An
    explicit "gpu" without CUDA is an error rather than a quiet fallback: a run (or a
    benchmark) asked for one data path and must not measure the other.
    """
    if setting == "auto":
        return "gpu" if device.type == "cuda" and augment != "cifar" and not pixels else "cpu"
    if setting == "gpu" and device.type != "cuda":
        raise DataError(f"`data.decode: gpu` decodes with nvJPEG on a CUDA device, but this process runs on "
                        f"{device.type}; set `data.decode` to `auto` or `cpu`")
    return setting


@dataclass(frozen=True)
class DataPlan:
    """What a run reads, checked from the files alone (before any process group or model exists)."""

    train: Shards
    val: Shards
    lengths: dict[str, int]  # samples per train shard: _info.json's, else `data.train_samples` spread evenly
    decode: str  # "cpu" or "gpu"
    epoch: EpochPlan  # epoch 0's deal of the train samples to ranks and workers (every epoch's counts alike)


def plan_data(recipe, world_size: int, device: torch.device, grad_accum: int = 1) -> DataPlan:
    """Select and check the recipe's shards for a world of ``world_size``; raises :class:`DataError`.

    Everything here comes from paths and ``_info.json``, so ``harness/run.py`` calls it before
    start-up, and :func:`build_loaders` again (the same answer) to build the streams.
    """
    d = recipe.data
    train, val = select_shards(d.train, "data.train"), select_shards(d.val, "data.val")
    shared = sorted(set(map(os.path.realpath, train.urls)) & set(map(os.path.realpath, val.urls)))
    if shared:
        raise DataError(f"`data.train` and `data.val` share {len(shared)} shard(s) (e.g. {shared[0]}): the validation "
                        f"top-1 would be measured on training images; give each its own split's folder")
    lengths = train.lengths
    if len(lengths) < len(train.urls):
        if not d.train_samples:
            raise DataError(f"the train set size is unknown: no _info.json lists "
                            f"{next(u for u in train.urls if u not in lengths)}; write "
                            f"shards with `python -m shards.write` (which lists them) or set `data.train_samples`")
        lengths = {u: d.train_samples // len(train.urls) for u in train.urls}  # an estimate; see EpochLoader
    # a stream without a transform reads nothing: it only plans the epoch to count its batches
    probe = ShardStream(train.urls, None, d.num_classes, d.batch_size, train=True, world_size=world_size,
                        lengths=lengths, workers=max(d.workers, 1), multiple_of=grad_accum)
    if probe.batches_in_epoch(0) == 0:
        raise DataError(f"{sum(lengths.values())} train samples give no full optimizer step on {world_size} rank(s) "
                        f"({world_size} x {d.batch_size} x {grad_accum} = {world_size * d.batch_size * grad_accum} "
                        f"samples); lower `data.batch_size` or `runtime.grad_accum`, or use fewer processes")
    return DataPlan(train, val, lengths, decode_on(d.decode, device, d.augment.kind, bool(d.augment.per_sample_pixels)),
                    probe.plan(0))


UNUSED_WARN = 0.01  # a larger share of the split left out of every epoch is worth a line at start-up


def plan_warnings(plan: EpochPlan) -> list[str]:
    """What a training plan costs that a user can fix, one line each (empty when nothing does)."""
    notes = []
    unused = plan.total - plan.samples_per_epoch
    if unused > UNUSED_WARN * plan.total:
        step = plan.world * plan.batch_size * plan.multiple_of
        notes.append(f"each epoch leaves {unused} of the {plan.total} train samples unused "
                     f"({100 * unused / plan.total:.1f}%): the split is {plan.total / step:.2f} global batches of "
                     f"{step}; lower `data.batch_size` (or `runtime.grad_accum`) or use fewer processes")
    if plan.batches_per_rank < plan.workers:
        notes.append(f"each rank has {plan.batches_per_rank} batch(es) an epoch for {plan.workers} loader workers: "
                     f"{plan.workers - plan.batches_per_rank} worker(s) per rank start and read nothing; set "
                     f"`data.workers` to {max(plan.batches_per_rank, 1)} or fewer")
    return notes


def build_loaders(recipe, pre: Preprocess, rank: int, world_size: int, device: torch.device,
                  grad_accum: int = 1) -> tuple[EpochLoader, EpochLoader]:
    """Train and validation loaders for this rank; the validation loader's ``shards`` checks an evaluation."""
    d = recipe.data
    plan = plan_data(recipe, world_size, device, grad_accum)
    if rank == 0:
        for shards in (plan.train, plan.val):
            if shards.unlisted:
                log.warning("%s: %d .tar file(s) there are not listed in %s and are not read (e.g. %s); "
                            "`python -m shards.verify` lists them", shards.spec, len(shards.unlisted), shards.info,
                            shards.unlisted[0])
        for note in plan_warnings(plan.epoch):
            log.warning("data.train: %s", note)
    seed, a = recipe.runtime.seed, d.augment
    crop = (a.crop_scale, a.crop_ratio, a.hflip)
    if plan.decode == "gpu":
        train_tf, val_tf = DeferredDecode(pre, crop, a.kind, a.padding), DeferredDecode(pre, kind=a.kind)
    else:
        policy = sample_policy(pre.image_size, pre.mean, a.auto_augment, a.color_jitter)
        train_tf = (cifar_train_transform(pre, a.padding, a.hflip, policy) if a.kind == "cifar"
                    else train_transform(pre, *crop, policy))
        val_tf = eval_transform(pre)
    train = ShardStream(plan.train.urls, train_tf, d.num_classes, d.batch_size, train=True, seed=seed, rank=rank,
                        world_size=world_size, shuffle_buffer=d.shuffle_buffer, lengths=plan.lengths)
    val = ShardStream(plan.val.urls, val_tf, d.num_classes, d.batch_size, train=False,
                      rank=rank, world_size=world_size, lengths=plan.val.lengths)
    pin_memory = device.type == "cuda"
    augment = BatchAugment(a, d.num_classes, device) if BatchAugment.wanted(a) else None
    train_loader = EpochLoader(train, d.workers, pin_memory, pre, device, multiple_of=grad_accum, augment=augment)
    return train_loader, EpochLoader(val, d.workers, pin_memory, pre, device, shards=plan.val)


if __name__ == "__main__":  # `python -m harness.data plan ...`: see harness.epoch_plan.main
    import sys

    from harness.epoch_plan import main as plan_main

    if sys.argv[1:2] != ["plan"]:
        sys.exit("usage: python -m harness.data plan [RECIPE | --samples N --shard-size S | --shard-lengths F] "
                 "[--world N ...] [--workers N ...] [--batch N ...] [--json]")
    sys.exit(plan_main(sys.argv[2:]))
