"""Throughput of the shard writer (``python -m shards.write``) on ImageNet-like JPEGs.

    python bench/writer.py [--images 1200] [--workers 1] [--repeats 5] [--max-size 320] [--data DIR]
    python bench/writer.py --code /tmp/before ...   # the same, with another checkout's shards package

Generates an ImageFolder tree of 500 x 375 JPEGs (``bench/loader.py``'s ``make_tree``; kept in
``--data`` if given), then writes it to shards ``--repeats`` times into a fresh directory each
round, with the writer's own default (source JPEG bytes stored untouched) and, with
``--max-size``, downscaled. Prints one JSON line per round and a median summary per setting:
images per second of wall time for the whole command (indexing, the pool, writing), and per
second of the writer processes' CPU time. ``--code`` runs the writer from another tree (e.g.
``git archive <commit> shards | tar -x -C /tmp/before``) to compare before and after a change
on the same images, rounds interleaved so that load on a shared host hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loader import make_tree  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def write_round(code: Path, tree: Path, out: Path, workers: int, max_size: int | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the writer and its workers) of one ``shards.write`` run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "shards.write", str(tree), "--out", str(out), "--splits", "train",
           "--shard-size", "100", "--workers", str(workers)]
    if max_size:
        cmd += ["--max-size", str(max_size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # children reaped: the command and its pool
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--workers", type=int, default=1, help="writer processes (default 1: per-process throughput)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-size", type=int, default=320, help="also measure downscaling to this; 0: skip")
    p.add_argument("--code", type=Path, action="append", help="tree(s) holding the shards package (default: this one)")
    p.add_argument("--data", type=Path, help="keep the generated JPEG tree here and reuse it")
    args = p.parse_args()
    codes = args.code or [ROOT]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        tree = data / "tree"
        if sum(1 for _ in tree.rglob("*.JPEG")) != args.images:
            shutil.rmtree(tree, ignore_errors=True)
            make_tree(tree, args.images)
        emit(kind="env", images=args.images, workers=args.workers, cpus=os.cpu_count(), load_avg=os.getloadavg()[0],
             codes=[str(c) for c in codes])
        settings = [None] + ([args.max_size] if args.max_size else [])
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(args.repeats):
            order = codes if r % 2 == 0 else list(reversed(codes))  # alternate who runs first
            for size in settings:
                for code in order:
                    wall, cpu = write_round(code, tree, Path(tmp) / "out", args.workers, size)
                    key = (str(code), f"max_size_{size}" if size else "untouched")
                    results.setdefault(key, []).append((wall, cpu))
                    emit(kind="round", code=key[0], setting=key[1], round=r, images_per_s=round(args.images / wall, 1),
                         images_per_cpu_s=round(args.images / cpu, 1))
        for (code, setting), rows in results.items():
            emit(kind="summary", code=code, setting=setting, rounds=len(rows),
                 median_images_per_s=round(args.images / statistics.median(w for w, _ in rows), 1),
                 median_images_per_cpu_s=round(args.images / statistics.median(c for _, c in rows), 1))


if __name__ == "__main__":
    main()
