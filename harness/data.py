"""Webdataset shards streamed to every rank: one loader for training and evaluation.

Design (after open_clip's ``data.py``, with the order made deterministic):

* The shard order of an epoch is a pure function of ``(seed, epoch)``: every rerun sees the
  same order, every epoch a different one. Shards are dealt to ranks, then to loader workers.
* Training: every rank yields exactly ``batches_per_epoch`` batches. A worker whose shards run
  dry starts them again in a new order instead of stopping, so no rank ever reaches a
  collective that the others have left (the classic multi-node hang).
* Evaluation: each validation sample is read exactly once across all ranks and workers, and the
  batch may be short; counts are summed across ranks, so accuracy is exact for any world size.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T
from webdataset.tariterators import tarfile_samples

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """Shards the run cannot use as configured. The message is meant for the user."""


def expand_urls(pattern: str) -> list[str]:
    """Shard list from a directory of ``.tar`` files or a brace pattern; local files must exist."""
    if os.path.isdir(pattern):
        urls = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in directory {pattern}")
        return urls
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}; write shards with `python -m shards.digits` "
                                f"(demo) or check the path")
    return urls


def count_samples(urls: Sequence[str], split: str) -> Optional[int]:
    """Sample count from a timm-style ``_info.json`` next to the shards, if there is one."""
    info_path = Path(urls[0]).parent / "_info.json"
    if "://" in urls[0] or not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    entry = info.get("splits", {}).get(split)
    if not entry:
        return None
    names = {os.path.basename(u) for u in urls}
    lengths = dict(zip(entry.get("filenames", []), entry.get("shard_lengths", [])))
    if names <= set(lengths):
        return sum(lengths[n] for n in names)
    return entry.get("num_samples")


@dataclass(frozen=True)
class Preprocess:
    """What a model needs from an image: crop side, eval crop fraction, normalisation."""

    image_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def train_transform(pre: Preprocess, scale: Sequence[float], ratio: Sequence[float], hflip: float) -> T.Compose:
    ops = [T.RandomResizedCrop(pre.image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def eval_transform(pre: Preprocess) -> T.Compose:
    resize = int(math.floor(pre.image_size / pre.crop_pct))
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(pre.image_size), T.ToTensor(),
                      T.Normalize(pre.mean, pre.std)])


def _decode(sample: dict, transform, num_classes: int) -> Optional[tuple[torch.Tensor, int]]:
    """Image tensor and label of one tar sample, or None (logged) when it cannot be used."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    try:
        key = next(k for k in IMAGE_KEYS if k in sample)
        image = Image.open(io.BytesIO(sample[key])).convert("RGB")
        label = int(sample["cls"])
    except (StopIteration, KeyError, ValueError, OSError) as e:
        log.warning("skipping unreadable sample %s: %s", where, e)
        return None
    if not 0 <= label < num_classes:
        log.warning("skipping sample %s: label %d outside [0, %d)", where, label, num_classes)
        return None
    return transform(image), label


def _samples(urls: Sequence[str]) -> Iterator[dict]:
    """Raw tar samples of the given shards in order; a broken shard is logged and ended."""
    def warn(exn: Exception) -> bool:
        log.warning("shard read error (rest of shard skipped): %s", exn)
        return True

    yield from tarfile_samples(({"url": u} for u in urls), handler=warn)


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


