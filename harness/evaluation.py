"""Evaluation: top-1 and top-5 of several models over one pass of the validation split."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from harness.distributed import Runtime, all_reduce


class _Lockstep:
    """Under ZeRO-3 every forward is a collective: ranks with no batch left run a dummy one."""

    def __init__(self, loader: Iterable, rt: Runtime, image_size: int):
        self.loader, self.rt, self.image_size = loader, rt, image_size

    def __iter__(self):
        if self.rt.zero_stage != 3:  # forwards are local: no agreement (and no host sync) per batch
            for batch in self.loader:
                yield batch, True
            return
        it = iter(self.loader)
        dummy = None
        while True:
            batch = next(it, None)
            flag = all_reduce(torch.tensor([0.0 if batch is None else 1.0], device=self.rt.device))
            if flag.item() == 0:
                return
            if batch is None:
                if dummy is None:
                    dummy = (torch.zeros(1, 3, self.image_size, self.image_size, device=self.rt.device),
                             torch.zeros(1, dtype=torch.long, device=self.rt.device))
                yield dummy, False
            else:
                yield batch, True


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader: Iterable, rt: Runtime, image_size: int) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 of each model over the whole validation set, exact for any world size."""
    for m in models.values():
        m.eval()
    counts = torch.zeros(len(models), 2, dtype=torch.float64, device=rt.device)
    seen = torch.zeros(1, dtype=torch.float64, device=rt.device)
    with contextlib.ExitStack() as once:  # per-evaluation set-up a model needs (the EMA's: harness/ema.py)
        for m in models.values():
            if hasattr(m, "evaluating"):
                once.enter_context(m.evaluating())
        _count(models, _Lockstep(loader, rt, image_size), rt, counts, seen)
    all_reduce(counts)
    all_reduce(seen)
    n = max(seen.item(), 1.0)
    return {name: {"top1": counts[i, 0].item() / n, "top5": counts[i, 1].item() / n, "samples": int(seen.item())}
            for i, name in enumerate(models)}


def _count(models: dict[str, nn.Module], batches: Iterable, rt: Runtime, counts: torch.Tensor,
           seen: torch.Tensor) -> None:
    """Top-1 and top-5 hits of each model (rows of ``counts``) and the samples seen, on the device."""
    for (x, y), real in batches:
        for i, model in enumerate(models.values()):
            with rt.autocast():
                logits = model(x)
            if real:
                top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
                hit = top5.eq(y[:, None])
                counts[i, 0] += hit[:, 0].sum()
                counts[i, 1] += hit.any(dim=-1).sum()
        if real:
            seen += y.numel()
