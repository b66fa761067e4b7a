"""The step loop of one epoch: optimizer steps, the ``train`` records, the periodic checks, mid-epoch checkpoints.

:class:`StepLoop` reads nothing from the device between logging steps (``tests/test_host_sync.py``
counts it): the loss terms are summed on the device and read in :meth:`StepLoop.log_window`, the
non-finite guard and the stop signals are read every ``runtime.signal_check_every`` steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from harness import checkpoint
from harness.bias_step import two_pass_bias_step
from harness.data import Position
from harness.distributed import Runtime, all_gather_objects, all_reduce
from harness.ema import StudentEma
from harness.guard import NonFiniteGuard, NonFiniteLoss
from harness.metrics import MetricsLog, Progress, StepSums, memory_gb
from harness.optim import LRSchedule, set_lr
from harness.recipe import Recipe
from harness.signals import StopSignals
from harness.teacher_guard import TeacherGuard
from harness.watchdog import Watchdog


@dataclass
class StepParts:
    """What the trainer built that each step drives, and the learning-rate schedule it follows."""

    engine: Any  # DDPEngine or DeepSpeed's: forward, backward, step
    distiller: Any  # the method (harness/method.py): student, teachers, loss
    inner: Any  # the engine's base optimizer (param groups, the anchor)
    bias_opt: Optional[torch.optim.Optimizer]  # ATSC's two-pass bias step (`method.bias_step: two_pass`), else None
    loader: Any  # the training loader
    schedule: LRSchedule
    lr0: float  # the peak learning rate, for the global batch
    steps_per_epoch: int  # optimizer steps, for the time-left estimate
    ema: Optional[StudentEma] = None
    teacher_guard: Optional[TeacherGuard] = None


class StepLoop:
    """The training step loop of one epoch, with logging and mid-epoch checkpoints."""

    def __init__(self, parts: StepParts, recipe: Recipe, rt: Runtime, log: MetricsLog, progress: Progress,
                 signals: StopSignals, watchdog: Watchdog, stop_after_steps: Optional[int] = None):
        self.parts, self.recipe, self.rt = parts, recipe, rt
        self.log, self.progress, self.signals, self.watchdog = log, progress, signals, watchdog
        self.out = Path(recipe.output)
        self.stop_after_steps, self.stop_at = stop_after_steps, None
        self.images_per_s = math.nan
        optimizers = [parts.inner] + ([parts.bias_opt] if parts.bias_opt is not None else [])
        self.nonfinite = NonFiniteGuard(parts.distiller, optimizers, rt.device)
        self.teacher_names = recipe.teacher_names
        self.skipped_seen = 0  # the non-finite guard's count already added to the run's state
        self.guard_stop: Optional[str] = None  # the teacher guard's message when it stops the run

    def save(self, state: dict, tag: str) -> None:
        """Checkpoint the run as ``tag``, with the bias optimizer, the EMA and the teacher guard's state."""
        p = self.parts
        if p.bias_opt is not None:
            state["bias_optimizer"] = p.bias_opt.state_dict()
        self.watchdog.beat()  # a save's time is its own: the step before it does not count against it
        partitioned = p.ema is not None and self.rt.zero_stage > 0  # each rank writes its part of the EMA
        if p.ema is not None and not partitioned:
            state["ema"] = p.ema.state_dict()  # stage 0: whole, in the run state rank 0 writes
        if p.teacher_guard is not None:  # each rank's watch: a resumed run's guard trips where this one would
            state["teacher_watch"] = all_gather_objects(p.teacher_guard.watch.state_dict())
            state["teacher_guard"] = p.teacher_guard.state_dict()
        try:
            checkpoint.save(p.engine, self.out, tag, state, keep=self.recipe.runtime.keep_checkpoints,
                            rank_files=p.ema.save_partition if partitioned else None)
        finally:
            state.pop("ema", None)
        self.watchdog.beat()

    def train_epoch(self, epoch: int, state: dict) -> bool:
        """Train one epoch (or its rest, after a mid-epoch resume); False if asked to stop early."""
        p, rr, rt = self.parts, self.recipe.runtime, self.rt
        if self.stop_after_steps is not None and self.stop_at is None:
            self.stop_at = state["step"] + self.stop_after_steps
        resume = None
        if state.get("position"):  # one per rank: each rank's shards and skips are its own
            positions = state["position"]
            if len(positions) != rt.world_size:
                raise checkpoint.CheckpointError(
                    f"the checkpoint was taken mid-epoch by {len(positions)} ranks; resume it with "
                    f"{len(positions)} processes (epoch-end checkpoints have no such constraint)")
            resume = Position(**positions[rt.rank])
        batches_total = p.loader.batches_in_epoch(epoch)
        images_per_micro = self.recipe.data.batch_size * rt.world_size
        sums = StepSums()
        micro_steps, window_micro, window_wait = 0, 0, 0.0
        epoch_start = window_start = time.perf_counter()
        self.reseed(epoch, resume.batches if resume else 0)
        batches = iter(p.loader.epoch(epoch, resume))
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            x, y = batch  # on the device, normalised
            lr = p.lr0 * p.schedule.factor(epoch + p.loader.position.batches / batches_total)
            set_lr(p.inner.param_groups, lr)
            p.inner.track_anchor = p.distiller.adapting and (state["step"] + 1) % rr.log_every == 0
            loss, terms = p.engine(x, y)
            if p.teacher_guard is not None:
                p.teacher_guard.watch.add(terms)
            self.nonfinite.observe(loss)
            p.engine.backward(loss)
            boundary = p.engine.is_gradient_accumulation_boundary()
            if boundary:
                self.nonfinite.agree()  # a NaN/inf in any micro-step on any rank skips this step on every rank
            p.engine.step()
            micro_steps, window_micro = micro_steps + 1, window_micro + 1
            terms = {"loss": loss, **terms}
            if boundary and p.bias_opt is not None and p.distiller.adapting:
                set_lr(p.bias_opt.param_groups, lr)
                terms["bias_two_pass"] = two_pass_bias_step(p.distiller, p.bias_opt, x, y, rt)
            sums.add(terms)  # on the device: read at logging steps only
            if not boundary:
                continue
            sums.close_step(self.nonfinite.bad)
            if p.teacher_guard is not None:
                p.teacher_guard.watch.close_step(self.nonfinite.bad)
            skipped = self.nonfinite.bad.clone() if p.ema is not None else None  # stepped() clears the flag
            self.nonfinite.stepped()
            state["step"] += 1
            if p.ema is not None:
                p.ema.update(state["step"], skipped)
            self.watchdog.beat(state["step"])
            if state["step"] % rr.log_every == 0:
                now = time.perf_counter()
                self.log_window(state, epoch, lr, sums, images_per_micro * window_micro / (now - window_start),
                                window_wait / (now - window_start),
                                rr.grad_accum * (now - window_start) / window_micro)
                window_micro, window_wait, window_start = 0, 0.0, now
            stop = (self.stop_at is not None and state["step"] >= self.stop_at) or self.guard_stop is not None
            checking = state["step"] % rr.signal_check_every == 0
            if checking:
                self.check_nonfinite(state, epoch)
                state["stopped_by"] = self.signals.agreed(rt.device)
                stop = stop or state["stopped_by"] is not None
            periodic = rr.checkpoint_steps and state["step"] % rr.checkpoint_steps == 0
            if stop or (periodic and p.loader.position.batches < batches_total):  # else the epoch save follows
                if not checking:  # a checkpoint holds no NaN statistics, and the skip count is current
                    self.check_nonfinite(state, epoch)
                state["position"] = all_gather_objects(asdict(p.loader.position))
                self.save(state, f"epoch{epoch:04d}-step{state['step']:08d}")
                if stop:
                    return False
                self.reseed(epoch, p.loader.position.batches)  # as a resume from this checkpoint will
        self.check_nonfinite(state, epoch)  # nothing non-finite is carried into an evaluation or a checkpoint
        elapsed = time.perf_counter() - epoch_start
        self.images_per_s = images_per_micro * micro_steps / elapsed if elapsed > 0 else math.nan
        return True

    def reseed(self, epoch: int, batches: int) -> None:
        """Seed dropout and friends from (seed, epoch, batch position, rank) where a run can resume.

        At an epoch's start and after each mid-epoch checkpoint: a resumed run then draws exactly
        what the uninterrupted one did, and no step pays for a reseed (``torch.manual_seed``
        also queues the seeding of every GPU).
        """
        torch.manual_seed(hash((self.recipe.runtime.seed, epoch, batches, self.rt.rank)) & 0xFFFFFFFF)

    def log_window(self, state: dict, epoch: int, lr: float, sums: StepSums, ips: float, data_wait: float,
                   seconds_per_step: float) -> None:
        """The ``train`` record of the steps since the last one: the only point of a step that reads the device."""
        p, rt, epochs = self.parts, self.rt, self.recipe.schedule.epochs
        values = sums.means()  # means over kept micro-steps; NaN: every step was non-finite
        extra: dict[str, Any] = {}  # fields that are not one number
        if p.distiller.adapting and any(g.get("anchor") for g in p.inner.param_groups):
            values["anchor"] = anchor_value(p.inner, rt)
            extra["anchor_dist"] = anchor_distances(p.inner, rt, self.teacher_names)
        trips = []
        if p.distiller.adapting and p.teacher_guard is not None:
            watched, trips = p.teacher_guard.read(state["step"], epoch)
            extra["teacher_train"] = {name: {"ce": round(values.pop(f"teacher{k}_ce", math.nan), 6),
                                             "top1": round(values.pop(f"teacher{k}_top1", math.nan), 6), **watched[name]}
                                      for k, name in enumerate(self.teacher_names)}
        remaining = epochs * p.steps_per_epoch - state["step"]
        self.log.write("train", epoch=epoch, step=state["step"], lr=lr, images_per_s=round(ips, 1),
                       data_wait=round(data_wait, 4), data_skipped=p.loader.position.skipped,
                       steps_skipped=state.get("steps_skipped", 0), memory_gb=round(memory_gb(rt.device), 3),
                       **{k: round(v, 6) for k, v in values.items()}, **extra)
        self.progress.update(state["step"], epoch, epochs, values.get("loss", math.nan), ips,
                             remaining * seconds_per_step)
        for trip in trips:
            self.log.write("teacher_guard", **trip)
            self.progress.message(p.teacher_guard.message(trip))
            # stop: the step loop checkpoints this step and ends the epoch; train() raises the message
            self.guard_stop = p.teacher_guard.act(trip) or self.guard_stop

    def check_nonfinite(self, state: dict, epoch: int) -> None:
        """Count the steps skipped for a NaN/inf loss; stop when too many came in a row."""
        total, in_a_row = self.nonfinite.check()
        new, self.skipped_seen = total - self.skipped_seen, total
        state["steps_skipped"] = state.get("steps_skipped", 0) + new
        if new:
            self.log.write("nonfinite", epoch=epoch, step=state["step"], skipped=new, in_a_row=in_a_row,
                           skipped_total=state["steps_skipped"])
            self.progress.message(f"step {state['step']}: {new} step(s) skipped for a NaN/inf loss "
                                  f"({state['steps_skipped']} so far)")
        limit = self.recipe.runtime.max_nonfinite_steps
        if in_a_row >= limit:
            good = checkpoint.latest(self.out)
            raise NonFiniteLoss(
                f"the last {in_a_row} optimizer steps (to step {state['step']}, epoch {epoch}) all had a NaN/inf loss "
                f"and were skipped (limit `runtime.max_nonfinite_steps` = {limit}). The last good checkpoint is "
                f"{good or '(none yet)'}; lower `optim.lr`, set `optim.grad_clip` or check the data, then continue "
                f"with --resume{f' {good}' if good else ''}")


def anchor_distances(inner, rt: Runtime, names: list[str]) -> dict[str, float]:
    """||W - W0|| of each teacher's anchored weights (how far adaptation moved it), over all ZeRO partitions."""
    found = inner.anchor_sq_distances()
    squares = torch.stack([found.get(k, torch.zeros(())).to(rt.device).float() for k in range(len(names))])
    if rt.zero_stage > 0:
        all_reduce(squares)
    return {name: round(math.sqrt(v), 6) for name, v in zip(names, squares.tolist())}


def anchor_value(inner, rt: Runtime) -> float:
    """The anchor term's value, summed over ZeRO partitions (stages 1-3 split the references)."""
    value = inner.anchor_value().to(rt.device).float().reshape(1)
    if rt.zero_stage > 0:
        all_reduce(value)
    return value.item()