class ShardStream(IterableDataset):
    """Batches from the shards this rank and worker own, for one epoch at a time.

    ``set_epoch`` must be called before each iteration; workers are re-created per epoch, so
    they see the new value.
    """

    def __init__(self, urls: Sequence[str], transform, num_classes: int, batch_size: int, *, train: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 batches_per_epoch: Optional[int] = None):
        if train and len(urls) < world_size:
            raise DataError(f"{len(urls)} train shards cannot feed {world_size} ranks; write at least "
                             f"{world_size} shards (one per rank) or use fewer processes")
        self.urls, self.transform, self.num_classes = list(urls), transform, num_classes
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _rank_shards(self, cycle: int) -> list[str]:
        """This rank's shards for the epoch; a rank that runs dry re-reads only its own, reshuffled."""
        urls = list(self.urls)
        if self.train:
            random.Random(hash((self.seed, self.epoch)) & 0xFFFFFFFF).shuffle(urls)
        mine = urls[self.rank::self.world_size]
        if cycle:
            random.Random(hash((self.seed, self.epoch, self.rank, cycle)) & 0xFFFFFFFF).shuffle(mine)
        return mine

    def _my_samples(self, cycle: int) -> Iterator[dict]:
        """This rank's and worker's share: whole shards if there are enough, else every n-th sample."""
        worker, workers = self._worker()
        shards = self._rank_shards(cycle)
        if len(shards) >= workers:
            yield from _samples(shards[worker::workers])
        else:
            for i, sample in enumerate(_samples(shards)):
                if i % workers == worker:
                    yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = self._worker()
        stream_seed = hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF
        torch.manual_seed(stream_seed)  # augmentation randomness: reproducible per (seed, epoch, rank, worker)
        rng = random.Random(stream_seed)
        if self.train:
            # Each worker delivers its share of the rank's batches; the loader interleaves them.
            quota = math.ceil(self.batches_per_epoch / workers) if self.batches_per_epoch else None
            yield from self._batches(self._shuffled(self._endless(), rng), quota)
        else:
            yield from self._batches(self._my_samples(0), None)

    def _endless(self) -> Iterator[dict]:
        for cycle in range(1 << 30):
            if cycle >= 2 and self._decoded == 0:  # whole passes over our shards, nothing usable
                raise DataError(f"rank {self.rank}: no readable training samples in its shards of "
                                f"{len(self.urls)}; check them with the shard verifier")
            yield from self._my_samples(cycle)

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

    _decoded = 0

    def _batches(self, samples: Iterator[dict], quota: Optional[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        items, produced = [], 0
        for sample in samples:
            if quota is not None and produced >= quota:
                return
            item = _decode(sample, self.transform, self.num_classes)
            if item is None:
                continue
            self._decoded += 1
            items.append(item)
            if len(items) == self.batch_size:
                yield _collate(items)
                items, produced = [], produced + 1
        if items and not self.train:
            yield _collate(items)


class EpochLoader:
    """A DataLoader over a :class:`ShardStream` that yields exactly ``len(self)`` batches (train)."""

    def __init__(self, stream: ShardStream, workers: int, pin_memory: bool):
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None, persistent_workers=False)

    def __len__(self) -> int:
        return self.stream.batches_per_epoch or 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.set_epoch(epoch)
        limit = self.stream.batches_per_epoch
        for i, batch in enumerate(self.loader):
            if limit is not None and i >= limit:
                break
            yield batch


def build_loaders(recipe, pre: Preprocess, rank: int, world_size: int, pin_memory: bool) -> tuple[EpochLoader, EpochLoader, int]:
    """Train and validation loaders for this rank, and the train set size they assume."""
    d = recipe.data
    try:
        train_urls, val_urls = expand_urls(d.train), expand_urls(d.val)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    train_samples = d.train_samples or count_samples(train_urls, "train")
    if train_samples is None:
        raise DataError(f"the train set size is unknown: no _info.json next to {train_urls[0]}; "
                         f"set `data.train_samples` in the recipe")
    batches = train_samples // (d.batch_size * world_size)
    if batches == 0:
        raise DataError(f"{train_samples} train samples are fewer than one global batch "
                         f"({d.batch_size} x {world_size} ranks); lower `data.batch_size`")
    seed = recipe.runtime.seed
    train = ShardStream(train_urls, train_transform(pre, d.augment.crop_scale, d.augment.crop_ratio, d.augment.hflip),
                        d.num_classes, d.batch_size, train=True, seed=seed, rank=rank, world_size=world_size,
                        shuffle_buffer=d.shuffle_buffer, batches_per_epoch=batches)
    val = ShardStream(val_urls, eval_transform(pre), d.num_classes, d.batch_size, train=False,
                      rank=rank, world_size=world_size)
    return EpochLoader(train, d.workers, pin_memory), EpochLoader(val, d.workers, pin_memory), train_samples
