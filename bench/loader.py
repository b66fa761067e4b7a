"""Loader throughput per worker process against a bare PIL loop over the same JPEGs.

    python bench/loader.py [--images 600] [--max-size 320] [--workers 1]

Generates ImageNet-like JPEGs (500x375, quality 90, smooth content plus noise), writes them
as shards twice (as they are, and pre-resized with ``--max-size``), then measures in the same
run: (a) a bare loop that opens, decodes, RandomResizedCrop(224)s, flips and normalises each
JPEG with PIL/torchvision in one process; (b) this harness's training loader (tar reading,
shuffle buffer, decode, the same transform, batching) with ``--workers`` worker processes, in
images/s per worker. Prints one JSON line per measurement and the loader/bare ratios.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data import EpochLoader, Preprocess, ShardStream, read_samples, expand_urls, shard_lengths, train_transform

PRE = Preprocess(image_size=224, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def make_tree(root: Path, images: int, classes: int = 10) -> None:
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


def bare_loop(blobs: list[bytes], transform) -> float:
    start = time.perf_counter()
    for blob in blobs:
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        transform(image)
    return len(blobs) / (time.perf_counter() - start)


def loader_rate(shards: Path, workers: int, batch: int = 32) -> float:
    urls = expand_urls(str(shards))
    stream = ShardStream(urls, train_transform(PRE, (0.08, 1.0), (3 / 4, 4 / 3), 0.5), 10, batch, train=True,
                         shuffle_buffer=256, lengths=shard_lengths(urls, "train"))
    loader = EpochLoader(stream, workers, pin_memory=False, pre=PRE)
    start, seen, first = time.perf_counter(), 0, None
    for x, _ in loader.epoch(0):
        if first is None:  # worker start-up is a one-off per epoch; not part of the steady rate
            first, start = x.shape[0], time.perf_counter()
            continue
        seen += x.shape[0]
    return seen / (time.perf_counter() - start) / max(workers, 1)


def write_shards(tree: Path, out: Path, max_size: int | None) -> int:
    cmd = [sys.executable, "-m", "shards.write", str(tree), "--out", str(out), "--splits", "train", "--shard-size", "100",
           "--workers", "2"]
    if max_size:
        cmd += ["--max-size", str(max_size)]
    subprocess.run(cmd, check=True, capture_output=True)
    return sum(f.stat().st_size for f in out.glob("train-*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    emit(kind="env", torch=torch.__version__, cpus=os.cpu_count(), images=args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tree(tmp / "tree", args.images)
        transform = train_transform(PRE, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
        for label, max_size in (("original", None), (f"max_size_{args.max_size}", args.max_size)):
            out = tmp / label
            size = write_shards(tmp / "tree", out, max_size)
            # the bare loop decodes exactly the bytes the shards hold
            shard_blobs = [sample["jpg"] for sample in read_samples(expand_urls(str(out)))]
            bare = bare_loop(shard_blobs, transform)
            rate = loader_rate(out, args.workers)
            emit(kind="loader", shards=label, shard_mb=round(size / 2**20, 1), bare_img_per_s=round(bare, 1),
                 loader_img_per_s_per_worker=round(rate, 1), ratio=round(rate / bare, 3))


if __name__ == "__main__":
    main()
