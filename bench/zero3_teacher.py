"""ZeRO-3's step time and memory per rank against stages 0 and 2, with a big adapted teacher.

    .venv/bin/python bench/zero3_teacher.py                 # CPU: 2 gloo processes, ViT-B/16 -> ResNet-50, 64 px
    .venv/bin/python bench/zero3_teacher.py --json out.json --markdown out.md
    python bench/zero3_teacher.py --teacher vit_huge_patch14_clip_224 --size 224 --batch 64 --world 1  # one GPU

Stage 3 is for teachers too large to keep whole per GPU (``recipes/imagenet-vith-resnet50-zero3.yaml``,
a ViT-H/14 into a ResNet-50). This measures what it costs on such a workload: for each stage it
spawns ``--world`` fresh processes (gloo on CPU, NCCL on GPUs; no DeepSpeed state carries over
between stages), builds the harness's own distiller, optimizer and engine for ATSC with the
teacher adapting (``harness.build``, ``harness.optim``, ``harness.engine``, random weights: no
file is read), runs ``--warmup`` steps, times ``--steps`` steps, then counts every tensor storage
each rank holds after the backward of one more step with ``bench/zero_memory.py``'s ``measure``
(weights, gradients, optimizer state, W0, buffers, buckets); at stage 3 it also reads the weights
held whole between that forward and its backward. Each rank sees the same batches at every stage,
so the stages' losses must agree (fp32: to rounding); the largest relative difference from stage 0
is reported beside the times. Each step is timed on the wall clock and in the process's own CPU
time, which on a shared host is the steadier figure. ``--variant`` adds stage-3 runs with other
DeepSpeed settings (``zero_optimization`` keys, or submodules gathered whole as "leaf" modules).

``run(Config(...))`` returns the same dictionary the CLI writes with ``--json`` (one entry per
stage, and the ratios), so other benchmarks (the GPU suite) can call it with their own settings.
On CPU the default teacher is a ViT-B/16 standing in for the recipe's ViT-H/14 (same blocks,
narrower, fewer): two ranks at stage 0 with the ViT-H would hold 2 x 10 GiB. On a GPU give
``--teacher vit_huge_patch14_clip_224 --size 224`` and ``--world 1`` (one GPU: a world of one).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.build import build_method  # noqa: E402
from harness.distributed import init_runtime, shutdown  # noqa: E402
from harness.engine import base_optimizer, build_engine  # noqa: E402
from harness.optim import build_optimizer, peak_lr, set_lr  # noqa: E402
from harness.recipe import Recipe  # noqa: E402
from zero_memory import KINDS, _free_port, measure, start_adapting  # noqa: E402


@dataclasses.dataclass
class Config:
    """One benchmark: the workload (models, image size, batch per rank) and what to time."""

    student: str = "resnet50"
    teacher: str = "vit_base_patch16_224"
    size: int = 64
    batch: int = 4                      # images per rank
    steps: int = 5                      # timed steps per stage
    warmup: int = 2
    stages: tuple[int, ...] = (0, 2, 3)
    world: int = 2                      # processes per stage (one per GPU; gloo processes on CPU)
    classes: int = 1000
    optim: str = "sgd"                  # the recipe's (a ResNet-50 student: the paper's SGD)
    precision: str = "auto"             # auto: bf16 autocast on GPUs, fp32 on CPU
    threads: int = 1                    # torch threads per CPU process
    teacher_kwargs: Optional[dict[str, Any]] = None  # None: img_size=size for patch models (ViTs)
    # extra stage-3 runs, by name: {"zero": {DeepSpeed zero_optimization keys}, "leaf": [submodule
    # paths of the distiller gathered whole, as DeepSpeed "leaf" modules]}
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def runs(self) -> list[str]:
        """The runs' names, in order: each stage, then each stage-3 variant."""
        return [str(s) for s in self.stages] + list(self.variants)

    def teacher_model_kwargs(self) -> dict[str, Any]:
        if self.teacher_kwargs is not None:
            return dict(self.teacher_kwargs)
        # a ViT's position embeddings are built for its image size; at a benchmark's small
        # images it is built for those instead (the same blocks, fewer tokens)
        return {"img_size": self.size} if "patch" in self.teacher else {}


