"""An exponential moving average (EMA) of the deployed student, at every ZeRO stage.

The average covers what is deployed: the student backbone, its projectors and the shared
teacher classifiers (``Distiller.deployed()``), parameters and floating-point buffers (BatchNorm
statistics), with timm's ``ModelEmaV3`` rule (:meth:`StudentEma.decay_at`, tested against
timm's own). timm's class keeps a deep copy of the model, which cannot follow ZeRO-3's
partitioned parameters, so the averaged tensors here are what the rank holds of each
parameter:

* stages 0-2: the whole parameter (every rank holds it whole there), one copy per rank;
* stage 3: the rank's partition (``param.ds_tensor``), so no rank ever holds a whole copy
  (buffers, which ZeRO never partitions, are averaged whole).

At stages 0-2 the averages are the tensors of a copy of the deployed module (built without
copying the live weights twice), so evaluating the EMA is a forward of that copy: nothing is
swapped. At stage 3 no whole copy exists: :meth:`StudentEma.applied` copies the rank's averaged
partitions into the live ones, runs the caller's code (an evaluation batch, an export) and
copies the weights back bit for bit, so ZeRO-3's gathering and the export work on it as on the
student; within :meth:`StudentEma.evaluating` the whole averages are gathered once for the
evaluation, not at every batch. :class:`EmaWeights` makes the EMA one more model of
an evaluation either way.

Checkpoints: at stage 0 the averages travel in the run state (rank 0 writes it); at stages 1-3
each rank writes its part beside its optimizer partition (``ema_rank<r>.pt``): at stage 3 its
partitions, at stages 1-2 every ``world_size``-th parameter; each rank its own buffers' averages
(BatchNorm statistics are per rank). A resume continues the average exactly.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.distributed import many_ranks, rank_and_world


def _partitioned(param: nn.Parameter, zero_stage: int) -> bool:
    return zero_stage == 3 and getattr(param, "ds_tensor", None) is not None


def _live_tensor(param: nn.Parameter, zero_stage: int) -> torch.Tensor:
    """The tensor this rank averages for ``param``: its ZeRO-3 partition, or the parameter itself."""
    return param.ds_tensor.data if _partitioned(param, zero_stage) else param.data


def _gather_whole(params: list[nn.Parameter], partitions: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole tensors of ZeRO-3 ``params`` from every rank's ``partitions`` of them, in one collective.

    DeepSpeed's layout: rank r holds elements [r * n, (r + 1) * n) of the flattened parameter,
    n = ``ds_tensor.numel()``, the last rank's padded.
    """
    flat = torch.cat([t.reshape(-1) for t in partitions])
    _, world = rank_and_world()
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    by_rank = torch.stack(gathered)  # (world, sum of partition sizes)
    whole, offset = [], 0
    for p, part in zip(params, partitions):
        n = part.numel()
        whole.append(by_rank[:, offset:offset + n].reshape(-1)[:p.ds_numel].view(p.ds_shape))
        offset += n
    return whole


