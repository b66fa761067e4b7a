"""The loaders a run trains and evaluates with, and their making from a recipe.

:class:`EpochLoader` is a DataLoader over a :class:`~harness.data.stream.ShardStream` that
tracks the epoch's :class:`~harness.data.stream.Position` as batches reach the trainer, tops a
rank up when skipped samples leave it short (so no rank waits alone in a collective), and
finishes each batch in the training process: normalisation on the CPU path, the batched
decode (:class:`~harness.data.gpu_decode.DeviceDecode`) on the GPU path, then the batch
augmentation. Its workers start from a fork server (:func:`worker_context`).

From a recipe: :func:`plan_data` selects and checks the shards and plans the epoch from the
files alone (``harness/run.py`` calls it before start-up), :func:`decode_on` resolves
``data.decode`` to the CPU or GPU path, and :func:`build_loaders` makes this rank's train and
validation loaders.
"""
from __future__ import annotations

import copy
import itertools
import logging
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from harness.data.augment import BatchAugment, batch_seed, sample_policy
from harness.data.gpu_decode import DeferredDecode, DeviceDecode
from harness.data.plan import EpochPlan, plan_warnings
from harness.data.shards import DataError, Shards, select_shards
from harness.data.stream import Position, ShardStream
from harness.data.transforms import Preprocess, cifar_train_transform, eval_transform, normalize, train_transform

# DataLoader's own "will create N worker processes ... suggested max" is said by every loader and
# ignores the other ranks sharing the cores; harness.resources' start-up warning counts each rank's
# share, once per run, and says what to change
warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)

# the package's one logger: data warnings are printed, and filtered, as "harness.data"
log = logging.getLogger("harness.data")


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
    # harness.data.loader imports every module whose classes a worker unpickles: the stream, the
    # CPU path's transforms and policies, the GPU path's DeferredDecode
    context.set_forkserver_preload(["__main__", "torch", "torchvision", "timm", "harness.data.loader",
                                    "harness.models"])
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
    start-up and hands the answer to :func:`build_loaders` (which plans itself when not given one).
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


def build_loaders(recipe, pre: Preprocess, rank: int, world_size: int, device: torch.device,
                  grad_accum: int = 1, plan: Optional[DataPlan] = None) -> tuple[EpochLoader, EpochLoader]:
    """Train and validation loaders for this rank; the validation loader's ``shards`` checks an evaluation.

    ``plan``: :func:`plan_data`'s answer for this world when the caller has it (``harness/run.py``'s
    preflight), so the shard folders and ``_info.json`` are not read again; None: planned here.
    """
    d = recipe.data
    plan = plan or plan_data(recipe, world_size, device, grad_accum)
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
