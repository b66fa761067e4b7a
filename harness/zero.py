"""DeepSpeed's ZeRO engine (stages 1-3) as the harness builds it: its configuration and the patches.

``harness.engine`` decides which engine a run gets; this module holds everything that depends on
DeepSpeed's own code: the configuration that adds no per-step work, and the two patches that
reach into DeepSpeed 0.19's ZeRO optimizer (one shared fp32 copy of the weight partition, no
per-step relink). Those patches read private attributes, which is why the DeepSpeed version is
pinned to the ones the tests ran on.
"""
from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.distributed import Runtime

# The DeepSpeed versions the patches below were tested on (tests/test_engine.py passed under each).
# pyproject.toml allows exactly these and constraints.txt installs one of them; adding a version
# here means running the tests under it first.
SUPPORTED_DEEPSPEED = ("0.19.8",)


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is not one the harness's patches were tested on."""


def check_version() -> None:
    """Refuse a DeepSpeed version the patches were not tested on, before anything starts.

    ``_share_master_partitions`` and ``_skip_per_step_relink`` read and replace private
    attributes of DeepSpeed's ZeRO optimizer. Under another version they may find nothing to
    patch (more memory, slower steps) or patch something that now means another thing (a run
    that trains differently without a word), so an untested version stops the run instead.
    Reads the package metadata only: DeepSpeed is not imported.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("deepspeed")
    except PackageNotFoundError:
        installed = None
    if installed not in SUPPORTED_DEEPSPEED:
        raise DeepSpeedVersionError(
            f"DeepSpeed {installed or '(not installed)'} is installed, but this harness is tested only with DeepSpeed "
            f"{', '.join(SUPPORTED_DEEPSPEED)} (harness/zero.py patches its ZeRO optimizer's internals, which another "
            f"version can change). Install a tested one: `pip install -c constraints.txt "
            f"deepspeed=={SUPPORTED_DEEPSPEED[-1]}` (or `make install`, which uses constraints.txt)")


def initialize(model: nn.Module, optimizer, rt: Runtime, micro_batch: int, grad_accum: int,
               grad_clip: Optional[float]):
    """DeepSpeed's engine over ``model`` for ZeRO stages 1-3, with the harness's patches applied."""
    init_distributed("nccl" if rt.device.type == "cuda" else "gloo",
                     **({"timeout": timedelta(seconds=rt.collective_timeout)} if rt.collective_timeout else {}))
    import deepspeed

    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    config = deepspeed_config(rt, micro_batch, grad_accum, grad_clip, trainable)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _share_master_partitions(engine.optimizer)
    _skip_per_step_relink(engine.optimizer)
    check_patches(engine.optimizer, rt.zero_stage, deepspeed.__version__)
    return engine


class DeepSpeedPatchError(DeepSpeedVersionError):
    """A patch of DeepSpeed's ZeRO optimizer found nothing to patch: its internals differ from the tested ones."""


def check_patches(zero, stage: int, version: str) -> None:
    """Stop before training unless both patches took, naming the DeepSpeed ``version``.

    Each patch returns quietly when what it looks for is absent, so a DeepSpeed whose internals
    moved would otherwise train with a second fp32 copy and a per-step relink, or with
    weights the optimizer no longer steps, and no message. Every rank checks its own optimizer
    and all meet the same internals, so all stop alike.
    """
    problems = []
    pairs = _master_pairs(zero)
    if pairs is None:
        problems.append("its ZeRO optimizer has neither `fp32_partitioned_groups_flat` (stage 3) nor "
                        "`single_partition_of_fp32_groups` (stages 1-2), so the fp32 master partitions were not shared")
    else:
        pairs = list(pairs)
        separate = sum(1 for master, partition in pairs
                       if partition is None or master.data_ptr() != partition.data_ptr())
        if not pairs or separate:
            problems.append(f"{separate if pairs else 'no'} of its {len(pairs)} fp32 master partition(s) "
                            f"{'still hold a separate copy of' if pairs else 'were found beside'} the weights' partitions")
    if stage in (1, 2) and getattr(zero.step, "__name__", "") != "step_without_relink":
        problems.append("its stage-1/2 optimizer has no `_update_model_bit16_weights`, so the per-step relink was not skipped")
    if problems:
        error = DeepSpeedPatchError(
            f"DeepSpeed {version}: harness/zero.py's patches of the ZeRO optimizer did not take ({'; '.join(problems)}). "
            f"They were tested with DeepSpeed {', '.join(SUPPORTED_DEEPSPEED)} only; install one: `pip install -c "
            f"constraints.txt deepspeed=={SUPPORTED_DEEPSPEED[-1]}`, or run with `runtime.zero_stage: 0`")
        error.all_ranks = True  # every rank meets the same DeepSpeed: said once
        raise error