def _detached_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are fresh clones of its values, without
    gradients. Tensors are cloned one by one first: a plain deep copy of a parameter that is a view
    of a flat buffer (DeepSpeed stages 1-2) would copy the whole buffer."""
    memo: dict = {}
    with torch.no_grad():
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for b in module.buffers():
            memo[id(b)] = b.detach().clone()
    return copy.deepcopy(module, memo)


class StudentEma:
    """EMA of ``module``'s parameters and floating-point buffers (timm ``ModelEmaV3``'s rule).

    ``update(step)`` is called after each optimizer step with the step count (1 after the first
    step), as timm's train.py calls ``ModelEmaV3.update(model, step=num_updates)``.
    """

    FILE = "ema_rank{rank:05d}.pt"

    def __init__(self, module: nn.Module, zero_stage: int, decay: float = 0.9998, warmup: bool = False,
                 warmup_gamma: float = 1.0, warmup_power: float = 2 / 3, update_after: int = 0, every: int = 1):
        self.module, self.zero_stage = module, zero_stage
        self.decay, self.warmup, self.warmup_gamma, self.warmup_power = decay, warmup, warmup_gamma, warmup_power
        self.update_after, self.every = update_after, every
        self.n_buffers = sum(1 for b in module.buffers() if b.is_floating_point())
        self.copy: Optional[nn.Module] = None  # stages 0-2: a module whose tensors are the averages
        self._gathered: Optional[dict[int, torch.Tensor]] = None  # stage 3, while evaluating
        if zero_stage < 3:
            self.copy = _detached_copy(module)
            self.shadow: list[torch.Tensor] = [p.data for p in self.copy.parameters()] + \
                [b for b in self.copy.buffers() if b.is_floating_point()]
        else:
            with torch.no_grad():
                self.shadow = [t.detach().clone() for t in self.live()]

    def live(self) -> list[torch.Tensor]:
        """The tensors averaged, looked up afresh: DeepSpeed may re-point them (a checkpoint load)."""
        params = [_live_tensor(p, self.zero_stage) for p in self.module.parameters()]
        return params + [b for b in self.module.buffers() if b.is_floating_point()]

    @classmethod
    def from_recipe(cls, module: nn.Module, zero_stage: int, cfg) -> "StudentEma":
        """From a recipe's ``runtime.ema`` section (``harness.recipe.Ema``)."""
        return cls(module, zero_stage, decay=cfg.decay, warmup=cfg.warmup, warmup_gamma=cfg.warmup_gamma,
                   warmup_power=cfg.warmup_power, update_after=cfg.update_after, every=cfg.every)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step``: timm ``ModelEmaV3.get_decay``.

        0 (a plain copy) up to ``update_after`` + 1; then ``decay``, or with ``warmup``
        ``min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power)``, n counted from there.
        """
        n = max(0, step - self.update_after - 1)
        if n <= 0:
            return 0.0
        if self.warmup:
            return max(min(1 - (1 + n / self.warmup_gamma) ** -self.warmup_power, self.decay), 0.0)
        return self.decay

    @torch.no_grad()
    def update(self, step: int, skipped: Optional[torch.Tensor] = None) -> None:
        """Average the current weights in, after optimizer step ``step`` (every ``every``-th step).

        ``skipped``: the non-finite guard's flag for this step (a 0-dim device tensor, 1 when the
        step was skipped), read on the device with no host sync. A skipped step averages nothing
        in. Its forward may also have left NaN BatchNorm statistics, which stay in the live
        buffers until the guard's next check restores them (``guard.py``), while the steps in
        between are not skipped: a non-finite element of a buffer is never averaged in, at any step.
        """
        if step % self.every:
            return
        live, weight = self.live(), 1.0 - self.decay_at(step)
        if skipped is None:
            torch._foreach_lerp_(self.shadow, live, weight)
            return
        n = len(self.shadow) - self.n_buffers
        # 0 * NaN is NaN: a zero weight alone would not keep NaN out, so such elements average the average
        live = live[:n] + [torch.where(torch.isfinite(b), b, s) for s, b in zip(self.shadow[n:], live[n:])]
        torch._foreach_lerp_(self.shadow, live, weight * (1.0 - skipped.float()))

    def _whole_now(self) -> list[int]:
        """ZeRO-3 gathers a parameter from the partitions at its module's forward unless it is whole
        already (small ``ds_persist`` ones between steps, say): those need the whole average too."""
        params = list(self.module.parameters())
        return [i for i, p in enumerate(params) if _partitioned(p, self.zero_stage) and p.data.numel() == p.ds_numel > 0]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """An evaluation's span: at stage 3 the whole averages :meth:`applied` may need are gathered
        once for all its batches (a collective: every rank enters it), not once per batch. Which
        parameters ZeRO holds whole varies from batch to batch, so all are gathered: a whole copy
        of the student's averages for the evaluation's length. Nothing to do at stages 0-2."""
        params = list(self.module.parameters()) if self.copy is None else []
        partitioned = [i for i, p in enumerate(params) if _partitioned(p, self.zero_stage) and p.ds_numel > 0]
        if partitioned:
            whole = _gather_whole([params[i] for i in partitioned], [self.shadow[i] for i in partitioned])
            self._gathered = dict(zip(partitioned, whole))
        try:
            yield
        finally:
            self._gathered = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the module holds the averages; afterwards its own weights again, bit for bit."""
        live, shadow = self.live(), list(self.shadow)
        whole_now = self._whole_now()
        if whole_now:
            params = list(self.module.parameters())
            gathered = [self._gathered[i] for i in whole_now] if self._gathered is not None else \
                _gather_whole([params[i] for i in whole_now], [shadow[i] for i in whole_now])
            live += [params[i].data for i in whole_now]
            shadow += gathered
        with torch.no_grad():
            saved = [t.clone() for t in live]
            torch._foreach_copy_(live, shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def broadcast_buffers(self) -> None:
        """Give every rank rank 0's averaged buffers, as ``broadcast_buffers`` does for the student's."""
        if many_ranks():
            for shadow in self.shadow[len(self.shadow) - self.n_buffers:]:
                dist.broadcast(shadow, src=0)

    # --- checkpoints

    def state_dict(self) -> dict:
        """All averages, on the CPU (stage 0: rank 0 saves it in the run state)."""
        return {"shadow": [t.detach().cpu() for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("the checkpoint's EMA does not match this run's deployed student")
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, [t.to(s.device) for t, s in zip(shadow, self.shadow)])

    def save_partition(self, folder: Path) -> None:
        """Stages 1-3: this rank's part of the averages into ``folder`` (every rank calls it)."""
        rank, world = rank_and_world()
        n_params = len(self.shadow) - self.n_buffers
        # stages 1-2: every world-th parameter; buffers (each rank's own statistics) by every rank
        mine = range(len(self.shadow)) if self.zero_stage == 3 else \
            [*range(rank, n_params, world), *range(n_params, len(self.shadow))]
        torch.save({"count": len(self.shadow), "shadow": {i: self.shadow[i].detach().cpu() for i in mine}},
                   Path(folder) / self.FILE.format(rank=rank))

    def load_partition(self, folder: Path) -> None:
        """Stages 1-3: this rank's averages from ``folder``, as :meth:`save_partition` wrote them."""
        rank, world = rank_and_world()
        sources = [rank] if self.zero_stage == 3 else [r for r in range(world) if r != rank] + [rank]
        found: dict[int, torch.Tensor] = {}
        for r in sources:  # this rank's own file last: its buffers are its own
            path = Path(folder) / self.FILE.format(rank=r)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the checkpoint holds no EMA of the student for rank {r} "
                                        f"(saved without `runtime.ema`)")
            part = torch.load(path, map_location="cpu", weights_only=True)
            found.update(part["shadow"])
        self.load_state_dict({"shadow": [found[i] for i in range(len(self.shadow))]})


class EmaWeights(nn.Module):
    """The deployed student with its EMA weights in place of its own: a model to evaluate beside the student.

    Each forward runs the averages: at stages 0-2 the EMA's own copy of the module, at stage 3
    the student's module with the averages swapped in for the forward (``StudentEma.applied``)
    and its own weights back afterwards. The module is not registered here, so it is not owned twice.
    """

    def __init__(self, ema: StudentEma):
        super().__init__()
        self.ema = ema

    def train(self, mode: bool = True) -> "EmaWeights":
        (self.ema.copy or self.ema.module).train(mode)
        return super().train(mode)

    def evaluating(self):
        """Entered once around an evaluation (``harness.evaluation.evaluate``)."""
        return self.ema.evaluating()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ema.copy is not None:  # stages 0-2: the averages are a module of their own
            if self.ema.copy.training != self.ema.module.training:  # in the student's mode, as at stage 3
                self.ema.copy.train(self.ema.module.training)
            return self.ema.copy(x)
        with self.ema.applied():
            return self.ema.module(x)


def maybe_ema(module: nn.Module, zero_stage: int, cfg) -> Optional[StudentEma]:
    """The run's EMA if the recipe asks for one (``runtime.ema``), else None."""
    return None if cfg is None else StudentEma.from_recipe(module, zero_stage, cfg)
