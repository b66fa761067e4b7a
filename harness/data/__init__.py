"""Webdataset shards streamed to every rank: one loader for training and evaluation.

Design (after open_clip's ``data.py``, with the order made deterministic):

* The shard order of an epoch is a pure function of ``(seed, epoch)``: every rerun sees the
  same order, every epoch a different one. Samples, not shards, are dealt to ranks and loader
  workers (:mod:`harness.data.plan`): each rank an equal range of whole batches of the epoch's
  sample sequence, so an epoch is the whole split at any world size and each sample is read
  once. A rank left short (skipped samples) tops up from a second pass over its range instead
  of stopping, so no rank reaches a collective that the others have left (the classic
  multi-node hang).
* A :class:`Position` (batches consumed, raw samples used per worker) lets a checkpoint resume
  mid-epoch with the samples not yet seen, and each sample's augmentation is seeded by its key.
* Evaluation: each validation sample is read exactly once across all ranks and workers, and the
  batch may be short; counts are summed across ranks, so accuracy is exact for any world size.

The submodules, in the order data flows through them:

* :mod:`~harness.data.shards`: which shards a recipe key names, ``_info.json`` (split, sample counts).
* :mod:`~harness.data.plan`: who reads which samples in an epoch; ``python -m harness.data plan``.
* :mod:`~harness.data.tars`: the tar reader (members without :mod:`tarfile`, grouped into samples).
* :mod:`~harness.data.transforms`: what a model needs from an image; the CPU path's crops and
  normalisation.
* :mod:`~harness.data.augment`: timm's per-sample policies (CPU path) and per-batch random
  erasing and Mixup/CutMix (both paths).
* :mod:`~harness.data.gpu_decode`: the GPU path, JPEGs decoded in batches with nvJPEG in the
  training process.
* :mod:`~harness.data.stream`: a worker's batches of an epoch (:class:`ShardStream`, :class:`Position`).
* :mod:`~harness.data.shm_batches`: worker batches in reused shared memory.
* :mod:`~harness.data.loader`: :class:`EpochLoader`, and the checks and loaders a recipe's data
  section gives (:func:`plan_data`, :func:`decode_on`, :func:`build_loaders`).

What the rest of the project uses is imported here (``__all__``); the submodules' other names
are theirs. Every submodule logs as ``harness.data``.
"""
from harness.data.augment import BatchAugment, batch_seed, sample_policy
from harness.data.gpu_decode import DeferredDecode, DeviceDecode, Encoded
from harness.data.loader import DataPlan, EpochLoader, build_loaders, decode_on, plan_data, worker_context
from harness.data.plan import EpochPlan, Span, plan_warnings
from harness.data.shards import INFO_FILE, DataError, Shards, expand_urls, select_shards
from harness.data.stream import Position, ShardStream
from harness.data.tars import TarFormatError, read_samples, tar_members
from harness.data.transforms import (Preprocess, cifar_train_transform, decode_sample, eval_transform, normalize,
                                     pil_to_chw, train_transform)

__all__ = [
    # shards and the epoch's plan
    "DataError", "INFO_FILE", "Shards", "select_shards", "expand_urls", "EpochPlan", "Span", "plan_warnings",
    # reading and streaming
    "TarFormatError", "tar_members", "read_samples", "Position", "ShardStream",
    # image transforms and augmentation (the CPU path), the GPU path
    "Preprocess", "train_transform", "cifar_train_transform", "eval_transform", "decode_sample", "normalize",
    "pil_to_chw", "sample_policy", "BatchAugment", "batch_seed", "DeferredDecode", "DeviceDecode", "Encoded",
    # the loaders, and what a recipe's data section gives
    "EpochLoader", "worker_context", "DataPlan", "plan_data", "decode_on", "build_loaders",
]