def _skip_per_step_relink(zero) -> None:
    """Stages 1-2: stop DeepSpeed re-pointing every weight at the flat buffer after each step.

    After each step DeepSpeed 0.19 sets ``param.data`` of every weight, twice, to the view of
    the flat buffer it already is (``stage_1_and_2.py``: "TODO: we probably don't need this?
    just to be safe"): about 6 host operations per parameter per step (620 of the 2,700 more
    than a plain loop's, test_resnet -> test_resnet), which on a GPU is host time the step
    can wait on. The buffer is only replaced when a checkpoint is loaded, and the load paths
    re-point the weights themselves, so only the call inside ``step`` is dropped.
    """
    if not hasattr(zero, "_update_model_bit16_weights") or not hasattr(zero, "single_partition_of_fp32_groups"):
        return
    relink, step = zero._update_model_bit16_weights, zero.step

    def step_without_relink(*args, **kwargs):
        zero._update_model_bit16_weights = lambda group_index: None
        try:
            return step(*args, **kwargs)
        finally:
            zero._update_model_bit16_weights = relink

    zero.step = step_without_relink


def _share_master_partitions(zero) -> None:
    """Drop DeepSpeed 0.19's second fp32 copy of each rank's weight partition (ZeRO 1-3).

    With fp32 weights (fp32 runs, and bf16 under ``torch_autocast``) the optimizer's fp32
    "master" partition holds the same values as the rank's partition of the weights, yet
    DeepSpeed keeps it as a separate copy: stages 1-2 always clone it, stage 3 means to reuse
    the weights (``_create_fp32_partitions``) but decides so by comparing a ``torch.device`` with
    a device name ``str``, which is never equal. The copy costs a partition of fp32 memory per
    rank (docs/performance.md, 'Memory per rank under ZeRO') and, each step, a copy of the stepped values back into the
    weights. Pointing each master tensor at its weight partition's storage makes the optimizer
    step the weights in place (the same objects stay in the optimizer, its state keyed as
    before; the copy back becomes a copy onto itself, which torch skips).
    """
    pairs = _master_pairs(zero)
    if pairs is None:
        return  # check_patches says so
    shared = False
    for master, partition in pairs:
        if (partition is not None and master is not partition and master.dtype == partition.dtype
                and master.device == partition.device and master.shape == partition.shape
                and master.data_ptr() != partition.data_ptr()):
            master.data = partition.data
            shared = True
    if shared and hasattr(zero, "single_partition_of_fp32_groups"):
        # stages 1-2 keep each weight's view of its fp32 fragment (``safe_get_full_fp32_param``
        # and universal checkpoints read them): rebuild the views over the shared storage
        zero._link_all_hp_params()


