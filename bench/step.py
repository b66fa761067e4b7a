"""The harness's training step against a hand-written PyTorch loop, in one process.

    python bench/step.py                                     # CPU defaults: test_resnet -> test_resnet, 64 px, batch 32
    python bench/step.py --student resnet18 --teacher resnet34 --batch 256 --size 224   # the GPU run

Both sides train the same models (student, teacher(s), projector; seeded alike) on the same
synthetic batch, already on the device:

* harness: the distiller and engine built exactly as ``harness/trainer.py`` builds them
  (``build.build_method``, ``optim.build_optimizer``, ``engine.build_engine``), stepped with the
  per-step work of ``step_loop.StepLoop.train_epoch`` (lr, engine forward/backward/step, the non-finite
  guard, on-device loss sums);
* plain: the same maths written directly: student and teacher ``forward_features``, projector,
  feature MSE (+ fused bias CE and the anchor gradient when adapting), ``torch.optim.SGD``,
  autocast bf16 on GPUs (fp32 on CPU), channels_last weights and input on GPUs.

For each ZeRO stage and teacher mode (frozen: SimKD, adapted: ATSC) the two are timed after a
warm-up in alternating rounds (plain, harness, plain, ...), which cancels slow drift of a shared
machine; the median round of each is reported, with their ratio (and the ratio of the best
rounds). Stages above 0 run in a process group of one (gloo on CPU, NCCL on GPU), as a
one-process launch would. On CUDA the
peak memory of each side's steps is reported too (each side's own: the other side's resident
weights and optimizer state are subtracted). One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.build import build_method  # noqa: E402
from harness.distributed import init_runtime  # noqa: E402
from harness.ema import StudentEma  # noqa: E402
from harness.engine import base_optimizer, build_engine  # noqa: E402
from harness.zero import deepspeed_config, init_distributed  # noqa: E402
from harness.guard import NonFiniteGuard  # noqa: E402
from harness.metrics import StepSums  # noqa: E402
from harness.method import align_maps, pooled  # noqa: E402
from harness.optim import LRSchedule, build_optimizer, set_lr, set_teachers_trainable  # noqa: E402
from harness.recipe import Recipe  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def recipe_for(args: argparse.Namespace, stage: int, adapted: bool) -> Recipe:
    """A recipe like the run's: the teachers' weights stay random (no file is read)."""
    return Recipe.model_validate({
        "output": "unused", "name": "bench-step",
        "data": {"train": "unused", "val": "unused", "num_classes": args.classes, "image_size": args.size,
                 "batch_size": args.batch},
        "student": {"model": args.student},
        "teachers": [{"model": t, "checkpoint": "unused.pth"} for t in args.teacher],
        "method": {"name": "atsc" if adapted else "simkd"},
        "optim": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"epochs": 1},
        "runtime": {"zero_stage": stage, "precision": args.precision, "compile": args.compile,
                    "ema": {"decay": args.ema} if args.ema else None},
    })


def deepspeed_engine(model, optimizer, rt, recipe: Recipe, tuned: bool):
    """DeepSpeed's engine at any stage (0 included): with the harness's tuned configuration, or with
    the configuration it had before (DeepSpeed's defaults: throughput timers, grad norm), for
    showing where the engine's cost went."""
    init_distributed("nccl" if rt.device.type == "cuda" else "gloo")  # as harness.zero.initialize: compiles nothing
    import deepspeed

    if tuned:
        config = deepspeed_config(rt, recipe.data.batch_size, recipe.runtime.grad_accum, recipe.optim.grad_clip)
    else:
        config = {"train_micro_batch_size_per_gpu": recipe.data.batch_size,
                  "gradient_accumulation_steps": recipe.runtime.grad_accum,
                  "zero_optimization": {"stage": rt.zero_stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0, "steps_per_print": 2**62, "wall_clock_breakdown": False}
        if rt.bf16:
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


class HarnessStep:
    """The per-micro-step work of ``step_loop.StepLoop.train_epoch``, on a fixed batch."""

    def __init__(self, recipe: Recipe, rt, x: torch.Tensor, y: torch.Tensor, adapted: bool, engine: str = "harness"):
        torch.manual_seed(recipe.runtime.seed)
        self.distiller, _ = build_method(recipe, load_weights=False)
        optimizer = build_optimizer(self.distiller.param_groups(), recipe.optim, recipe.method.anchor_weight)
        if engine == "harness":
            self.engine = build_engine(self.distiller, optimizer, rt, recipe.data.batch_size,
                                       recipe.runtime.grad_accum, recipe.optim.grad_clip, recipe.runtime.compile)
        else:
            self.engine = deepspeed_engine(self.distiller, optimizer, rt, recipe, tuned=engine == "deepspeed")
        self.inner = base_optimizer(self.engine)
        if adapted:  # what trainer.train does at the adaptation epoch
            self.inner.start_adaptation()
        set_teachers_trainable(self.inner, adapted)
        self.distiller.set_adapting(adapted)
        self.distiller.train()
        self.schedule, self.rt, self.x, self.y = LRSchedule(recipe.schedule), rt, x, y
        self.seed, self.log_every, self.steps = recipe.runtime.seed, recipe.runtime.log_every, 0
        self.guard = NonFiniteGuard(self.distiller, [self.inner], rt.device)
        self.sums = StepSums()
        torch.manual_seed(hash((self.seed, 0, 0, rt.rank)) & 0xFFFFFFFF)  # once, as the run seeds an epoch
        ema = recipe.runtime.ema
        self.ema = StudentEma.from_recipe(self.distiller.deployed(), rt.zero_stage, ema) if ema else None

    def __call__(self) -> None:
        set_lr(self.inner.param_groups, 0.01 * self.schedule.factor(self.steps / 1000))
        self.inner.track_anchor = self.distiller.adapting and (self.steps + 1) % self.log_every == 0
        loss, terms = self.engine(self.x, self.y)
        self.guard.observe(loss)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.guard.agree()
        self.engine.step()
        self.sums.add({"loss": loss, **terms})
        if boundary:
            self.sums.close_step(self.guard.bad)
            self.guard.stepped()
            if self.ema is not None:
                self.ema.update(self.steps + 1)
        self.steps += 1


class PlainStep:
    """The same method written as a plain PyTorch loop over the same (separately built) models."""

    def __init__(self, recipe: Recipe, rt, x: torch.Tensor, y: torch.Tensor, adapted: bool, channels_last: bool):
        torch.manual_seed(recipe.runtime.seed)
        d, _ = build_method(recipe, load_weights=False)
        self.student, self.teachers, self.views = d.student, list(d.teachers), list(d.views)
        self.projectors, self.classifiers = list(d.shared.projectors), list(d.shared.classifiers)
        self.taps = d.taps
        modules = [self.student, *self.teachers, *self.projectors]
        for m in modules:
            m.to(rt.device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        self.student.train()
        for p in self.projectors:
            p.train()
        for t in self.teachers:
            t.train(adapted)
            t.requires_grad_(adapted)
        params = [p for m in [self.student, *self.projectors] for p in m.parameters()]
        self.anchored = [p for t in self.teachers for p in t.parameters() if p.dim() > 1] if adapted else []
        self.anchors = [p.detach().clone() for p in self.anchored]
        if adapted:
            params += [p for t in self.teachers for p in t.parameters()]
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)  # as the harness
        self.w = recipe.method.anchor_weight
        self.adapted, self.rt, self.x, self.y = adapted, rt, x, y
        self.sums: dict[str, torch.Tensor] = {}
        self.forward = torch.compile(self._forward) if recipe.runtime.compile else self._forward

    def _forward(self) -> torch.Tensor:
        with self.rt.autocast():
            raw = self.student.forward_features(self.x)
            loss = torch.zeros((), device=self.x.device)
            for k, teacher in enumerate(self.teachers):
                with torch.set_grad_enabled(self.adapted):
                    h_t = self.taps[k](teacher, self.views[k](self.x))
                z = self.projectors[k](raw)
                z, h_t = align_maps(z, h_t)
                loss = loss + F.mse_loss(z.float(), h_t.float())
                if self.adapted:
                    c = self.classifiers[k]
                    logits = F.linear(pooled(h_t).detach().float(), c.weight.detach().float(), c.bias.float())
                    loss = loss + F.cross_entropy(logits, self.y)
        return loss

    def __call__(self) -> None:
        loss = self.forward()
        loss.backward()
        if self.anchored:  # ATSC's anchor: grad += 2 w (W - W0), where there is a gradient
            live = [(p, a) for p, a in zip(self.anchored, self.anchors) if p.grad is not None]
            torch._foreach_add_([p.grad for p, _ in live],
                                torch._foreach_sub([p.detach() for p, _ in live], [a for _, a in live]), alpha=2 * self.w)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sums["loss"] = self.sums.get("loss", 0) + loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per step over ``iters`` steps, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / iters


def profile(step: Callable[[], None], side: str, steps: int, device: torch.device, top: int = 12) -> None:
    """Where a side's host time goes: the costliest ops by self CPU time, and the host syncs per step."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    syncs = {e.key: e.count / steps for e in events
             if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")}
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    emit(kind="profile", side=side, steps=steps, syncs_per_step=syncs,
         top_self_cpu_ms_per_step={e.key: round(e.self_cpu_time_total / 1000 / steps, 3) for e in rows},
         ops_per_step=round(sum(e.count for e in events if e.key.startswith("aten::")) / steps, 1))


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(args: argparse.Namespace, rt, stage: int, adapted: bool) -> None:
    device = rt.device
    recipe = recipe_for(args, stage, adapted)
    rt = dataclasses.replace(rt, zero_stage=stage)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    base = allocated(device)
    plain = PlainStep(recipe, rt, x, y, adapted, channels_last)
    for _ in range(args.warmup):
        plain()
    sync(device)
    plain_static = allocated(device) - base  # its weights and optimizer state
    harness = HarnessStep(recipe, rt, x, y, adapted, args.engine)
    for _ in range(args.warmup):
        harness()
    sync(device)
    harness_static = allocated(device) - base - plain_static

    times: dict[str, list[float]] = {"plain": [], "harness": []}
    peaks: dict[str, int] = {"plain": 0, "harness": 0}
    for r in range(args.rounds):
        order = ("plain", "harness") if r % 2 == 0 else ("harness", "plain")
        for side in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[side].append(time_round(plain if side == "plain" else harness, args.iters, device))
            if device.type == "cuda":
                other = harness_static if side == "plain" else plain_static
                peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device) - base - other)
    # the loss sums are read once, at the end, as the run reads them every log_every steps
    finite = (all(torch.isfinite(v).all().item() for v in plain.sums.values())
              and all(math.isfinite(v) for v in harness.sums.means().values()))
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    if args.profile:
        profile(harness, "harness", args.profile, device)
        profile(plain, "plain", args.profile, device)
    record = {"stage": stage, "teacher": "adapted" if adapted else "frozen", "engine": args.engine, "ema": args.ema,
              "device": device.type,
              "precision": "bf16" if rt.bf16 else "fp32", "channels_last": channels_last, "compile": args.compile,
              "plain_img_s": round(ips["plain"], 1), "harness_img_s": round(ips["harness"], 1),
              "ratio": round(ips["harness"] / ips["plain"], 3),
              # on a shared machine the least-disturbed rounds are the better estimate
              "ratio_best_round": round(min(times["plain"]) / min(times["harness"]), 3),
              "plain_rounds_ms": [round(1000 * t, 1) for t in times["plain"]],
              "harness_rounds_ms": [round(1000 * t, 1) for t in times["harness"]], "losses_finite": finite}
    if device.type == "cuda":
        record.update(plain_peak_gb=round(peaks["plain"] / 2**30, 2), harness_peak_gb=round(peaks["harness"] / 2**30, 2))
    emit(**record)
    engine = harness.engine
    del harness, plain, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--teacher", action="append", default=None, help="repeat for several teachers (default test_resnet)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages")
    p.add_argument("--modes", default="frozen,adapted", help="comma-separated: frozen (SimKD), adapted (ATSC)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: on for CUDA")
    p.add_argument("--compile", action="store_true", help="runtime.compile for the harness side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per side, alternating")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: OpenMP threads spin-waiting on a busy 2-core host made "
                        "steps 10-30x slower and erratic)")
    p.add_argument("--engine", default="harness", choices=["harness", "deepspeed", "deepspeed-defaults"],
                   help="the harness side's engine: the harness's own (build_engine), DeepSpeed at every stage "
                        "with the harness's tuned config, or DeepSpeed as configured before the tuning")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps of each side")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="the harness side keeps a student EMA (runtime.ema) at this decay: its cost per step")
    args = p.parse_args(argv)
    args.teacher = args.teacher or ["test_resnet"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rt = init_runtime(args.precision, 0, args.threads)
    emit(kind="env", torch=torch.__version__, device=str(rt.device), threads=torch.get_num_threads(),
         gpu=torch.cuda.get_device_name() if rt.device.type == "cuda" else None, student=args.student,
         teachers=args.teacher, batch=args.batch, size=args.size)
    for stage in [int(s) for s in args.stages.split(",")]:
        for mode in args.modes.split(","):
            measure(args, rt, stage, mode == "adapted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
