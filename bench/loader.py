"""Loader throughput per worker process against a bare PIL loop over the same JPEGs.

    python bench/loader.py [--images 1200] [--max-size 320] [--workers 1] [--repeats 5] [--data DIR]

Generates ImageNet-like JPEGs (500x375, quality 90, smooth content plus noise) and writes them
as shards twice (as they are, and pre-resized with ``--max-size``); ``--data DIR`` keeps them
for the next run. Then, for each shard set, ``--repeats`` interleaved rounds of:

(a) the bare loop: one process decodes exactly the JPEG bytes the shards hold (read into
    memory beforehand) and applies the reference torchvision pipeline, ``Image.open`` +
    ``convert("RGB")`` + RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor;
(b) this harness's training loader with ``--workers`` worker processes: tar reading, shuffle
    buffer, per-sample seeding, decode, the same crop/flip distribution, uint8 batches handed to
    the training process through shared memory.

Both sides do the same work per image: decode, RandomResizedCrop(224), flip, uint8 CHW tensor.
Fairness: a warm-up round first (page cache, lazy imports); the loader's first batch (worker
start-up, shuffle buffer fill) is left out of its wall rate; the bare loop and the loader
alternate which goes first; the main process only receives the loader's uint8 batches (their
normalisation is the training process's work, on the GPU there), so on a 2-core host it does
not compete with the worker it measures. Other processes may share the host, so each round
reports wall-clock rates and CPU-time rates (images per CPU second: the bare loop's own process
time, the workers' from ``/proc/<pid>/stat``, both steady-state), and the summary gives
medians over rounds of rates and of per-round loader/bare ratios. The target is a ratio of at
least 0.9. ``--profile N`` adds, per shard set, the N most expensive functions of one loader
worker's work run in-process under cProfile.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from harness.data import EpochLoader, Preprocess, ShardStream, read_samples, select_shards, train_transform  # noqa: E402
from shards.layout import move_flat_layout  # noqa: E402

PRE = Preprocess(image_size=224, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SCALE, RATIO, HFLIP = (0.08, 1.0), (3 / 4, 4 / 3), 0.5
CLASSES = 10


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def make_tree(root: Path, images: int, classes: int = CLASSES) -> None:
    """An ImageFolder tree of ImageNet-like JPEGs."""
    rng = np.random.default_rng(0)
    for i in range(images):
        base = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (375, 500, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.JPEG").write_bytes(buf.getvalue())


def write_shards(tree: Path, out: Path, max_size: int | None) -> None:
    cmd = [sys.executable, "-m", "shards.write", str(tree), "--out", str(out), "--splits", "train", "--shard-size", "100",
           "--workers", "2"]
    if max_size:
        cmd += ["--max-size", str(max_size)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])


def prepared(root: Path, images: int, max_size: int) -> dict[str, Path]:
    """The two shard sets' train folders under ``root``, written unless a previous run left them complete."""
    sets = {"original": (root / "original", None), f"max_size_{max_size}": (root / f"max_size_{max_size}", max_size)}
    for out, size in sets.values():
        move_flat_layout(out)  # shards kept from before the per-split folders
        info = out / "_info.json"
        if info.is_file() and sum(json.loads(info.read_text())["splits"]["train"]["shard_lengths"]) == images:
            continue
        if not (root / "tree").is_dir() or sum(1 for _ in (root / "tree").rglob("*.JPEG")) != images:
            make_tree(root / "tree", images)
        write_shards(root / "tree", out, size)
    return {name: out / "train" for name, (out, _) in sets.items()}


def reference_transform() -> T.Compose:
    """The bare loop's pipeline: torchvision as anyone would write it."""
    return T.Compose([T.RandomResizedCrop(PRE.image_size, scale=SCALE, ratio=RATIO, antialias=True),
                      T.RandomHorizontalFlip(HFLIP), T.PILToTensor()])


