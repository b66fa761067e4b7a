"""One rank's and loader worker's batches of an epoch: the stream a DataLoader iterates.

:class:`ShardStream` is the ``IterableDataset`` each loader worker runs: it reads the worker's
share of the epoch (an :class:`~harness.data.plan.EpochPlan`, through the tar reader
:func:`~harness.data.tars.read_samples`), shuffles within a buffer, skips what a resumed epoch
already used, decodes or plans each sample with the transform it was given (CPU path:
:mod:`harness.data.transforms`; GPU path: :class:`~harness.data.gpu_decode.DeferredDecode`) and
batches. A :class:`Position` (batches consumed, raw samples used per worker) is what a
checkpoint records to resume mid-epoch with the samples not yet seen.

It runs in the worker processes, so everything it holds is pickled to them: the transform
must be importable there (see :func:`harness.data.loader.worker_context`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from harness.data.gpu_decode import DeferredDecode
from harness.data.plan import EpochPlan, Span
from harness.data.shards import DataError
from harness.data.shm_batches import PooledBatch
from harness.data.tars import read_samples
from harness.data.transforms import decode_sample


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

    Who reads what is an :class:`harness.data.plan.EpochPlan`: in training the epoch's shard
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
    (:mod:`harness.data.shm_batches`), which reaches the training process as a plain tensor: a batch
    in ordinary memory would be copied into a freshly allocated shared segment to cross over.
    """
    images = [x for x, _ in items]
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    if get_worker_info() is None:
        return torch.stack(images), labels
    batch = PooledBatch((len(images), *images[0].shape), images[0].dtype)
    torch.stack(images, out=batch.tensor)
    return batch, labels