def bench_recipe(cfg: Config, stage: int) -> Recipe:
    """ATSC with the teacher adapting from the first step, as the recipe trains it."""
    optim = {"name": cfg.optim, "lr": 0.01, "weight_decay": 1e-4}
    if cfg.optim == "sgd":
        optim["momentum"] = 0.9
    return Recipe.model_validate({
        "name": "zero3-teacher", "output": "unused",
        "data": {"train": "unused", "val": "unused", "num_classes": cfg.classes,
                 "image_size": cfg.size, "batch_size": cfg.batch},
        "student": {"model": cfg.student},
        "teachers": [{"model": cfg.teacher, "checkpoint": "random-init.pth",
                      "model_kwargs": cfg.teacher_model_kwargs()}],
        "method": {"name": "atsc", "anchor_weight": 10.0, "adapt_after": 0},
        "optim": optim,
        "schedule": {"epochs": 1},
        "runtime": {"precision": cfg.precision, "zero_stage": stage, "threads": cfg.threads},
    })


def _batches(cfg: Config, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n`` batches at every stage; each rank draws its own from its rank's seed."""
    rank = int(os.environ.get("RANK", "0"))
    g = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=g).to(device),
             torch.randint(0, cfg.classes, (cfg.batch,), generator=g).to(device)) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gathered_bytes(model: torch.nn.Module) -> int:
    """ZeRO-3: bytes of partitioned weights held whole right now (gathered and not yet released).

    Read between the forward and the backward, where it peaks: DeepSpeed keeps a gathered weight
    until its next use is more than ``stage3_max_reuse_distance`` elements of weights away
    (default 1e9), and every weight's next use is its backward, so a model of fewer elements
    stays gathered whole through the forward.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel * p.element_size() for p in model.parameters()
               if not getattr(p, "ds_persist", False) and getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE)


def _apply_variant(variant: dict[str, Any], distiller: torch.nn.Module) -> None:
    """A stage-3 variant's DeepSpeed settings, before the engine is built (its hooks are set then)."""
    from harness import zero

    if variant.get("zero"):
        base = zero.deepspeed_config

        def config(*args, **kwargs) -> dict:
            c = base(*args, **kwargs)
            c["zero_optimization"].update(variant["zero"])
            return c

        zero.deepspeed_config = config
    if variant.get("leaf"):
        from deepspeed.utils import set_z3_leaf_module

        for path in variant["leaf"]:
            set_z3_leaf_module(distiller.get_submodule(path), True)


def _rank_main(rank: int, world: int, port: int, name: str, cfg: Config, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(cfg.threads))
    import torch.distributed as dist

    stage = 3 if name in cfg.variants else int(name)
    recipe = bench_recipe(cfg, stage)
    rt = init_runtime(cfg.precision, stage, threads=cfg.threads)
    try:
        torch.manual_seed(recipe.runtime.seed)  # identical initialisation on every rank, at every stage
        distiller, _ = build_method(recipe, load_weights=False)
        optimizer = build_optimizer(distiller.param_groups(), recipe.optim, recipe.method.anchor_weight)
        if name in cfg.variants:
            _apply_variant(cfg.variants[name], distiller)
        started = time.perf_counter()
        engine = build_engine(distiller, optimizer, rt, cfg.batch, 1, None)
        build_s = time.perf_counter() - started
        start_adapting(engine, distiller)
        set_lr(base_optimizer(engine).param_groups, peak_lr(recipe.optim, cfg.batch * world))
        batches = _batches(cfg, cfg.warmup + cfg.steps + 1, rt.device)
        losses: list[torch.Tensor] = []
        cuda = rt.device.type == "cuda"

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            loss, _ = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())

        for x, y in batches[:cfg.warmup]:
            step(x, y)
        times, cpu_times = [], []
        _sync(rt.device)
        dist.barrier()
        if cuda:
            torch.cuda.reset_peak_memory_stats(rt.device)
        for x, y in batches[cfg.warmup:-1]:
            t, c = time.perf_counter(), time.process_time()
            step(x, y)
            _sync(rt.device)  # per step: the figure is the step, not how far the host ran ahead
            times.append(time.perf_counter() - t)
            # the process's own CPU time (all its threads): on a shared host, the work a step takes
            # without the time it waited for a core or a peer
            cpu_times.append(time.process_time() - c)
        # the snapshot: optimizer state (from the steps above) and this backward's gradients at once
        x, y = batches[-1]
        loss, _ = engine(x, y)
        gathered = gathered_bytes(distiller) if stage == 3 else None
        engine.backward(loss)
        losses.append(loss.detach())
        del x, y, loss
        held = measure(engine, distiller, stage)
        engine.step()
        record = {
            "run": name, "stage": stage, "rank": rank, "build_s": round(build_s, 2),
            "step_s": [round(t, 4) for t in times], "median_step_s": statistics.median(times),
            "cpu_s": [round(t, 4) for t in cpu_times], "median_cpu_s": statistics.median(cpu_times),
            "losses": [v.item() for v in losses], "held_bytes": held,
            "total_bytes": sum(held[k] for k in KINDS), "gathered_after_forward_bytes": gathered,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in distiller.parameters() if p.requires_grad),
            "device": str(rt.device), "bf16": rt.bf16,
        }
        if cuda:
            record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(rt.device)
        Path(out, f"{name}-rank{rank}.json").write_text(json.dumps(record))
    finally:
        shutdown()


