"""Bytes each rank holds under ZeRO stages 0-3, and a recipe's activation memory.

Per-rank table (the default)::

    .venv/bin/python bench/zero_memory.py [--stages 0 1 2 3] [--student resnet18]
        [--teachers resnet34 resnet50] [--image-size 64] [--batch 4] [--num-classes 1000]

For each stage it spawns two CPU processes (gloo), builds the harness's own distiller,
optimizer and DeepSpeed engine (``harness.build``, ``harness.optim``, ``harness.engine``) for
ATSC with every teacher adapting, runs one real training step, then the forward and backward of
a second, and counts, per rank, the bytes of every tensor storage it holds, each storage once:

- params: the model's weights this rank holds (ZeRO-3: its partitions ``ds_tensor``, plus the
  small parameters DeepSpeed keeps whole on every rank, shown as "of which whole");
- master: the fp32 partition the ZeRO-1/2 optimizer steps (a copy of the weights; at ZeRO-3 in
  fp32 it is the partition itself, so it is counted under params);
- grads: what the engine keeps of the gradients at that point (stage 0: ``.grad``, views of
  DDP's buckets in the harness's DDPEngine; stages 1-3: the reduced partition buffers);
- optim: optimizer state (SGD momentum, AdamW moments), W0 excluded;
- anchor: ATSC's reference weights W0, which live in the optimizer state (harness/optim.py);
- buffers: module buffers (BatchNorm running statistics), never partitioned;
- buckets: DeepSpeed's gradient-reduction buckets (``reduce_bucket_size`` elements, whatever
  the model's size), shown apart;
- ema: the student EMA (``runtime.ema``, harness/ema.py) of the deployed path, shown apart: what
  a run with an EMA holds on top of the total (stage 3: the rank's partitions);
- other: any other live tensor (found by the garbage collector), so nothing escapes the count.

The second measurement is the snapshot: optimizer state exists (from step 1) and gradients
exist (from this backward), so every persistent kind of state is there at once. Models start
from random weights: memory does not depend on their values. Models, ZeRO configuration and
losses are the harness's; only the data is random.

A recipe's activation memory (one process; on a GPU, the recipe's precision)::

    python bench/zero_memory.py --recipe recipes/imagenet-convnext-vit.yaml [--batch 64]

builds the recipe's models (random weights, no files needed) at its batch size and ZeRO stage
in a world of one, runs two ATSC steps with every teacher adapting and reports the bytes saved
for backward (autograd's saved tensors, counted by storage) and, on CUDA, the allocator's
memory before the step and its peak during it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.build import build_method  # noqa: E402
from harness.distributed import init_runtime, shutdown  # noqa: E402
from harness.ema import StudentEma  # noqa: E402
from harness.engine import base_optimizer, build_engine  # noqa: E402
from harness.optim import build_optimizer, peak_lr, set_lr, set_teachers_trainable  # noqa: E402
from harness.recipe import Recipe, load_recipe  # noqa: E402

KINDS = ("params", "master", "grads", "optim", "anchor", "buffers")  # model states, in the total
EXTRA = ("buckets", "ema", "other")  # shown, not in the total


# ----------------------------------------------------------------------------- counting


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor inside nested lists, tuples, dicts and DeepSpeed's bucket records."""
    if depth > 4 or value is None:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif hasattr(value, "buffer"):  # IPGBucket / IPGBucketZ3: the buffer is the memory
        yield from _tensors(value.buffer, depth + 1)


