"""ATSC's two-pass bias step (``method.bias_step: two_pass``): the authors' order, beside the method.

After the main step a second teacher forward computes the bias loss
(``Distiller.bias_loss``), and only the shared classifiers' biases step, on their own optimizer
(``harness.optim.bias_optimizer``). The biases are outside the training engine at every stage,
so this knows nothing of DeepSpeed or of the launcher: the gradients are averaged over the
ranks through the process group (``harness.distributed``), in one all-reduce.
"""
from __future__ import annotations

import torch

from harness.distributed import Runtime, all_reduce


def two_pass_bias_step(distiller, bias_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       rt: Runtime) -> torch.Tensor:
    """The authors' order: after the main step, a second teacher forward steps only the biases.

    ``y`` is the main step's: class indices, or the mixed soft targets of a Mixup/CutMix batch.
    """
    params = distiller.bias_parameters()
    with rt.autocast():
        loss = distiller.bias_loss(x, y)
    grads = torch.autograd.grad(loss, params)
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads])) / rt.world_size
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    bias_opt.step()
    bias_opt.zero_grad(set_to_none=True)
    return loss.detach()
