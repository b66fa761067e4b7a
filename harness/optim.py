"""Optimizers and learning-rate schedules.

The optimizer is a torch SGD or AdamW extended with ATSC's anchor term: for parameter groups
marked ``anchor``, ``2 w (p - p0)`` is added to the gradient before the update, which is
exactly the gradient of ``w * sum ||W - W0||^2``. Keeping ``W0`` in optimizer state means
ZeRO partitions it with the rest of the state (no rank holds a full copy at stage 1-3) and
every checkpoint carries it.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

ROLE_STUDENT, ROLE_TEACHER = "student", "teacher"


class AnchorMixin:
    """Adds the anchor gradient to groups with ``anchor_weight > 0`` whose references are set."""

    param_groups: list[dict]
    state: dict

    @torch.no_grad()
    def capture_anchor(self) -> None:
        """Take W0 := the current weights of every anchored group (called when adaptation starts)."""
        for group in self.param_groups:
            if group.get("anchor"):
                for p in group["params"]:
                    self.state[p]["anchor"] = p.detach().clone()

    @torch.no_grad()
    def anchor_value(self) -> torch.Tensor:
        """sum ||p - p0||^2 * w over the (local partitions of) anchored parameters."""
        total = None
        for group in self.param_groups:
            w = group.get("anchor_weight", 0.0)
            for p in group["params"] if group.get("anchor") and w else ():
                ref = self.state.get(p, {}).get("anchor")
                if ref is not None:
                    term = (p.float() - ref.float()).pow(2).sum() * w
                    total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            w = group.get("anchor_weight", 0.0)
            if not (group.get("anchor") and w):
                continue
            for p in group["params"]:
                ref = self.state.get(p, {}).get("anchor")
                if ref is not None and p.grad is not None:
                    p.grad.add_(p - ref, alpha=2.0 * w)
        # The base optimizer initialises a parameter's state when it finds it empty; the
        # reference must not make a fresh state look initialised, so it steps aside meanwhile.
        refs = {p: self.state[p].pop("anchor") for p in list(self.state) if "anchor" in self.state[p]}
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            for p, ref in refs.items():
                self.state[p]["anchor"] = ref


class AnchoredSGD(AnchorMixin, torch.optim.SGD):
    pass


class AnchoredAdamW(AnchorMixin, torch.optim.AdamW):
    pass


def build_optimizer(groups: list[dict], optim, anchor_weight: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over role-tagged groups; each group keeps its base lr multiplier."""
    for group in groups:
        group["lr_mult"] = optim.teacher_lr_mult if group["role"] == ROLE_TEACHER else 1.0
        group["base_weight_decay"] = optim.weight_decay
        group["anchor_weight"] = anchor_weight if group.get("anchor") else 0.0
    groups = [g for g in groups if g["params"]]
    if optim.name == "sgd":
        return AnchoredSGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay)
    return AnchoredAdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)


def set_teachers_trainable(optimizer: torch.optim.Optimizer, trainable: bool) -> None:
    """Frozen teachers get lr 0 and no weight decay, so their parameters cannot move."""
    for group in optimizer.param_groups:
        if group.get("role") == ROLE_TEACHER:
            group["frozen"] = not trainable
            group["weight_decay"] = group["base_weight_decay"] if trainable else 0.0


def reset_teacher_state(optimizer: torch.optim.Optimizer) -> None:
    """Fresh optimizer state for the teachers when they start adapting (as the authors start)."""
    for group in optimizer.param_groups:
        if group.get("role") == ROLE_TEACHER:
            for p in group["params"]:
                optimizer.state[p] = {}


class LRSchedule:
    """Per-optimizer-step learning-rate factor: linear warm-up, then step decay or cosine."""

    def __init__(self, schedule, steps_per_epoch: int):
        self.s = schedule
        self.steps_per_epoch = steps_per_epoch
        self.total = schedule.epochs * steps_per_epoch
        self.warmup = int(round(schedule.warmup_epochs * steps_per_epoch))

    def factor(self, step: int) -> float:
        s = self.s
        if step < self.warmup:
            return s.warmup_factor + (1.0 - s.warmup_factor) * step / self.warmup
        if s.name == "step":
            epoch = step // self.steps_per_epoch
            return s.gamma ** sum(epoch >= m for m in s.milestones)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(param_groups: Iterable[dict], lr: float) -> None:
    for group in param_groups:
        group["lr"] = 0.0 if group.get("frozen") else lr * group.get("lr_mult", 1.0)


def peak_lr(optim, global_batch: int) -> float:
    """The recipe's lr, scaled linearly from ``lr_batch`` to the real global batch if asked."""
    return optim.lr * global_batch / optim.lr_batch if optim.lr_batch else optim.lr


def bias_optimizer(params: list[torch.nn.Parameter], optim) -> Optional[torch.optim.Optimizer]:
    """Separate optimizer of the classifier biases for the two-pass bias step."""
    if not params:
        return None
    groups = [{"params": params, "role": ROLE_TEACHER, "lr_mult": optim.teacher_lr_mult,
               "base_weight_decay": optim.weight_decay}]
    return build_optimizer(groups, optim, anchor_weight=0.0)
