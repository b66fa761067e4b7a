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
        params = group["params"]
        anchors = self._anchors(group, token, params)
        for p in params:
            if p.grad is None:
                # No gradient from the loss (the classifier weight W_c: the bias step detaches it)
                # still means a step: anchor and weight decay move it (ATSC.md section 2), as they
                # do under ZeRO, whose flat partitions hold zeros there. torch would skip it.
                p.grad = torch.zeros_like(p)
        if not (group.get("anchor") and params and (w or self.track_anchor)):
            return
        terms = self.__dict__.setdefault("_anchor_terms", {})
        for p, anchor in zip(params, anchors):
            # p - p0 one slice at a time in a reused buffer: a difference tensor would be a temporary
            # the size of the whole partition (ZeRO hands over one flat tensor per group); per
            # element the same operations as ``grad += 2 w (p - p0)``, so the same step bit for bit
            squares = []
            for p_part, a_part, g_part in zip(*(_slices(t) for t in (p, anchor, p.grad))):
                diff = self._scratch(p_part)
                torch.sub(p_part, a_part, out=diff)
                if self.track_anchor:  # the distance is worth logging even when w is 0 (an ablation)
                    squares.append(diff.float().pow(2).sum())
                if w:
                    g_part.add_(diff, alpha=2.0 * w)
            if self.track_anchor:
                terms[id(p)] = (group.get("teacher", 0), w, squares[0] if len(squares) == 1 else torch.stack(squares).sum())

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped as ``like``, carved from one kept per device and dtype (at most a slice's size)."""
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        key = (like.device, like.dtype)
        buf = buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = buffers[key] = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        return buf[:like.numel()].view(like.shape)

    def _anchors(self, group: dict, token: int, params: list) -> list:
        """Each parameter's W0 (None outside anchored groups), restarting the state of a new adaptation.

        The state is walked only when the group's parameters or token are new to this optimizer (or
        its state was loaded): the anchors are then remembered, so a plain step reads no state.
        """
        cache = self.__dict__.setdefault("_anchor_cache", {})
        key = (id(group), token, tuple(map(id, params)))
        if key in cache:
            return cache[key]
        fresh = self.__dict__.setdefault("_fresh", [])
        anchors = []
        for p in params:
            state = self.state[p]
            if state.get("adapt_token") != token:
                state.clear()
                state["adapt_token"] = token
                if group.get("anchor"):
                    state["anchor"] = p.detach().clone()
                fresh.append(p)
            anchors.append(state.get("anchor"))
        cache[key] = anchors
        return anchors

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self.__dict__.pop("_anchor_cache", None)  # the loaded state holds other anchor tensors

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            self._prepare(group)
            self._init_state(group)
        # The base optimizer initialises a parameter's state when it finds it empty; our keys
        # must not make a fresh state look initialised, so they step aside meanwhile. Only a state
        # restarted in this step can be uninitialised: the base optimizer fills it in this step.
        fresh = self.__dict__.pop("_fresh", [])
        extra = {p: {k: self.state[p].pop(k) for k in self._EXTRA_STATE if k in self.state[p]} for p in fresh}
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            for p, keys in extra.items():
                self.state[p].update(keys)

    def _init_state(self, group: dict) -> None:
        """Create state the base optimizer would create lazily (see AnchoredSGD)."""


SLICE = 1 << 22  # elements: the anchor's scratch buffer holds at most one such slice


def _slices(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` as views along its first dimension of at most about ``SLICE`` elements each."""
    if t.dim() == 0 or t.numel() <= SLICE:
        return [t]
    return list(t.split(max(1, SLICE * t.shape[0] // t.numel())))


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


def decay_groups(groups: list[dict], modules: Iterable[torch.nn.Module], optim) -> list[dict]:
    """``groups`` split by whether their weights decay, as ``optim.decay_groups`` asks.

    ``timm``: each of ``modules`` (student, teachers, projectors) is sorted by timm's own
    ``param_groups_weight_decay`` with the module's ``no_weight_decay()`` names, as timm's
    ``create_optimizer_v2`` does; a group's no-decay part becomes a group of its own (role,
    anchor and teacher tags kept), marked ``no_decay``. ``all``: the groups as they are.
    """
    if optim.decay_groups == "all":
        return groups
    from timm.optim import param_groups_weight_decay

    exempt: set[int] = set()
    for module in modules:
        names = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        for g in param_groups_weight_decay(module, 1.0, no_weight_decay_list=names):
            if not g["weight_decay"]:
                exempt.update(id(p) for p in g["params"])
    split = []
    for group in groups:
        decayed = [p for p in group["params"] if id(p) not in exempt]
        kept = [p for p in group["params"] if id(p) in exempt]
        split += [{**group, "params": decayed}] if decayed else []
        split += [{**group, "params": kept, "no_decay": True}] if kept else []
    return split


def build_optimizer(groups: list[dict], optim, anchor_weight: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over role-tagged groups; each group keeps its base lr multiplier.

    Fused: one kernel per step on the device, and it honours ``found_inf``, which skips a step
    with a non-finite loss without a host synchronisation (harness/guard.py).
    """
    for group in groups:
        group["lr_mult"] = optim.teacher_lr_mult if group["role"] == ROLE_TEACHER else 1.0
        group["base_weight_decay"] = 0.0 if group.get("no_decay") else optim.weight_decay
        group["weight_decay"] = group["base_weight_decay"]
        group["anchor_weight"] = anchor_weight if group.get("anchor") else 0.0
    groups = [g for g in groups if g["params"]]
    if optim.name == "sgd":
        return AnchoredSGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay, fused=True)
    return AnchoredAdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)


def set_teachers_trainable(optimizer: torch.optim.Optimizer, trainable: bool, teacher: Optional[int] = None) -> None:
    """Frozen teachers get lr 0 and no weight decay, so their parameters cannot move.

    ``teacher``: only that one (its groups' ``teacher`` index), as the teacher guard freezes it.
    """
    for group in optimizer.param_groups:
        if group.get("role") == ROLE_TEACHER and (teacher is None or group.get("teacher") == teacher):
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


def bias_optimizer(params: dict[int, torch.nn.Parameter], optim) -> Optional[torch.optim.Optimizer]:
    """Separate optimizer of the classifier biases (by teacher index) for the two-pass bias step."""
    if not params:
        return None
    # a group per bias, tagged with its teacher as the main optimizer's are: the guard can freeze one
    groups = [{"params": [p], "role": ROLE_TEACHER, "teacher": k} for k, p in params.items()]
    return build_optimizer(groups, optim, anchor_weight=0.0)
