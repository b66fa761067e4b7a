"""Non-finite losses: detected on every rank at once, the step skipped, counted, and a stop.

A NaN or inf loss on any rank (a diverging run, a pathological batch) must not reach the
weights. Every micro-step the loss's finiteness is recorded on the device; once per optimizer
step, after the last backward and before the update, the ranks agree on it (one all-reduce, so
nothing waits between a forward and its backward and accumulation's ``no_sync`` micro-steps
stay free of collectives), and the flag is handed to the fused optimizer as ``found_inf``, the
mechanism torch's ``GradScaler`` uses: the update, momentum and weight decay are skipped on the
device, with no host synchronisation per step. Because the flag is agreed across ranks, every
rank skips the same steps and ZeRO partitions stay consistent.

The host reads the counters only at the loop's periodic checks (every
``runtime.signal_check_every`` steps). Too many skipped steps in a row stop the run with
:class:`NonFiniteLoss`, naming the last good checkpoint. BatchNorm running statistics are
updated by a forward even when its step is skipped, and a NaN there would persist; they are
copied at each check that finds them finite and restored at one that does not.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from harness.distributed import all_reduce

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced only non-finite losses for too long; the message names the way back."""


class NonFiniteGuard:
    """Skips optimizer steps whose loss was NaN or inf on any rank, and counts them."""

    def __init__(self, module: nn.Module, optimizers: list[torch.optim.Optimizer], device: torch.device):
        self.bad = torch.zeros((), device=device)  # this optimizer step: some micro-step was non-finite
        self.total = torch.zeros((), device=device)  # skipped steps so far in this process
        self.in_a_row = torch.zeros((), device=device)  # skipped steps since the last good one
        for opt in optimizers:
            opt.found_inf = self.bad  # read by the fused optimizers at each step (same tensor, updated in place)
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.saved = [b.detach().clone() for b in self.buffers]

    def observe(self, loss: torch.Tensor) -> None:
        """Record a micro-step's loss on this rank (no collective: :meth:`agree` follows at the step's end)."""
        torch.maximum(self.bad, (~torch.isfinite(loss.detach())).to(self.bad.dtype), out=self.bad)

    def agree(self) -> torch.Tensor:
        """Before the optimizer step (a collective: every rank calls it): the step is skipped on every
        rank if any micro-step on any rank was non-finite. The flag, 1.0 for a skipped step."""
        return all_reduce(self.bad, "max")

    def stepped(self) -> None:
        """After the optimizer step: update the counters and clear the flag for the next step."""
        self.total.add_(self.bad)
        self.in_a_row.mul_(self.bad).add_(self.bad)
        self.bad.zero_()

    def check(self) -> tuple[int, int]:
        """(skipped in all, skipped in a row), read from the device; repairs BatchNorm statistics."""
        finite = torch.stack([torch.isfinite(b).all() for b in self.buffers]).all().float() if self.buffers \
            else torch.ones((), device=self.bad.device)
        total, in_a_row, buffers_ok = torch.stack([self.total, self.in_a_row, finite]).tolist()
        if self.buffers:
            if buffers_ok:
                torch._foreach_copy_(self.saved, self.buffers)
            else:
                log.warning("non-finite BatchNorm statistics after a skipped step: restored the last finite ones")
                torch._foreach_copy_(self.buffers, self.saved)
        return int(total), int(in_a_row)