def run_stage(name: str, cfg: Config) -> list[dict]:
    """One run (a stage, or a stage-3 variant) in ``cfg.world`` fresh processes; one record per rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(cfg.world, _free_port(), name, cfg, out), nprocs=cfg.world,
                           start_method="spawn", join=True)
        return [json.loads(Path(out, f"{name}-rank{r}.json").read_text()) for r in range(cfg.world)]


def summarise(cfg: Config, ranks: dict[str, list[dict]]) -> dict[str, Any]:
    """Per stage: the step (the slowest rank's median: every rank waits for it), memory, loss agreement."""
    stages: dict[str, Any] = {}
    for name, records in ranks.items():
        stages[name] = {
            "step_s": max(r["median_step_s"] for r in records),
            "images_per_s": cfg.batch * cfg.world / max(r["median_step_s"] for r in records),
            "cpu_s_per_rank": [round(r["median_cpu_s"], 4) for r in records],
            "held_mib_per_rank": [round(r["total_bytes"] / 2**20, 1) for r in records],
            "held_by_kind_mib_rank0": {k: round(v / 2**20, 1) for k, v in records[0]["held_bytes"].items()},
            "max_rss_mib_per_rank": [round(r["max_rss_bytes"] / 2**20, 1) for r in records],
            "gathered_after_forward_mib_per_rank": [None if r["gathered_after_forward_bytes"] is None
                                                    else round(r["gathered_after_forward_bytes"] / 2**20, 1)
                                                    for r in records],
            "losses_rank0": records[0]["losses"],
            "ranks": records,
        }
        if "cuda_peak_bytes" in records[0]:
            stages[name]["cuda_peak_gib_per_rank"] = [round(r["cuda_peak_bytes"] / 2**30, 2) for r in records]
    base = stages.get("0")
    for key, s in stages.items():
        if base is not None:
            s["step_vs_stage0"] = round(s["step_s"] / base["step_s"], 3)
            s["held_vs_stage0"] = round(max(s["held_mib_per_rank"]) / max(base["held_mib_per_rank"]), 3)
            s["loss_max_rel_diff_vs_stage0"] = max(
                abs(a - b) / max(abs(b), 1e-12) for a, b in zip(s["losses_rank0"], base["losses_rank0"]))
        if base is not None:
            s["cpu_vs_stage0"] = round(max(s["cpu_s_per_rank"]) / max(base["cpu_s_per_rank"]), 3)
        if "2" in stages:
            s["step_vs_stage2"] = round(s["step_s"] / stages["2"]["step_s"], 3)
            s["cpu_vs_stage2"] = round(max(s["cpu_s_per_rank"]) / max(stages["2"]["cpu_s_per_rank"]), 3)
    first = next(iter(ranks.values()))[0]
    return {"config": dataclasses.asdict(cfg), "device": first["device"], "bf16": first["bf16"],
            "trainable_params": first["trainable"], "torch": torch.__version__, "stages": stages}


def run(cfg: Config) -> dict[str, Any]:
    """Every stage of ``cfg.stages`` and every variant, each in fresh processes, and their comparison."""
    return summarise(cfg, {name: run_stage(name, cfg) for name in cfg.runs()})


def _per_rank(values: list, fmt: str = "{:,.1f}") -> str:
    return " / ".join("-" if v is None else fmt.format(v) for v in values)


def markdown(result: dict[str, Any]) -> str:
    """The table of docs/performance.md, 'ZeRO-3 with a big teacher': stage, step, ratios to stages 0 and 2, memory per rank."""
    cfg = result["config"]
    gpu = "cuda_peak_gib_per_rank" in next(iter(result["stages"].values()))
    lines = [f"ATSC, {cfg['teacher']} (adapted) -> {cfg['student']}, {cfg['size']} px, batch {cfg['batch']} per rank, "
             f"{cfg['world']} x {result['device']}, {'bf16' if result['bf16'] else 'fp32'}, {cfg['optim']}, "
             f"{result['trainable_params'] / 1e6:.1f} M trainable, median of {cfg['steps']} steps (step s: wall clock, "
             f"the slowest rank; CPU s: the process's CPU time, the busiest rank)",
             "",
             "| ZeRO | step s | vs stage 0 | vs stage 2 | CPU s per step | vs stage 0 | vs stage 2 | held MiB per rank "
             "| vs stage 0 | gathered after forward MiB | " + ("CUDA peak GiB" if gpu else "peak RSS MiB")
             + " | loss diff vs stage 0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for stage, s in result["stages"].items():
        peak = (_per_rank(s["cuda_peak_gib_per_rank"], "{:.2f}") if gpu else _per_rank(s["max_rss_mib_per_rank"], "{:,.0f}"))
        cells = [stage, f"{s['step_s']:.3f}", f"{s.get('step_vs_stage0', nan):.2f}", f"{s.get('step_vs_stage2', nan):.2f}",
                 f"{max(s['cpu_s_per_rank']):.3f}", f"{s.get('cpu_vs_stage0', nan):.2f}", f"{s.get('cpu_vs_stage2', nan):.2f}",
                 _per_rank(s["held_mib_per_rank"]), f"{s.get('held_vs_stage0', nan):.3f}",
                 _per_rank(s["gathered_after_forward_mib_per_rank"]), peak,
                 f"{s.get('loss_max_rel_diff_vs_stage0', nan):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, argparse.Namespace]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default=d.student, help="timm name")
    p.add_argument("--teacher", default=d.teacher, help="timm name (adapted)")
    p.add_argument("--size", type=int, default=d.size, help="image side, px")
    p.add_argument("--batch", type=int, default=d.batch, help="images per rank")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--stages", default=",".join(map(str, d.stages)), help="comma-separated ZeRO stages")
    p.add_argument("--world", type=int, default=None, help="processes per stage (default: 2 on CPU, 1 on a GPU host)")
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--optim", choices=["sgd", "adamw"], default=d.optim)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per CPU process")
    p.add_argument("--teacher-kwargs", type=json.loads, default=None, metavar="JSON",
                   help="timm kwargs for the teacher (default: {\"img_size\": SIZE} for ViTs)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help='an extra stage-3 run, e.g. reuse0=\'{"zero": {"stage3_max_reuse_distance": 0}}\' or '
                        'leaf=\'{"leaf": ["student", "shared"]}\' (distiller submodules gathered whole)')
    p.add_argument("--json", metavar="FILE", help="write the result here")
    p.add_argument("--markdown", metavar="FILE", help="write the table here")
    a = p.parse_args(argv)
    world = a.world or (1 if torch.cuda.is_available() else 2)
    cfg = Config(student=a.student, teacher=a.teacher, size=a.size, batch=a.batch, steps=a.steps, warmup=a.warmup,
                 stages=tuple(int(s) for s in a.stages.split(",")), world=world, classes=a.classes, optim=a.optim,
                 precision=a.precision, threads=a.threads, teacher_kwargs=a.teacher_kwargs,
                 variants={k: json.loads(v) for k, v in (item.split("=", 1) for item in a.variant)})
    return cfg, a


def main(argv: Optional[list[str]] = None) -> int:
    cfg, args = parse_args(argv)
    result = run(cfg)
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