def bare_round(blobs: list[bytes], transform: T.Compose, seed: int) -> tuple[float, float]:
    """(wall images/s, images per CPU second) of the bare loop over in-memory JPEG bytes."""
    torch.manual_seed(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for blob in blobs:
        transform(Image.open(io.BytesIO(blob)).convert("RGB"))
    return len(blobs) / (time.perf_counter() - wall), len(blobs) / (time.process_time() - cpu)


def make_stream(shards: Path, batch: int) -> ShardStream:
    selected = select_shards(str(shards))
    return ShardStream(selected.urls, train_transform(PRE, SCALE, RATIO, HFLIP), CLASSES, batch, train=True,
                       shuffle_buffer=256, lengths=selected.lengths)


def loader_round(shards: Path, workers: int, batch: int) -> tuple[float, float, float]:
    """(wall images/s per worker, images per worker CPU second, main-process CPU ms per batch).

    Both rates are steady-state: from the first batch received (worker start-up, the shuffle
    buffer fill and the fork's copy-on-write faults are one-offs per epoch) to the last.
    """
    loader = EpochLoader(make_stream(shards, batch), workers, pin_memory=False, pre=PRE)
    loader.stream.start(0)
    batches = iter(loader.loader)  # raw uint8 batches, as the workers hand them over
    next(batches)
    pids = [w.pid for w in getattr(batches, "_workers", [])]  # the DataLoader's worker processes
    wall, main_cpu, worker_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    seen = count = 0
    for x, _, _ in batches:
        seen += x.shape[0]
        count += 1
        last_worker_cpu = _cpu_seconds(pids)  # read while the workers live: they exit after the last batch
    wall, main_cpu = time.perf_counter() - wall, time.process_time() - main_cpu
    worker_cpu = last_worker_cpu - worker_cpu
    if workers == 0:  # everything ran in this process
        worker_cpu, main_cpu = main_cpu, 0.0
    return seen / wall / max(workers, 1), seen / worker_cpu, 1000 * main_cpu / count


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (``/proc/<pid>/stat``, clock-tick resolution)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line
    return total / os.sysconf("SC_CLK_TCK")


def profile(shards: Path, batch: int, top: int) -> None:
    """One worker's work (read, shuffle, decode, crop, collate) in this process, under cProfile."""
    stream = make_stream(shards, batch)
    stream.start(0)
    profiler = cProfile.Profile()
    profiler.enable()
    images = sum(x.shape[0] for x, _, _ in stream)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print(f"--- profile of {shards.parent.name}: {images} images, {stats.total_tt:.2f} s "
          f"({1e6 * stats.total_tt / images:.0f} us/image under the profiler)\n" + out.getvalue(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, help="keep the generated shards here and reuse them")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    args = parser.parse_args()
    torch.set_num_threads(1)  # loader workers run single-threaded too
    emit(kind="env", torch=torch.__version__, cpus=os.cpu_count(), images=args.images, workers=args.workers,
         batch=args.batch, repeats=args.repeats, load_avg=os.getloadavg()[0])
    with tempfile.TemporaryDirectory() as tmp:
        sets = prepared(args.data or Path(tmp), args.images, args.max_size)
        transform = reference_transform()
        blobs = {name: [s["jpg"] for s in read_samples(select_shards(str(out)).urls)] for name, out in sets.items()}
        for name, out in sets.items():  # warm-up: page cache, lazy imports, allocator
            bare_round(blobs[name], transform, seed=0)
            loader_round(out, args.workers, args.batch)
        rounds: dict[str, list[dict]] = {name: [] for name in sets}
        for r in range(args.repeats):
            for name, out in sets.items():
                if r % 2 == 0:
                    bare, bare_cpu = bare_round(blobs[name], transform, seed=r)
                    rate, rate_cpu, main_ms = loader_round(out, args.workers, args.batch)
                else:
                    rate, rate_cpu, main_ms = loader_round(out, args.workers, args.batch)
                    bare, bare_cpu = bare_round(blobs[name], transform, seed=r)
                row = dict(shards=name, round=r, bare_img_per_s=round(bare, 1), loader_img_per_s_per_worker=round(rate, 1),
                           ratio=round(rate / bare, 3), bare_img_per_cpu_s=round(bare_cpu, 1),
                           loader_img_per_cpu_s=round(rate_cpu, 1), cpu_ratio=round(rate_cpu / bare_cpu, 3),
                           main_cpu_ms_per_batch=round(main_ms, 2))
                rounds[name].append(row)
                emit(kind="round", **row)
        for name, rows in rounds.items():
            med = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k not in ("shards", "round")}
            shard_mb = sum(f.stat().st_size for f in sets[name].glob("train-*.tar")) / 2**20
            emit(kind="summary", shards=name, shard_mb=round(shard_mb, 1), rounds=len(rows),
                 **{f"median_{k}": v for k, v in med.items()}, target=0.9,
                 meets_target=bool(med["ratio"] >= 0.9 and med["cpu_ratio"] >= 0.9))
        if args.profile:
            for out in sets.values():
                profile(out, args.batch, args.profile)


if __name__ == "__main__":
    main()
