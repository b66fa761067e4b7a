"""Adapted teachers that keep what they know: each one watched while it adapts, and a guard.

ATSC adapts pretrained teachers to the student. At the published settings (teacher at the
student's lr, train-mode BatchNorm, the anchor on multi-dimensional weights only) a teacher can
give up its knowledge to make the feature loss small: on ``make compare-adapt``'s digits its
validation top-1 fell from 98.9 to 86 (docs/does-atsc-help.md), and the student, which
predicts through that teacher's classifier, fell with it. Nothing in the loss notices.

Every adapted step the method measures each teacher's own CE and top-1 on the training batch
(one small matmul on the feature the step computes anyway: :func:`harness.method.teacher_fit`).
:class:`TeacherWatch` keeps, per teacher and on the device (no host synchronisation per step):

- the **start level**: the mean over the first ``window`` adapted optimizer steps;
- the **smoothed** value: an exponential average with time constant ``window`` steps, from the
  first adapted step.

Skipped (non-finite) steps add nothing. At each log step the ranks average both (one
all-reduce of a few numbers), and :class:`TeacherGuard` compares, once the start level is
complete: a smoothed top-1 more than ``max_drop`` points below the start level trips the guard
for that teacher, once, with ``method.teacher_guard.action``:

- ``warn``: one line and a ``teacher_guard`` record in ``metrics.jsonl``;
- ``freeze``: that teacher's lr is 0 and it runs in eval mode from then on, which is SimKD with
  the weights adapted so far (its gradients are still computed, so every engine reduces the
  same buckets; the cost is its backward pass);
- ``stop``: a checkpoint, then the run exits with status 2 and the message.

The ranks agree on every trip (a max-all-reduce of the verdicts), and the watch's per-rank state
and the trips are in every checkpoint, so a resumed run trips at the same step as one that was
never stopped. Everything here acts through optimizer parameter groups and module modes, so it
holds at every ZeRO stage.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from harness.distributed import all_reduce, rank_and_world

CE, TOP1 = 0, 1  # columns of the watch's tensors


class TeacherCollapsed(RuntimeError):
    """``teacher_guard.action: stop`` tripped; the run was checkpointed. Met by every rank alike."""

    all_ranks = True


class TeacherWatch:
    """Per teacher, on the device: the start level and the smoothed value of its training CE and top-1."""

    def __init__(self, teachers: int, window: int, device: torch.device):
        self.teachers, self.window, self.device = teachers, window, device
        self.names = [f"teacher{k}_{m}" for k in range(teachers) for m in ("ce", "top1")]
        self.reset()

    def reset(self) -> None:
        """Adaptation (re)starts: nothing measured yet."""
        zeros = lambda *shape: torch.zeros(shape, device=self.device)  # noqa: E731
        self.start_sum, self.smoothed = zeros(self.teachers, 2), zeros(self.teachers, 2)
        self.start_steps, self.steps = zeros(), zeros()  # kept steps in the start level; kept steps in all
        self.pending, self.micro = zeros(self.teachers, 2), 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """A micro-step's terms (the method's ``teacher{k}_ce`` / ``teacher{k}_top1``; absent: not adapting)."""
        if self.names[0] not in terms:
            return
        values = torch.stack([terms[name].detach().float().reshape(()) for name in self.names])
        self.pending += values.view(self.teachers, 2).nan_to_num(0.0, 0.0, 0.0)
        self.micro += 1

    def close_step(self, skipped: torch.Tensor) -> None:
        """End of an optimizer step; ``skipped`` (1.0: the ranks skipped it) leaves it out."""
        if not self.micro:
            return
        value, kept = self.pending / self.micro, 1.0 - skipped
        in_start = kept * (self.start_steps < self.window).float()
        self.start_sum += in_start * value
        self.start_steps += in_start
        first = (self.steps == 0).float()  # the average starts at the first kept value
        rate = torch.maximum(first, torch.full_like(first, 1.0 / self.window)) * kept
        self.smoothed += rate * (value - self.smoothed)
        self.steps += kept
        self.pending.zero_()
        self.micro = 0

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(start level, smoothed), each (teachers, 2), averaged over the ranks, and the start's step count.

        A collective: every rank calls it. Equal batches per rank make the mean of the ranks'
        values the value over the global batch.
        """
        packed = torch.cat([self.start_sum.flatten(), self.smoothed.flatten(), self.start_steps.reshape(1)])
        packed = all_reduce(packed, "sum") / rank_and_world()[1]
        n = self.teachers * 2
        start_steps = packed[-1].item()  # the same on every rank: steps are skipped on all alike
        start = packed[:n].view(self.teachers, 2) / max(start_steps, 1.0)
        return start, packed[n:2 * n].view(self.teachers, 2), start_steps

    def state_dict(self) -> dict[str, Any]:
        return {"start_sum": self.start_sum.tolist(), "smoothed": self.smoothed.tolist(),
                "start_steps": self.start_steps.item(), "steps": self.steps.item()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_sum = torch.tensor(state["start_sum"], device=self.device)
        self.smoothed = torch.tensor(state["smoothed"], device=self.device)
        self.start_steps = torch.tensor(float(state["start_steps"]), device=self.device)
        self.steps = torch.tensor(float(state["steps"]), device=self.device)


def watch_state_for(per_rank: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's saved watch state; resumed at another world size, the ranks' mean (all the guard reads)."""
    if len(per_rank) == rank_and_world()[1]:
        return per_rank[rank]
    mean = lambda key: torch.tensor([s[key] for s in per_rank], dtype=torch.float64).mean(0).tolist()  # noqa: E731
    return {**per_rank[0], "start_sum": mean("start_sum"), "smoothed": mean("smoothed")}


class TeacherGuard:
    """Reads the watch at log steps, trips once per teacher, and applies the recipe's action.

    ``config``: the recipe's ``method.teacher_guard`` (None: watched and logged, never tripped);
    ``freeze(k)`` freezes teacher k (lr 0 and eval mode; wired by the training loop). ``tripped``
    (teacher name -> what was seen) is the guard's state, kept in checkpoints.
    """

    def __init__(self, config, names: list[str], watch: TeacherWatch, freeze: Callable[[int], None]):
        self.config, self.names, self.watch, self.freeze = config, names, watch, freeze
        self.tripped: dict[str, dict[str, Any]] = {}

    def read(self, step: int, epoch: int) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
        """At a log step (a collective): each teacher's start and smoothed values, and the trips it made now."""
        start, smoothed, start_steps = self.watch.averaged()
        start, smoothed = start.tolist(), smoothed.tolist()
        fields = {name: {"ce_start": round(start[k][CE], 6), "top1_start": round(start[k][TOP1], 6),
                         "ce_smoothed": round(smoothed[k][CE], 6), "top1_smoothed": round(smoothed[k][TOP1], 6)}
                  for k, name in enumerate(self.names)}
        if self.config is None or start_steps < self.watch.window:
            return fields, []
        drop = [100.0 * (start[k][TOP1] - smoothed[k][TOP1]) for k in range(len(self.names))]
        verdicts = torch.tensor([float(d > self.config.max_drop and name not in self.tripped)
                                 for d, name in zip(drop, self.names)], device=self.watch.device)
        all_reduce(verdicts, "max")  # one verdict on every rank, whatever a last bit did
        trips = []
        for k, name in enumerate(self.names):
            if verdicts[k].item():
                record = {"teacher": name, "step": step, "epoch": epoch, "top1_start": round(start[k][TOP1], 6),
                          "top1_smoothed": round(smoothed[k][TOP1], 6), "drop_points": round(drop[k], 3),
                          "max_drop": self.config.max_drop, "action": self.config.action}
                self.tripped[name] = record
                trips.append(record)
        return fields, trips

    def message(self, trip: dict[str, Any]) -> str:
        what = {"warn": "going on (teacher_guard.action: warn)",
                "freeze": "its lr is 0 and its BatchNorm in eval mode from now on (teacher_guard.action: freeze)",
                "stop": "checkpointed; stopping (teacher_guard.action: stop)"}[trip["action"]]
        return (f"teacher guard: teacher {trip['teacher']} at step {trip['step']} (epoch {trip['epoch']}): its smoothed "
                f"training top-1 is {100 * trip['top1_smoothed']:.2f}%, {trip['drop_points']:.2f} points below "
                f"{100 * trip['top1_start']:.2f}% when adaptation started (limit `method.teacher_guard.max_drop` "
                f"{trip['max_drop']:g}); {what}")

    def act(self, trip: dict[str, Any]) -> Optional[str]:
        """Apply the recipe's action to a trip (also to one loaded from a checkpoint, as the recipe says now).

        ``stop``: returns the message, and the caller checkpoints (if it has not) and raises
        :class:`TeacherCollapsed` with it.
        """
        action = self.config.action if self.config is not None else "warn"
        if action == "freeze":
            self.freeze(self.names.index(trip["teacher"]))
        elif action == "stop":
            return (self.message({**trip, "action": "stop"}) + f". The checkpoint of step {trip['step']} holds the "
                    f"run: continue it with --resume and `--set method.teacher_guard.action=freeze` (or warn), or "
                    f"start afresh with a lower `optim.teacher_lr_mult` or `method.teacher_bn: eval`")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"tripped": dict(self.tripped)}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
        """Restore the trips; returns them, for :meth:`act` once the run is set up."""
        self.tripped = dict((state or {}).get("tripped", {}))
        return list(self.tripped.values())