class Ledger:
    """Bytes by kind, each tensor storage counted once, by the first kind that claims it.

    Storages, not tensors: ZeRO's parameters and gradients are views into flat buffers, and a
    view holds its whole buffer alive.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {k: 0 for k in KINDS + EXTRA}

    def claim(self, kind: str, tensors: Iterable[torch.Tensor]) -> int:
        added = 0
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(ptr)
            added += storage.nbytes()
        self.bytes[kind] += added
        return added


def measure(engine, distiller, stage: int, ema: Optional[StudentEma] = None) -> dict[str, int]:
    """The bytes this rank holds now, by kind (see the module docstring)."""
    inner = base_optimizer(engine)
    zero = engine.optimizer if stage > 0 else None
    ledger = Ledger()
    states = list(inner.state.values())
    ledger.claim("anchor", (s["anchor"] for s in states if "anchor" in s))
    ledger.claim("optim", (t for s in states for k, v in s.items() if k != "anchor" for t in _tensors(v)))
    params = list(distiller.parameters())
    if stage == 3:
        ledger.claim("params", (p.ds_tensor for p in params))
        whole = ledger.claim("params", (p.data for p in params if getattr(p, "ds_persist", False)))
        ledger.claim("params", (p.data for p in params))  # anything gathered and not released
    else:
        whole = 0
        ledger.claim("params", (p.data for p in params))
    if zero is not None:
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            ledger.claim("master", _tensors(getattr(zero, name, None)))
    ledger.claim("grads", (p.grad for p in params if p.grad is not None))
    if zero is not None:
        attrs = vars(zero)
        masters = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
                   for t in _tensors(attrs.get(name))]
        ledger.claim("grads", (t.grad for t in masters if t.grad is not None))
        ledger.claim("grads", (t for name, v in attrs.items() if "grad" in name.lower() for t in _tensors(v)))
        ledger.claim("buckets", (t for name, v in attrs.items() if "ipg" in name.lower() or "bucket" in name.lower()
                                 for t in _tensors(v)))
    ledger.claim("buffers", distiller.buffers())
    if ema is not None:
        ledger.claim("ema", ema.shadow)
    gc.collect()
    ledger.claim("other", (o for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    return {**ledger.bytes, "params_whole": whole}


# ----------------------------------------------------------------------------- the ZeRO table


def bench_recipe(args: argparse.Namespace, stage: int) -> Recipe:
    """ATSC with every teacher adapting from the first step, fp32, at the given stage.

    The teachers' ``checkpoint`` is never read (``build_method(load_weights=False)``): the
    schema requires a source, and the memory does not depend on the weights.
    """
    return Recipe.model_validate({
        "name": "zero-memory", "output": "unused",
        "data": {"train": "unused", "val": "unused", "num_classes": args.num_classes,
                 "image_size": args.image_size, "batch_size": args.batch},
        "student": {"model": args.student},
        "teachers": [{"model": t, "checkpoint": "random-init.pth"} for t in args.teachers],
        "method": {"name": "atsc", "anchor_weight": 10.0},
        "optim": {"name": args.optim, "lr": 0.01},
        "schedule": {"epochs": 1},
        "runtime": {"precision": "fp32", "zero_stage": stage, "threads": 1},
    })


def start_adapting(engine, distiller) -> None:
    """What harness/run.py does when adaptation starts: fresh teacher state, W0 taken at step 1."""
    inner = base_optimizer(engine)
    inner.start_adaptation()
    set_teachers_trainable(inner, True)
    distiller.set_adapting(True)
    distiller.train()


def _batch(recipe: Recipe, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = recipe.data
    x = torch.randn(d.batch_size, 3, d.image_size, d.image_size, generator=g)
    y = torch.randint(0, d.num_classes, (d.batch_size,), generator=g)
    return x.to(device), y.to(device)


def _rank_main(rank: int, world: int, port: int, stage: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    recipe = bench_recipe(args, stage)
    rt = init_runtime("fp32", stage, threads=1)
    try:
        torch.manual_seed(recipe.runtime.seed)  # identical initialisation on every rank
        distiller, _ = build_method(recipe, load_weights=False)
        optimizer = build_optimizer(distiller.param_groups(), recipe.optim, recipe.method.anchor_weight)
        engine = build_engine(distiller, optimizer, rt, recipe.data.batch_size, 1, None)
        start_adapting(engine, distiller)
        ema = StudentEma(distiller.deployed(), stage)
        set_lr(base_optimizer(engine).param_groups, peak_lr(recipe.optim, recipe.data.batch_size * world))
        losses = []
        for step in range(2):
            x, y = _batch(recipe, 1000 * step + rank, rt.device)
            loss, _ = engine(x, y)
            engine.backward(loss)
            losses.append(loss.item())
            del x, y, loss
            if step == 1:
                snapshot = measure(engine, distiller, stage, ema)
            engine.step()
            ema.update(step + 1)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in distiller.parameters() if p.requires_grad)
        Path(out, f"stage{stage}-rank{rank}.json").write_text(
            json.dumps({**snapshot, "losses": losses, "trainable": trainable}))
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(stage: int, args: argparse.Namespace, world: int = 2) -> list[dict]:
    """One fresh 2-process group per stage: no DeepSpeed state carries over between stages."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, _free_port(), stage, args, out), nprocs=world,
                           start_method="spawn", join=True)
        return [json.loads(Path(out, f"stage{stage}-rank{r}.json").read_text()) for r in range(world)]