def _master_pairs(zero):
    """(fp32 master partition, this rank's weight partition) pairs of a ZeRO optimizer; None if it has neither kind."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # stage 3
        return zip(zero.fp32_partitioned_groups_flat or [], zero.fp16_partitioned_groups_flat or [])
    if hasattr(zero, "single_partition_of_fp32_groups"):  # stages 1-2
        return ((master, partitions[dist.get_rank(group=zero.real_dp_process_group[i])])
                for i, (master, partitions) in enumerate(zip(zero.single_partition_of_fp32_groups,
                                                                zero.parallel_partitioned_bit16_groups)))
    return None


def deepspeed_config(rt: Runtime, micro_batch: int, grad_accum: int, grad_clip: Optional[float],
                     trainable: int = 0) -> dict:
    """DeepSpeed's configuration for stages 1-3, without per-step work nobody reads.

    * ``timers.throughput``: on by default, and it synchronises the device at the start of
      every forward and the end of every step, so the host can never run ahead of the GPU.
    * ``compute_grad_norm`` (stages 1-2): the global gradient norm is computed every step and
      checked for inf/NaN on the host (a sync); only gradient clipping needs it. Non-finite
      steps are skipped by harness/guard.py without it.
    * ``contiguous_gradients`` (stages 1-2): each gradient is copied into the reduction
      bucket from its hook as it is produced, three host operations per parameter; without it
      the bucket is flattened in one ``cat`` when it is reduced: the same bytes moved on the
      device, 1,100 fewer host operations per step (test_resnet -> test_resnet; a plain loop
      takes 1,560 in all), and no less memory held (``bench/zero_memory.py``).
    * ``reduce_bucket_size``: DeepSpeed's default is 5e8 elements whatever the model (1.9 GiB
      in fp32, held for the whole run at stage 3, more than all the model states of a
      ResNet-sized run); a quarter of the ``trainable`` elements, from 1e7 up to that default,
      keeps a few reductions per step without the dead weight.
    """
    zero: dict = {"stage": rt.zero_stage}
    if trainable:
        zero["reduce_bucket_size"] = int(min(5e8, max(trainable // 4, 1e7)))
    if rt.zero_stage in (1, 2):
        zero["contiguous_gradients"] = False
        if not grad_clip:
            zero["compute_grad_norm"] = False
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip or 0.0,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if rt.bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def _quiet_deepspeed() -> None:
    """Silence DeepSpeed's chatter that says nothing to a user of this harness (before it is imported)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.setLevel(logging.WARNING)
    # Our optimizer is a torch SGD/AdamW with the anchor term: "untested" by DeepSpeed by design.
    ds_log.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    # DeepSpeed still calls collectives that torch has renamed; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="deepspeed")


def init_distributed(backend: str, **kwargs) -> None:
    """DeepSpeed's communication layer over the process group Accelerate made, compiling nothing.

    Joined when a ZeRO 1-3 engine is built (:func:`initialize`; DeepSpeed's own call finds it joined):
    ``harness.distributed`` makes the process group and imports nothing of DeepSpeed's.

    On CPU hosts DeepSpeed's ``TorchBackend`` (``deepspeed/comm/torch.py``) builds its
    ``deepspeed_shm_comm`` C++ op when it is created: a JIT build with the host's compiler (about
    50 s) into ``~/.cache/torch_extensions``, which is shared by every environment and keyed by
    the op's name only, so two checkouts rebuild it in turn. The op serves only
    ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference layers); training's
    collectives, DeepSpeed's included, go through torch.distributed's gloo group. So it is not
    built: ``build_shm_op`` answers None while the backend is created, DeepSpeed's own answer
    where the op is unavailable (other platforms), and ``inference_all_reduce`` would fall
    back to torch.distributed. ``kwargs`` go to ``deepspeed.init_distributed`` (e.g. ``timeout``).
    """
    import importlib

    check_version()  # every entry point (run.py refuses earlier, in its preflight)
    _quiet_deepspeed()
    import deepspeed

    # by name: the attribute deepspeed.comm.torch is torch itself (a star import shadows the module)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = getattr(ds_torch, "build_shm_op", None)
    ds_torch.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
    finally:
        if build is not None:
            ds_torch.build_shm_op = build
