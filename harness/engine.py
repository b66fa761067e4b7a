"""The training engine: DeepSpeed's interface at every ZeRO stage.

The student, its projectors and any adapted teachers are one engine: at ZeRO-0 ``DDPEngine``
(the module, DDP across ranks: nothing is partitioned, so nothing of DeepSpeed's is needed), at
stages 1-3 DeepSpeed's, built with ``deepspeed.initialize`` (``harness.zero``) rather than
through Accelerate's DeepSpeed plugin, which imports ``transformers`` unconditionally and would
own the optimizer's groups.

Mixed precision is DeepSpeed's ``torch_autocast`` (bf16 compute, fp32 weights, BatchNorm
statistics and losses): its ``bf16`` mode casts whole modules, BatchNorm included, and measured
0.6-0.7x the speed of autocast on an H100 (``../shared/anchors/README.md``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from harness import zero
from harness.distributed import Runtime
from harness.ddp_engine import DDPEngine, channels_last_input


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, micro_batch: int,
                 grad_accum: int, grad_clip: Optional[float], compile: bool = False):
    """The training engine over the distiller: ``DDPEngine`` at ZeRO-0, DeepSpeed at stages 1-3.

    Stage 0 partitions nothing, so it needs none of DeepSpeed's machinery: a plain module (DDP
    across ranks) steps as fast as a hand-written loop and writes checkpoints in DeepSpeed's
    ZeRO-0 layout. Stages 1-3 are DeepSpeed's engine with a configuration that adds no work
    per step that the recipe did not ask for (see ``harness.zero``). ``compile`` applies
    ``torch.compile`` to the distiller's forward in place (parameter names are unchanged).
    """
    if compile:
        model.compile()
    if rt.zero_stage == 0:
        return DDPEngine(model, optimizer, rt, grad_accum, grad_clip)
    if rt.device.type == "cuda":
        # DeepSpeed flattens parameters into contiguous buffers (channels_last weights are
        # refused at initialize); channels_last input still gets cuDNN's NHWC kernels.
        model.register_forward_pre_hook(channels_last_input)
    return zero.initialize(model, optimizer, rt, micro_batch, grad_accum, grad_clip)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine (ZeRO wraps it; ``DDPEngine`` holds it as is)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)

