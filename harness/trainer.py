"""The epoch loop of a run: build, (resume), then per epoch: switch the teachers to adapting when
due, train (:mod:`harness.step_loop`), evaluate, checkpoint; at the end export the deployed
student and write ``summary.json``. Methods live in ``method.py``; this file only orchestrates.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from harness import checkpoint
from harness.build import build_method
from harness.data import DataPlan, build_loaders
from harness.distributed import Runtime, broadcast_buffers
from harness.ema import EmaWeights, StudentEma, maybe_ema
from harness.engine import base_optimizer, build_engine
from harness.evaluation import evaluate
from harness.export import full_state_dict, save_student, student_config
from harness.metrics import MetricsLog, Progress, summary_table
from harness.optim import LRSchedule, bias_optimizer, build_optimizer, decay_groups, peak_lr, set_teachers_trainable
from harness.recipe import Recipe, to_yaml
from harness.records import METRICS_FILE
from harness.signals import StopSignals
from harness.step_loop import StepLoop, StepParts
from harness.teacher_guard import TeacherCollapsed, TeacherGuard, TeacherWatch, watch_state_for
from harness.tracking import tracking_for
from harness.watchdog import Watchdog


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


def train(recipe: Recipe, args: argparse.Namespace, rt: Runtime, signals: StopSignals,
          resume_from: Optional[Path] = None, watchdog: Optional[Watchdog] = None,
          data_plan: Optional[DataPlan] = None) -> dict[str, Any]:
    """Run the recipe's epochs from ``resume_from`` (None: afresh) to the export; the run's state at the end.

    ``data_plan``: the shards as :func:`harness.run.preflight` checked them (None: checked here).

    Returns early, checkpointed, when asked to stop (``signals``, ``--stop-after-*``); raises
    :class:`TeacherCollapsed` when the teacher guard stops the run.
    """
    wall_start = time.time()
    watchdog = watchdog or Watchdog(None, rt.rank, rt.world_size, recipe.output)
    out = Path(recipe.output)
    m, d, rr = recipe.method, recipe.data, recipe.runtime

    # --- models, method, data, engine
    torch.manual_seed(rr.seed)  # identical initialisation on every rank
    distiller, pre = build_method(recipe)
    train_loader, val_loader = build_loaders(recipe, pre, rt.rank, rt.world_size, rt.device, rr.grad_accum, data_plan)
    if rt.is_main:  # only now: a run refused while its models or data were built leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(to_yaml(recipe))
    log = MetricsLog(out / METRICS_FILE, rt.is_main, tracking_for(recipe, rt.is_main))
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
                   **dict(zip(recipe.teacher_names, distiller.viewed_teachers()))}

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
    parts = StepParts(engine=engine, distiller=distiller, inner=inner, bias_opt=bias_opt, loader=train_loader,
                      schedule=schedule, lr0=lr0, steps_per_epoch=steps_per_epoch, ema=ema, teacher_guard=guard)
    loop = StepLoop(parts, recipe, rt, log, progress, signals, watchdog, args.stop_after_steps)
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
    return TeacherGuard(config, recipe.teacher_names, watch, freeze)


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

