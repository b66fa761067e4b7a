"""The whole pipeline on ImageNet-like shards: images/s and the share of time spent waiting for data.

    python bench/end_to_end.py                                   # CPU defaults: test_resnet -> test_resnet, 64 px
    python bench/end_to_end.py --student resnet18 --teacher resnet34 --size 224 --batch 256 \\
        --images 20000 --classes 100 --workers 12 --decode gpu          # the GPU run

Generates 500x375 JPEGs (quality 90, as ``bench/loader.py`` does) and writes them as shards with
``shards.write``, saves a randomly initialised teacher as its checkpoint, then runs the real
entry point (``accelerate launch harness/run.py`` on a generated recipe: ATSC, teacher adapted)
for ``--epochs`` epochs. Reads the run's ``metrics.jsonl``: every ``train`` record carries
``images_per_s`` and ``data_wait`` (the share of the window spent waiting for the loader); the
first record (start-up, compilation, the shuffle buffer filling) is reported apart. Prints one
JSON line per record and a summary. ``--decode`` is passed as ``--set data.decode=...`` only if
given. ``--data DIR`` keeps the shards and teacher for the next run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loader import make_tree  # noqa: E402
from shards.layout import move_flat_layout  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def prepare_shards(data: Path, images: int, val_images: int, classes: int) -> Path:
    """``data/shards`` with train and val splits, written unless a previous run left them."""
    out = data / "shards"
    move_flat_layout(out)  # shards kept from before the per-split folders
    info = out / "_info.json"
    if info.is_file():
        splits = json.loads(info.read_text())["splits"]
        if sum(splits["train"]["shard_lengths"]) == images and sum(splits["val"]["shard_lengths"]) == val_images:
            return out
    tree = data / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    make_tree(tree, images, classes)
    make_tree(data / "val-tree", val_images, classes)
    (data / "val-tree" / "train").rename(tree / "val")
    shutil.rmtree(data / "val-tree")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "shards.write", str(tree), "--out", str(out), "--shard-size", "250",
                    "--workers", str(min(8, os.cpu_count() or 1))], check=True, cwd=ROOT, capture_output=True)
    shutil.rmtree(tree)
    return out


def write_teacher(path: Path, model: str, classes: int) -> None:
    """A randomly initialised teacher checkpoint: its accuracy does not change the step's cost."""
    if path.is_file():
        return
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=classes)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def recipe(args: argparse.Namespace, shards: Path, teacher: Path, out: Path) -> dict:
    return {
        "name": "bench-end-to-end", "output": str(out),
        "data": {"train": str(shards / "train"), "val": str(shards / "val"),
                 "num_classes": args.classes, "image_size": args.size, "batch_size": args.batch,
                 "workers": args.workers, "shuffle_buffer": min(2000, args.images)},
        "student": {"model": args.student},
        "teachers": [{"model": args.teacher, "checkpoint": str(teacher)}],
        "method": {"name": "atsc"},
        "optim": {"lr": 0.01},
        "schedule": {"epochs": args.epochs},
        "runtime": {"zero_stage": args.zero_stage, "log_every": args.log_every, "precision": args.precision,
                    "compile": args.compile},
    }


def run(args: argparse.Namespace, recipe_path: Path) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "harness" / "run.py"), str(recipe_path)]
    if args.decode:
        cmd += ["--set", f"data.decode={args.decode}"]
    for assignment in args.set:
        cmd += ["--set", assignment]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"harness/run.py failed with exit status {result.returncode}")


def report(out: Path) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for r in train:
        emit(kind="window", step=r.get("step"), images_per_s=r["images_per_s"], data_wait=r["data_wait"],
             memory_gb=r.get("memory_gb"))
    summary = json.loads((out / "summary.json").read_text())
    steady = train[1:] or train
    emit(kind="summary", windows=len(train), first_window_images_per_s=train[0]["images_per_s"] if train else None,
         steady_images_per_s=round(statistics.median(r["images_per_s"] for r in steady), 1) if steady else None,
         steady_data_wait=round(statistics.median(r["data_wait"] for r in steady), 4) if steady else None,
         run_images_per_s=round(summary["images_per_s"], 1), wall_time_s=round(summary["wall_time_s"], 1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--teacher", default="test_resnet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=640, help="train images generated")
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--log-every", type=int, default=4, help="optimizer steps per metrics window")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--decode", choices=["cpu", "gpu"], help="passed as --set data.decode=...; omitted: the recipe default")
    p.add_argument("--data", type=Path, help="keep shards and the teacher checkpoint here and reuse them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override passed on to harness/run.py (repeatable), e.g. data.augment.mixup=0.8")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        shards = prepare_shards(data, args.images, args.val_images, args.classes)
        teacher = data / f"teacher-{args.teacher}-{args.classes}.safetensors"
        write_teacher(teacher, args.teacher, args.classes)
        out = Path(tmp) / "run"
        recipe_path = Path(tmp) / "bench-end-to-end.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe(args, shards, teacher, out)))
        emit(kind="env", student=args.student, teacher=args.teacher, size=args.size, batch=args.batch,
             images=args.images, workers=args.workers, decode=args.decode, zero_stage=args.zero_stage, set=args.set,
             cpus=os.cpu_count(), load_avg=round(os.getloadavg()[0], 2))
        run(args, recipe_path)
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