def _mb(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def table(results: dict[int, list[dict]]) -> str:
    """Per stage and rank, MiB by kind; then total(stage 3)/total(stage 0) per rank."""
    head = ["stage", "rank", *KINDS, "total", *EXTRA, "whole"]
    lines = ["".join(f"{h:>9}" for h in head), "-" * 9 * len(head)]
    for stage, ranks in sorted(results.items()):
        for rank, r in enumerate(ranks):
            total = sum(r[k] for k in KINDS)
            cells = [f"{stage:9d}", f"{rank:9d}", *(_mb(r[k]) for k in KINDS), _mb(total), *(_mb(r[k]) for k in EXTRA),
                     _mb(r["params_whole"])]
            lines.append("".join(cells))
    if 0 in results:
        base = [sum(r[k] for k in KINDS) for r in results[0]]
        for stage in sorted(s for s in results if s):
            ratios = [sum(r[k] for k in KINDS) / b for r, b in zip(results[stage], base)]
            lines.append(f"total(stage {stage}) / total(stage 0), per rank: " + ", ".join(f"{x:.3f}" for x in ratios))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a recipe's activations


class SavedBytes:
    """Bytes autograd saves for backward, by storage, while active (fp32 and bf16 alike)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr():
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def recipe_activations(path: str, batch: Optional[int], overrides: list[str]) -> dict[str, Any]:
    """Two ATSC steps of a recipe's models (random weights) at its batch, in a world of one."""
    overrides = overrides + ([f"data.batch_size={batch}"] if batch else [])
    recipe = load_recipe(path, overrides, check_files=False)
    for teacher in recipe.teachers:  # never read (random weights); the preprocessing is the recipe's
        if teacher.checkpoint:
            teacher.checkpoint = "random-init.pth"
    if recipe.method.name == "atsc":
        recipe.method.adapt_after = 0
    rt = init_runtime(recipe.runtime.precision, recipe.runtime.zero_stage, recipe.runtime.threads)
    try:
        torch.manual_seed(0)
        distiller, _ = build_method(recipe, load_weights=False)
        optimizer = build_optimizer(distiller.param_groups(), recipe.optim, recipe.method.anchor_weight)
        engine = build_engine(distiller, optimizer, rt, recipe.data.batch_size, 1, recipe.optim.grad_clip)
        if recipe.method.name == "atsc":
            start_adapting(engine, distiller)
        cuda = rt.device.type == "cuda"
        result: dict[str, Any] = {"recipe": path, "batch": recipe.data.batch_size, "zero_stage": rt.zero_stage,
                                  "bf16": rt.bf16, "device": str(rt.device),
                                  "trainable_params": sum(getattr(p, "ds_numel", p.numel())
                                                          for p in distiller.parameters() if p.requires_grad)}
        for step in range(2):
            x, y = _batch(recipe, step, rt.device)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            with SavedBytes() as saved, rt.autocast():
                loss, _ = engine(x, y)
            engine.backward(loss)
            engine.step()
            result[f"step{step}_saved_for_backward"] = saved.total
            if cuda:
                torch.cuda.synchronize()
                result[f"step{step}_allocated_before"] = before
                result[f"step{step}_peak"] = torch.cuda.max_memory_allocated()
                result[f"step{step}_allocated_after"] = torch.cuda.memory_allocated()
        return result
    finally:
        shutdown()


# ----------------------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=range(4))
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teachers", nargs="+", default=["resnet34", "resnet50"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=None, help="images per rank (default 4; --recipe: the recipe's)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--optim", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    p.add_argument("--recipe", metavar="YAML", help="measure this recipe's activations instead (one process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--recipe: override a recipe key")
    args = p.parse_args(argv)
    if args.recipe:
        result = recipe_activations(args.recipe, args.batch, args.set)
        print(json.dumps(result, indent=1))
    else:
        args.batch = args.batch or 4
        result = {stage: run_stage(stage, args) for stage in args.stages}
        print(f"MiB per rank, 2 CPU processes, ATSC {' + '.join(args.teachers)} -> {args.student}, "
              f"{args.num_classes} classes, {args.image_size} px, batch {args.batch}/rank, {args.optim}, fp32")
        print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
