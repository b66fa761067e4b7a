"""Train from a recipe: ``accelerate launch harness/run.py recipes/imagenet.yaml``.

The loop below reads top to bottom: build, (resume), then per epoch: switch the teachers to
adapting when due, train, evaluate, checkpoint; at the end export the deployed student and
write ``summary.json``. Methods live in ``method.py``; this file only orchestrates.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from harness import checkpoint
from harness.build import build_method, check_model_files
from harness.data import DataError, Position, build_loaders, plan_data
from harness.distributed import (Runtime, all_gather_objects, all_reduce, broadcast_buffers, init_runtime, rank_and_world,
                                 shutdown)
from harness.ema import EmaWeights, StudentEma, maybe_ema
from harness.bias_step import two_pass_bias_step
from harness.engine import base_optimizer, build_engine
from harness.evaluation import evaluate
from harness.export import full_state_dict, save_student, student_config
from harness.guard import NonFiniteGuard, NonFiniteLoss
from harness.metrics import MetricsLog, Progress, StepSums, memory_gb, summary_table
from harness.tracking import check_trackers, tracking_for
from harness.models import ModelError
from harness.optim import (LRSchedule, bias_optimizer, build_optimizer, decay_groups, peak_lr, set_lr,
                           set_teachers_trainable)
from harness.recipe import Recipe, RecipeError, load_recipe, to_yaml
from harness.resources import cores_warning
from harness.restarts import exception_cause, record_failure
from harness.teacher_guard import TeacherCollapsed, TeacherGuard, TeacherWatch, watch_state_for
from harness.watchdog import Watchdog
from harness.zero import DeepSpeedVersionError, check_version

USER_ERRORS = (RecipeError, ModelError, DataError, checkpoint.CheckpointError, NonFiniteLoss, DeepSpeedVersionError,
               TeacherCollapsed)

class StopSignals:
    """Stop requests, which the ranks agree on every few steps.

    SIGUSR1 to a training process or a file ``<output>/stop-requeue`` (SLURM's warning before
    preemption or the time limit: the batch script then requeues), and SIGTERM or a file
    ``<output>/stop``, each ask for a checkpoint at the next check and a clean exit. The files
    serve launchers that cannot deliver a signal to every rank (slurm/train.sbatch).

    Only rank 0 (``poll_files``) looks at the files: the all-reduce shares its answer, and 511
    more stat calls on a shared filesystem every few steps would add nothing. A file is never
    cleared at start-up (a warning that arrives while the run starts must not be lost): the
    batch script clears stale ones before it launches, and rank 0 removes the one it acted on
    once the stop's checkpoint is written (:meth:`answered`).
    """

    FILES = {"requeue": "stop-requeue", "stop": "stop"}

    def __init__(self, out: Path, poll_files: bool):
        self.out, self.poll_files = out, poll_files
        self.received = {"requeue": False, "stop": False}
        signal.signal(signal.SIGUSR1, lambda *_: self.received.__setitem__("requeue", True))
        signal.signal(signal.SIGTERM, lambda *_: self.received.__setitem__("stop", True))

    def answered(self) -> None:
        """The stop was checkpointed: its request file is spent (a --resume must not stop at once)."""
        if self.poll_files:
            for name in self.FILES.values():
                (self.out / name).unlink(missing_ok=True)

    def agreed(self, device) -> Optional[str]:
        """'requeue' or 'stop' if any rank got a request (a collective: every rank must call)."""
        asked = {k: v or (self.poll_files and (self.out / self.FILES[k]).exists()) for k, v in self.received.items()}
        flags = torch.tensor([float(asked["requeue"]), float(asked["stop"])], device=device)
        all_reduce(flags, "max")
        return "requeue" if flags[0] else "stop" if flags[1] else None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Distil a student from a recipe.")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key, e.g. --set optim.lr=0.05 (repeatable; recorded in the run)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in the recipe's output directory (its latest checkpoint, or the one given)")
    p.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="stop (checkpointed) after N epochs of this invocation, as a preemption would")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="stop (checkpointed, mid-epoch) after N optimizer steps of this invocation")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as e:
        return refused(str(e))
    try:
        resume_from = preflight(recipe, args)
    except USER_ERRORS as e:
        # recorded where the output folder exists (slurm/train.sbatch makes it): a refusal recurs, so it is not retried
        record_failure(recipe.output, rank_and_world()[0], exception_cause(e), None, str(e))
        return refused(f"{args.recipe}: {e}")
    # `kill -USR2 <pid>` prints every thread's Python stack to stderr: where a stuck rank waits.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    # Handlers first: a warning signal that arrives during start-up must not kill the process.
    signals = StopSignals(Path(recipe.output), poll_files=rank_and_world()[0] == 0)
    rr = recipe.runtime
    rt = init_runtime(rr.precision, rr.zero_stage, rr.threads, rr.collective_timeout)
    watchdog = Watchdog(rr.progress_timeout, rt.rank, rt.world_size, recipe.output)
    if rt.local_rank == 0:  # one line per node: its ranks share the cores the scheduler granted
        starved = cores_warning(recipe.data.workers, rt.rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if starved:
            print(starved, file=sys.stderr, flush=True)
    failed = True
    try:
        train(recipe, args, rt, signals, resume_from, watchdog)
        checkpoint.finish_pruning()  # after the last save is published: off its critical path
        failed = False
        return 0  # finished, or stopped on request with a checkpoint: both are clean exits
    except USER_ERRORS as e:
        record_failure(recipe.output, rt.rank, exception_cause(e), watchdog.step, str(e))
        # an error every rank met alike (agreed by a collective) is said once, by rank 0; any other by the
        # rank that met it, naming itself
        if not getattr(e, "all_ranks", isinstance(e, NonFiniteLoss)):  # NonFiniteLoss: agreed
            print(f"error: rank {rt.rank}: {args.recipe}: {e}", file=sys.stderr, flush=True)
        elif rt.is_main:
            print(f"error: {args.recipe}: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # a crash: recorded for the restart decision (harness/restarts.py), then raised as ever
        record_failure(recipe.output, rt.rank, exception_cause(e), watchdog.step, repr(e))
        print(f"error: rank {rt.rank} crashed: {exception_cause(e)} (its traceback follows)", file=sys.stderr, flush=True)
        raise
    finally:
        # A failing rank must not wait for its peers: they may be inside a collective it will never
        # join. Its exit closes its connections, their collective fails, and the launcher ends them.
        shutdown(wait_for_peers=not failed)


def resume_point(recipe: Recipe, resume: Optional[str]) -> Optional[Path]:
    found = checkpoint.latest(recipe.output)
    if resume is None:
        if found is not None:
            raise RecipeError(f"`output` {recipe.output} already holds a run (checkpoint {found.name}); pass "
                              f"--resume to continue it, or choose another directory with --set output=...")
        return None
    # verified against its manifest once the process group exists (each rank reads a share: train)
    if resume == "latest":
        return checkpoint.latest(recipe.output) or checkpoint.newest_published(recipe.output)  # None: start afresh
    path = Path(resume)
    if not path.is_dir():
        raise RecipeError(f"--resume {resume}: no such checkpoint directory")
    return path


def refused(message: str) -> int:
    """Print a refusal before start-up, once (rank 0: every rank refuses alike); the exit status 2."""
    if rank_and_world()[0] == 0:
        print(f"error: {message}", file=sys.stderr)
    return 2


def preflight(recipe: Recipe, args: argparse.Namespace) -> Optional[Path]:
    """Every refusal the files can decide, before any process group, engine or output folder exists.

    The output folder (a run there needs --resume; a partitioned checkpoint needs its world
    size), the shards (each key one split, sizes, a full step per rank) and the models
    (known names, checkpoints that fit: a teacher's classifier for ``data.num_classes``).
    Every rank runs it on the same files, so all refuse alike. Returns the checkpoint to
    resume from, if any. First of all, the installed DeepSpeed must be one the engine was tested on.
    """
    check_version()
    _, world_size = rank_and_world()  # the launcher's, before any process group; none: a world of one
    resume_from = resume_point(recipe, args.resume)
    if resume_from is not None:
        checkpoint.check_world_size(resume_from, world_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as init_runtime will choose
    plan_data(recipe, world_size, device, recipe.runtime.grad_accum)
    check_model_files(recipe)
    check_trackers(recipe.runtime.trackers)
    return resume_from


def evaluate_split(models: dict, val_loader, rt: Runtime, image_size: int,
                   watchdog: Optional[Watchdog] = None) -> dict[str, dict[str, float]]:
    """:func:`evaluate` over the validation loader, refused unless it saw the whole split it was given.

    Each batch counts as progress for the ``watchdog``: an evaluation longer than
    ``runtime.progress_timeout`` is not a hang.
    """
    batches = val_loader.epoch(0)
    if watchdog is not None:
        batches = _beating(batches, watchdog)
    results = evaluate(models, batches, rt, image_size)
    if results:  # the count is summed over ranks: every rank decides alike
        val_loader.shards.check_evaluated(next(iter(results.values()))["samples"])
    return results


def evaluate_run(eval_models: dict, state: dict, val_loader, rt: Runtime, image_size: int,
                 watchdog: Optional[Watchdog] = None) -> dict[str, dict[str, float]]:
    """:func:`evaluate_split` of the run's models; teachers that never adapted are not evaluated again.

    A frozen teacher (KD, SimKD, ATSC before ``adapt_after``) cannot change, so its result is the
    one taken as loaded (``state['teachers_loaded']``).
    """
    known = {} if state["adapting"] else state.get("teachers_loaded") or {}
    results = evaluate_split({k: m for k, m in eval_models.items() if k not in known}, val_loader, rt, image_size,
                             watchdog)
    return {k: results[k] if k in results else known[k] for k in eval_models}


def _beating(batches, watchdog: Watchdog):
    """The batches of ``batches``, reporting progress to ``watchdog`` as each arrives."""
    for batch in batches:
        watchdog.beat()
        yield batch


def train(recipe: Recipe, args: argparse.Namespace, rt: Runtime, signals: "StopSignals",
          resume_from: Optional[Path] = None, watchdog: Optional[Watchdog] = None) -> dict[str, Any]:
    wall_start = time.time()
    watchdog = watchdog or Watchdog(None, rt.rank, rt.world_size, recipe.output)
    out = Path(recipe.output)
    m, d, rr = recipe.method, recipe.data, recipe.runtime

    # --- models, method, data, engine
    torch.manual_seed(rr.seed)  # identical initialisation on every rank
    distiller, pre = build_method(recipe)
    train_loader, val_loader = build_loaders(recipe, pre, rt.rank, rt.world_size, rt.device, rr.grad_accum)
    if rt.is_main:  # only now: a run refused while its models or data were built leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(to_yaml(recipe))
    log = MetricsLog(out / "metrics.jsonl", rt.is_main, tracking_for(recipe, rt.is_main))
    global_batch = d.batch_size * rt.world_size * rr.grad_accum
    optimizer = build_optimizer(decay_groups(distiller.param_groups(), distiller.parts(), recipe.optim), recipe.optim,
                                m.anchor_weight)
    two_pass = m.name == "atsc" and m.bias_step == "two_pass"
    bias_opt = bias_optimizer(distiller.biases_by_teacher(), recipe.optim) if two_pass else None
    engine = build_engine(distiller, optimizer, rt, d.batch_size, rr.grad_accum, recipe.optim.grad_clip, rr.compile)
    inner = base_optimizer(engine)
    ema = maybe_ema(distiller.deployed(), rr.zero_stage, rr.ema)  # after the engine: ZeRO-3 has partitioned it
    schedule, lr0 = LRSchedule(recipe.schedule), peak_lr(recipe.optim, global_batch)
    eval_models = {"student": distiller.deployed(), **({"student_ema": EmaWeights(ema)} if ema else {}),
                   **{f"{i}:{t.model}": teacher for i, (t, teacher) in enumerate(zip(recipe.teachers, distiller.viewed_teachers()))}}

    # --- state: fresh or resumed
    if resume_from is not None:  # verified: each rank reads a share, one verdict; a damaged latest falls back
        resume_from = checkpoint.newest_intact(out) if args.resume == "latest" else checkpoint.verified(resume_from)
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, bias_opt)
        load_ema(ema, state, resume_from, rr.zero_stage)
        watchdog.beat(state["step"])  # armed from here: every later stretch without progress is a hang
        state.pop("stopped_by", None)
        log.write("resume", checkpoint=str(resume_from), epoch=state["epoch"], step=state["step"])
    else:
        watchdog.beat(0)
        loaded = evaluate_split({k: v for k, v in eval_models.items() if not k.startswith("student")}, val_loader, rt,
                                d.image_size, watchdog)
        state = {"epoch": 0, "step": 0, "position": None, "adapting": False, "teachers_loaded": loaded,
                 "best_top1": 0.0, "last_eval": None}
        if loaded:
            log.write("eval", epoch=0, step=0, teachers_as_loaded=loaded)
    distiller.set_adapting(state["adapting"])
    set_teachers_trainable(inner, state["adapting"])
    guard = teacher_guard(recipe, distiller, inner, bias_opt, rt)
    if guard is not None and state.get("teacher_watch"):
        guard.watch.load_state_dict(watch_state_for(state["teacher_watch"], rt.rank))
    for trip in guard.load_state_dict(state.get("teacher_guard")) if guard is not None else ():
        stopped = guard.act(trip)  # as the recipe says now: a run the guard stopped stops again unless told otherwise
        if stopped:
            raise TeacherCollapsed(stopped)

    steps_per_epoch = train_loader.batches_in_epoch(0) // rr.grad_accum
    progress = Progress(recipe.schedule.epochs * steps_per_epoch, rt.is_main)
    progress.message(f"{recipe.name}: {m.name}, {len(recipe.teachers)} teacher(s), world size {rt.world_size}, "
                     f"global batch {global_batch}, about {steps_per_epoch} steps/epoch, ZeRO-{rr.zero_stage}, "
                     f"{'bf16' if rt.bf16 else 'fp32'} on {rt.device.type}")
    if rr.zero_stage and rt.world_size == 1:
        progress.message(f"note: ZeRO-{rr.zero_stage} partitions over processes; with one it saves no memory and "
                         f"costs step time ({'up to 3-4x' if rr.zero_stage == 3 else 'a few %'}, docs/performance.md, 'Step overhead'): "
                         f"`runtime.zero_stage: 0` is the fast path on one device")
    loop = Loop(engine, distiller, inner, bias_opt, train_loader, schedule, lr0, recipe, rt, log, progress, out,
                steps_per_epoch, args.stop_after_steps, signals, watchdog, ema, guard)
    epochs_run = 0
    for epoch in range(state["epoch"], recipe.schedule.epochs):
        if m.name == "atsc" and epoch >= m.adapt_after and not state["adapting"]:
            inner.start_adaptation()  # fresh teacher optimizer state; W0 := the weights now
            set_teachers_trainable(inner, True)
            distiller.set_adapting(True)
            state["adapting"] = True
            if guard is not None:
                guard.watch.reset()
            log.write("adapt", epoch=epoch, step=state["step"])
        distiller.train()
        if not loop.train_epoch(epoch, state):
            if loop.guard_stop is not None:
                raise TeacherCollapsed(loop.guard_stop)
            signals.answered()
            progress.message(f"stopped at step {state['step']} ({state.get('stopped_by') or 'as asked'}), "
                             f"checkpointed; continue with --resume")
            return state
        state["epoch"], state["position"] = epoch + 1, None
        epochs_run += 1
        last = epoch + 1 == recipe.schedule.epochs
        results = None
        if last or (epoch + 1) % rr.eval_every == 0:
            sync_buffers(distiller, ema)
            results = evaluate_run(eval_models, state, val_loader, rt, d.image_size, watchdog)
            state["last_eval"] = results
            log.write("eval", epoch=epoch + 1, step=state["step"], **results)
            progress.message(f"epoch {epoch + 1}: " + ", ".join(f"{k} top-1 {v['top1']:.4f}" for k, v in results.items()))
        stopping = args.stop_after_epochs is not None and epochs_run >= args.stop_after_epochs
        if last or stopping or (epoch + 1) % rr.checkpoint_every == 0:
            # the best is a checkpoint that exists: an evaluated epoch counts once it is saved
            if results is not None and results["student"]["top1"] > state["best_top1"]:
                state["best_top1"], state["best_tag"] = results["student"]["top1"], f"epoch{epoch + 1:04d}"
            loop.save(state, f"epoch{epoch + 1:04d}")
        if stopping and not last:
            progress.message(f"stopped after epoch {epoch + 1} as asked; continue with --resume")
            return state

    # --- final evaluation, export, summary
    sync_buffers(distiller, ema)
    results = state["last_eval"] or evaluate_run(eval_models, state, val_loader, rt, d.image_size, watchdog)
    student_state = full_state_dict(distiller.deployed(), rr.zero_stage)
    ema_state = None
    if ema is not None:
        with ema.applied():
            ema_state = full_state_dict(distiller.deployed(), rr.zero_stage)
    summary = {
        "recipe": recipe.name, "method": m.name, "world_size": rt.world_size,
        "student": results["student"], "student_path": "shared classifier" if m.name in ("simkd", "atsc") else "own head",
        "teachers": {k: {**v, "loaded_top1": state["teachers_loaded"][k]["top1"]} for k, v in results.items()
                     if not k.startswith("student")},
        "images_per_s": loop.images_per_s, "wall_time_s": time.time() - wall_start, "epochs": recipe.schedule.epochs,
        "global_batch": global_batch,
    }
    if ema is not None:
        summary["student_ema"] = results["student_ema"]
    if rt.is_main:
        save_student(student_state, student_config(distiller, recipe, pre), out / "student.safetensors")
        if ema_state is not None:
            save_student(ema_state, {**student_config(distiller, recipe, pre), "ema": rr.ema.model_dump()},
                         out / "student-ema.safetensors")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        progress.message(summary_table(summary))
    log.close()  # event files and tracker runs complete (a run stopped early closes them at exit)
    return state


class Loop:
    """The training step loop of one epoch, with logging and mid-epoch checkpoints."""

    def __init__(self, engine, distiller, inner, bias_opt, loader, schedule: LRSchedule, lr0: float, recipe: Recipe,
                 rt: Runtime, log: MetricsLog, progress: Progress, out: Path, steps_per_epoch: int,
                 stop_after_steps: Optional[int], signals: StopSignals, watchdog: Watchdog,
                 ema: Optional[StudentEma] = None, teacher_guard: Optional[TeacherGuard] = None):
        self.engine, self.distiller, self.inner, self.bias_opt = engine, distiller, inner, bias_opt
        self.loader, self.schedule, self.lr0, self.recipe, self.rt = loader, schedule, lr0, recipe, rt
        self.log, self.progress, self.out = log, progress, out
        self.steps_per_epoch, self.stop_at = steps_per_epoch, None
        self.stop_after_steps, self.signals, self.watchdog, self.ema = stop_after_steps, signals, watchdog, ema
        self.images_per_s = math.nan
        self.guard = NonFiniteGuard(distiller, [inner] + ([bias_opt] if bias_opt is not None else []), rt.device)
        self.teacher_names = [f"{i}:{t.model}" for i, t in enumerate(recipe.teachers)]  # as evaluations name them
        self.skipped_seen = 0  # the guard's count already added to the run's state
        self.teacher_guard = teacher_guard
        self.guard_stop: Optional[str] = None  # the teacher guard's message when it stops the run

    def save(self, state: dict, tag: str) -> None:
        if self.bias_opt is not None:
            state["bias_optimizer"] = self.bias_opt.state_dict()
        self.watchdog.beat()  # a save's time is its own: the step before it does not count against it
        partitioned = self.ema is not None and self.rt.zero_stage > 0  # each rank writes its part of the EMA
        if self.ema is not None and not partitioned:
            state["ema"] = self.ema.state_dict()  # stage 0: whole, in the run state rank 0 writes
        if self.teacher_guard is not None:  # each rank's watch: a resumed run's guard trips where this one would
            state["teacher_watch"] = all_gather_objects(self.teacher_guard.watch.state_dict())
            state["teacher_guard"] = self.teacher_guard.state_dict()
        try:
            checkpoint.save(self.engine, self.out, tag, state, keep=self.recipe.runtime.keep_checkpoints,
                            rank_files=self.ema.save_partition if partitioned else None)
        finally:
            state.pop("ema", None)
        self.watchdog.beat()

    def train_epoch(self, epoch: int, state: dict) -> bool:
        """Train one epoch (or its rest, after a mid-epoch resume); False if asked to stop early."""
        rr, rt = self.recipe.runtime, self.rt
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
        batches_total = self.loader.batches_in_epoch(epoch)
        images_per_micro = self.recipe.data.batch_size * rt.world_size
        sums = StepSums()
        micro_steps, window_micro, window_wait = 0, 0, 0.0
        epoch_start = window_start = time.perf_counter()
        self.reseed(epoch, resume.batches if resume else 0)
        batches = iter(self.loader.epoch(epoch, resume))
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            x, y = batch  # on the device, normalised
            lr = self.lr0 * self.schedule.factor(epoch + self.loader.position.batches / batches_total)
            set_lr(self.inner.param_groups, lr)
            self.inner.track_anchor = self.distiller.adapting and (state["step"] + 1) % rr.log_every == 0
            loss, terms = self.engine(x, y)
            if self.teacher_guard is not None:
                self.teacher_guard.watch.add(terms)
            self.guard.observe(loss)
            self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                self.guard.agree()  # a NaN/inf in any micro-step on any rank skips this step on every rank
            self.engine.step()
            micro_steps, window_micro = micro_steps + 1, window_micro + 1
            terms = {"loss": loss, **terms}
            if boundary and self.bias_opt is not None and self.distiller.adapting:
                set_lr(self.bias_opt.param_groups, lr)
                terms["bias_two_pass"] = two_pass_bias_step(self.distiller, self.bias_opt, x, y, rt)
            sums.add(terms)  # on the device: read at logging steps only
            if not boundary:
                continue
            sums.close_step(self.guard.bad)
            if self.teacher_guard is not None:
                self.teacher_guard.watch.close_step(self.guard.bad)
            skipped = self.guard.bad.clone() if self.ema is not None else None  # stepped() clears the flag
            self.guard.stepped()
            state["step"] += 1
            if self.ema is not None:
                self.ema.update(state["step"], skipped)
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
            if stop or (periodic and self.loader.position.batches < batches_total):  # else the epoch save follows
                if not checking:  # a checkpoint holds no NaN statistics, and the skip count is current
                    self.check_nonfinite(state, epoch)
                state["position"] = all_gather_objects(asdict(self.loader.position))
                self.save(state, f"epoch{epoch:04d}-step{state['step']:08d}")
                if stop:
                    return False
                self.reseed(epoch, self.loader.position.batches)  # as a resume from this checkpoint will
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
        rt, epochs = self.rt, self.recipe.schedule.epochs
        values = sums.means()  # means over kept micro-steps; NaN: every step was non-finite
        extra: dict[str, Any] = {}  # fields that are not one number
        if self.distiller.adapting and any(g.get("anchor") for g in self.inner.param_groups):
            values["anchor"] = anchor_value(self.inner, rt)
            extra["anchor_dist"] = anchor_distances(self.inner, rt, self.teacher_names)
        trips = []
        if self.distiller.adapting and self.teacher_guard is not None:
            watched, trips = self.teacher_guard.read(state["step"], epoch)
            extra["teacher_train"] = {name: {"ce": round(values.pop(f"teacher{k}_ce", math.nan), 6),
                                             "top1": round(values.pop(f"teacher{k}_top1", math.nan), 6), **watched[name]}
                                      for k, name in enumerate(self.teacher_names)}
        remaining = epochs * self.steps_per_epoch - state["step"]
        self.log.write("train", epoch=epoch, step=state["step"], lr=lr, images_per_s=round(ips, 1),
                       data_wait=round(data_wait, 4), data_skipped=self.loader.position.skipped,
                       steps_skipped=state.get("steps_skipped", 0), memory_gb=round(memory_gb(rt.device), 3),
                       **{k: round(v, 6) for k, v in values.items()}, **extra)
        self.progress.update(state["step"], epoch, epochs, values.get("loss", math.nan), ips,
                             remaining * seconds_per_step)
        for trip in trips:
            self.log.write("teacher_guard", **trip)
            self.progress.message(self.teacher_guard.message(trip))
            # stop: the step loop checkpoints this step and ends the epoch; train() raises the message
            self.guard_stop = self.teacher_guard.act(trip) or self.guard_stop

    def check_nonfinite(self, state: dict, epoch: int) -> None:
        """Count the steps skipped for a NaN/inf loss; stop when too many came in a row."""
        total, in_a_row = self.guard.check()
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


def teacher_guard(recipe: Recipe, distiller, inner, bias_opt, rt: Runtime) -> Optional[TeacherGuard]:
    """ATSC's watch over its adapting teachers and the guard (``method.teacher_guard``; null: watched, no guard)."""
    if recipe.method.name != "atsc":
        return None
    config = recipe.method.teacher_guard

    def freeze(k: int) -> None:
        for optimizer in (inner, bias_opt):
            if optimizer is not None:
                set_teachers_trainable(optimizer, False, teacher=k)
        distiller.hold_teacher(k)
        # in eval mode its running statistics shape every rank's targets: rank 0's on all, as a resume has them
        broadcast_buffers(distiller.teachers[k])

    watch = TeacherWatch(len(recipe.teachers), config.window if config else 10, rt.device)
    names = [f"{i}:{t.model}" for i, t in enumerate(recipe.teachers)]
    return TeacherGuard(config, names, watch, freeze)


def sync_buffers(distiller, ema: Optional[StudentEma]) -> None:
    """Every rank takes rank 0's BatchNorm statistics (and their averages) before an evaluation or export."""
    broadcast_buffers(distiller)
    if ema is not None:
        ema.broadcast_buffers()


def load_ema(ema: Optional[StudentEma], state: dict, path: Path, zero_stage: int) -> None:
    """Restore the student EMA from the checkpoint at ``path`` (stage 0: from its run ``state``)."""
    whole = state.pop("ema", None)
    if ema is None:
        return
    try:
        if zero_stage == 0:
            if whole is None:
                raise FileNotFoundError(f"checkpoint {path} holds no EMA of the student (saved without `runtime.ema`)")
            ema.load_state_dict(whole)
        else:
            ema.load_partition(path)
    except (FileNotFoundError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{e}; resume it without `runtime.ema` (--set runtime.ema=null), or start "
                                         f"afresh in another directory with --set output=...") from None


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


if __name__ == "__main__":
    sys.exit(main())
