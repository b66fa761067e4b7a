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
    """Adds ATSC's anchor gradient, and restarts the teachers' state when adaptation starts.

    Both happen lazily inside ``step``, per parameter: under ZeRO-3 DeepSpeed hands the
    optimizer one flat partition at a time and leaves ``param_groups[i]['params']`` empty in
    between, so nothing can be done to the parameters from outside a step. Each teacher group
    carries an ``adapt_token``; a parameter whose state carries another token gets a fresh
    state and, in anchored groups, the reference W0 := its value before this first adapted step.
    """

    param_groups: list[dict]
    state: dict
    track_anchor: bool = False  # compute the anchor's value during the next step (for logging)
    _EXTRA_STATE = ("anchor", "adapt_token")

    def start_adaptation(self) -> None:
        """From the next step on, teachers adapt from fresh state and W0 is their current weights."""
        for group in self.param_groups:
            if group.get("role") == ROLE_TEACHER:
                group["adapt_token"] = group.get("adapt_token", 0) + 1

    def anchor_value(self) -> torch.Tensor:
        """w * sum ||p - p0||^2 over this rank's anchored partitions, as of the last tracked step."""
        terms = [w * sq for _, w, sq in getattr(self, "_anchor_terms", {}).values()]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def anchor_sq_distances(self) -> dict[int, torch.Tensor]:
        """Per teacher (its groups' ``teacher`` index), sum ||p - p0||^2 over this rank's anchored partitions.

        Tracked per parameter group, so it holds under ZeRO, which steps one flat partition per
        group: the sum over ranks is the teacher's squared distance from W0.
        """
        sums: dict[int, torch.Tensor] = {}
        for teacher, _, sq in getattr(self, "_anchor_terms", {}).values():
            sums[teacher] = sums[teacher] + sq if teacher in sums else sq
        return sums

    @torch.no_grad()
    def _prepare(self, group: dict) -> None:
        token, w = group.get("adapt_token"), group.get("anchor_weight", 0.0)
        if token is None or group.get("frozen"):
            return
        terms = self.__dict__.setdefault("_anchor_terms", {})
        for p in group["params"]:
            state = self.state[p]
            if state.get("adapt_token") != token:
                state.clear()
                state["adapt_token"] = token
                if group.get("anchor"):
                    state["anchor"] = p.detach().clone()
            if p.grad is None:
                # No gradient from the loss (the classifier weight W_c: the bias step detaches it)
                # still means a step: anchor and weight decay move it (ATSC.md section 2), as they
                # do under ZeRO, whose flat partitions hold zeros there. torch would skip it.
                p.grad = torch.zeros_like(p)
            if group.get("anchor") and (w or self.track_anchor):
                diff = p - state["anchor"]
                if self.track_anchor:  # the distance is worth logging even when w is 0 (an ablation)
                    terms[id(p)] = (group.get("teacher", 0), w, diff.float().pow(2).sum())
                if w:
                    p.grad.add_(diff, alpha=2.0 * w)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            self._prepare(group)
            self._init_state(group)
        # The base optimizer initialises a parameter's state when it finds it empty; our keys
        # must not make a fresh state look initialised, so they step aside meanwhile.
        extra = {p: {k: self.state[p].pop(k) for k in self._EXTRA_STATE if k in self.state[p]}
                 for group in self.param_groups for p in group["params"] if p in self.state}
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            for p, keys in extra.items():
                self.state[p].update(keys)

    def _init_state(self, group: dict) -> None:
        """Create state the base optimizer would create lazily (see AnchoredSGD)."""


class AnchoredSGD(AnchorMixin, torch.optim.SGD):
    @torch.no_grad()
    def _init_state(self, group: dict) -> None:
        # A skipped first step (``found_inf``, harness/guard.py) leaves fused SGD's momentum buffer
        # uninitialised memory. A zero buffer gives the same first step (dampening 0:
        # m * 0 + g = g) and stays zero when that step is skipped.
        if not group["momentum"] or group["dampening"]:
            return
        for p in group["params"]:
            if p.grad is not None and self.state[p].get("momentum_buffer") is None:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class AnchoredAdamW(AnchorMixin, torch.optim.AdamW):
    pass


def build_optimizer(groups: list[dict], optim, anchor_weight: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over role-tagged groups; each group keeps its base lr multiplier.

    Fused: one kernel per step on the device, and it honours ``found_inf``, which skips a step
    with a non-finite loss without a host synchronisation (harness/guard.py).
    """
    for group in groups:
        group["lr_mult"] = optim.teacher_lr_mult if group["role"] == ROLE_TEACHER else 1.0
        group["base_weight_decay"] = optim.weight_decay
        group["anchor_weight"] = anchor_weight if group.get("anchor") else 0.0
    groups = [g for g in groups if g["params"]]
    if optim.name == "sgd":
        return AnchoredSGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay, fused=True)
    return AnchoredAdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)


def set_teachers_trainable(optimizer: torch.optim.Optimizer, trainable: bool) -> None:
    """Frozen teachers get lr 0 and no weight decay, so their parameters cannot move."""
    for group in optimizer.param_groups:
        if group.get("role") == ROLE_TEACHER:
            group["frozen"] = not trainable
            group["weight_decay"] = group["base_weight_decay"] if trainable else 0.0


class LRSchedule:
    """Learning-rate factor at a point of training measured in epochs (fractions allowed).

    Epochs may differ by a batch or two in length (shards are dealt per epoch), so the schedule
    follows epoch progress, not a global step count: linear warm-up, then step decay or cosine.
    """

    def __init__(self, schedule):
        self.s = schedule

    def factor(self, epoch: float) -> float:
        s = self.s
        if epoch < s.warmup_epochs:
            return s.warmup_factor + (1.0 - s.warmup_factor) * epoch / s.warmup_epochs
        if s.name == "step":
            return s.gamma ** sum(epoch >= m for m in s.milestones)
        progress = (epoch - s.warmup_epochs) / max(s.epochs - s.warmup_epochs, 1e-9)
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
