"""The two data paths (`data.decode: cpu` and `gpu`) on one CUDA device: alone and under a training step.

    python bench/gpu_data.py [--images 6144] [--workers 4 12] [--batch 256] [--model resnet50]

Writes ImageNet-like JPEGs (500x375, quality 90, smooth content plus noise) as shards, then for
each path and worker count measures in the same process: (a) the loader alone (images/s to
the device, steady state: the first batch, worker start-up, is left out); (b) the loader under a
real training step (timm model, bf16 autocast, channels_last, SGD), with the share of wall time
spent waiting for data; and once (c) the step alone on one resident batch, the ceiling. For the
GPU path it also reports the decode thread's time per batch in the decode stage and, of that, in
the nvJPEG call. One JSON line per measurement.

    python bench/gpu_data.py --stage [--batches 32 64 128 256] [--code TREE ...]

needs no GPU: the GPU path's decode stage (``DeviceDecode._finish``) on CPU tensors, per batch
size, for ImageNet-like (333-500 px -> 224), small (64-128 px -> 56) and tiny (16-32 px -> 8)
JPEGs, one in 16 sent as pixels as the workers send a PNG: (a) the torch operations it issues
per batch, counted with a TorchDispatchMode, split into the decode (torchvision's ``image``
ops: one per image on the CPU, one batched nvJPEG call on CUDA) and the finishing (everything
else: what the batched path keeps constant); (b) its host time per batch (median), and of that
the decode. On CPU tensors the finishing time is mostly the resampling arithmetic, which on
CUDA runs on the device; the tiny images, with next to none, show the host overhead.
``--code`` measures another tree's ``harness`` (e.g. a ``git archive`` of an older commit) in
a subprocess, for before/after figures.
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
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from harness.data import EpochLoader, Preprocess, ShardStream, train_transform

try:
    from harness.data import gpu_decode
except ImportError:  # a --code tree from before the harness/data/ package (an older commit's): a top-level module
    from harness import gpu_decode
CountOps, DeferredDecode, DeviceDecode = gpu_decode.CountOps, gpu_decode.DeferredDecode, gpu_decode.DeviceDecode

PRE = Preprocess(image_size=224, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CROP = ((0.08, 1.0), (3 / 4, 4 / 3), 0.5)
PER_SHARD = 128


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def write_shard(args: tuple[str, int, int]) -> str:
    url, start, n = args
    rng = np.random.default_rng(start)
    with wds.TarWriter(url) as sink:
        for i in range(start, start + n):
            base = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize((500, 375), Image.BICUBIC)).astype(np.int16)
            img = (img + rng.integers(-12, 12, img.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"img{i:07d}", "jpg": buf.getvalue(), "cls": i % 1000})
    return url


def make_shards(root: Path, images: int) -> list[str]:
    jobs = [(str(root / f"train-{s:06d}.tar"), s * PER_SHARD, min(PER_SHARD, images - s * PER_SHARD))
            for s in range((images + PER_SHARD - 1) // PER_SHARD)]
    with Pool(os.cpu_count()) as pool:
        return pool.map(write_shard, jobs)


def loader_for(path: str, urls: list[str], workers: int, batch: int):
    transform = DeferredDecode(PRE, CROP) if path == "gpu" else train_transform(PRE, *CROP)
    lengths = {u: PER_SHARD for u in urls}
    stream = ShardStream(urls, transform, 1000, batch, train=True, shuffle_buffer=512, lengths=lengths)
    return EpochLoader(stream, workers, pin_memory=True, pre=PRE, device="cuda")


class Step:
    """One training step of a timm model in bf16 autocast, channels_last."""

    def __init__(self, model: str):
        import timm

        self.model = timm.create_model(model, pretrained=False, num_classes=1000).cuda().to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(self.model(x.contiguous(memory_format=torch.channels_last)), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure(loader: EpochLoader, step, epoch: int) -> dict:
    """Steady-state images/s and data-wait share over one epoch (first batch left out)."""
    batches = iter(loader.epoch(epoch))
    x, y = next(batches)
    if step:
        step(x, y)
    torch.cuda.synchronize()
    start, seen, wait = time.perf_counter(), 0, 0.0
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        x, y = batch
        if step:
            step(x, y)
        seen += x.shape[0]
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"img_per_s": round(seen / wall, 1), "data_wait": round(wait / wall, 3), "images": seen}


STAGE_IMAGES = {  # setting: (image_size, widths, heights) of the generated JPEGs
    "imagenet": (224, (333, 500), (333, 500)),
    "small": (56, (64, 128), (48, 112)),
    "tiny": (8, (16, 32), (12, 28)),  # next to no arithmetic: the time is host overhead
}


def stage_batch(batch: int, setting: str, seed: int):
    """One training batch as the GPU path's workers hand it over, and the Preprocess it is for."""
    side, (w0, w1), (h0, h1) = STAGE_IMAGES[setting]
    pre = Preprocess(image_size=side, crop_pct=0.875, mean=PRE.mean, std=PRE.std)
    rng = np.random.default_rng(seed)
    plan, items = DeferredDecode(pre, CROP), []
    for i in range(batch):
        w, h = int(rng.integers(w0, w1 + 1)), int(rng.integers(h0, h1 + 1))
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img = (img + rng.integers(-12, 12, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG" if i % 16 == 15 else "JPEG", quality=90)
        items.append(plan.plan({"__key__": f"img{i:07d}", "png" if i % 16 == 15 else "jpg": buf.getvalue(),
                                "cls": i % 1000}, 1000, seed))
    return pre, DeferredDecode.collate(items)


def stage_cost(batch: int, setting: str, repeats: int) -> dict:
    """Operations and host time per batch of ``DeviceDecode._finish`` on CPU tensors."""
    pre, (encoded, y) = stage_batch(batch, setting, seed=batch)
    stage = gpu_decode.DeviceDecode(pre, torch.device("cpu"), train=True)
    decode, decode_s = gpu_decode._decode_jpegs, []

    def timed(*a):
        t = time.perf_counter()
        out = decode(*a)
        decode_s.append(time.perf_counter() - t)
        return out

    gpu_decode._decode_jpegs = timed
    try:
        with CountOps() as count:
            stage._finish(encoded, y, (0, batch, 0))
        total_s = []
        for _ in range(repeats):
            decode_s.clear()
            t = time.perf_counter()
            stage._finish(encoded, y, (0, batch, 0))
            total_s.append((time.perf_counter() - t, sum(decode_s)))
    finally:
        gpu_decode._decode_jpegs = decode
    decode_ops = sum(n for op, n in count.ops.items() if op.startswith("image."))
    total, decoding = np.median([t for t, _ in total_s]), np.median([d for _, d in total_s])
    return {"setting": setting, "batch": batch, "ops": sum(count.ops.values()), "decode_ops": decode_ops,
            "finish_ops": sum(count.ops.values()) - decode_ops, "ms": round(1000 * total, 1),
            "decode_ms": round(1000 * decoding, 1), "finish_ms": round(1000 * (total - decoding), 1),
            "top_ops": dict(count.ops.most_common(4))}


def stage_main(args: argparse.Namespace) -> None:
    if args.code:  # each tree in its own process, its harness first on the path
        for code in args.code:
            cmd = [sys.executable, __file__, "--stage", "--repeats", str(args.repeats), "--settings", *args.settings,
                   "--batches", *map(str, args.batches)]
            env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())}
            for line in subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines():
                emit(code=str(code), **json.loads(line))
        return
    torch.set_num_threads(args.threads)
    import harness

    emit(kind="env", torch=torch.__version__, harness=str(Path(harness.__file__).parent),
         cpus=os.cpu_count(), threads=torch.get_num_threads(), load=os.getloadavg()[0])
    for setting in args.settings:
        for batch in args.batches:
            emit(kind="stage", **stage_cost(batch, setting, args.repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6144)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--stage", action="store_true", help="the decode stage on CPU tensors (no GPU needed)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--settings", nargs="+", default=["tiny", "small", "imagenet"], choices=sorted(STAGE_IMAGES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for --stage")
    parser.add_argument("--code", nargs="+", help="--stage: the harness trees to measure (default: this one)")
    args = parser.parse_args()
    if args.stage:
        stage_main(args)
        return
    torch.backends.cudnn.benchmark = True
    emit(kind="env", torch=torch.__version__, gpu=torch.cuda.get_device_name(), cpus=os.cpu_count(), images=args.images)
    decode_ms: list[float] = []
    finish = DeviceDecode._finish

    def timed_finish(self, *a):  # the training process's time in the decode stage, per batch
        t = time.perf_counter()
        out = finish(self, *a)
        decode_ms.append((time.perf_counter() - t) * 1000)
        return out

    DeviceDecode._finish = timed_finish
    nvjpeg_ms: list[float] = []
    decode = DeviceDecode._decode

    def timed_decode(self, *a):  # of which the nvJPEG call
        t = time.perf_counter()
        out = decode(self, *a)
        nvjpeg_ms.append((time.perf_counter() - t) * 1000)
        return out

    DeviceDecode._decode = timed_decode
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(Path(tmp), args.images)
        step = Step(args.model)
        x = torch.randn(args.batch, 3, 224, 224, device="cuda")
        y = torch.randint(0, 1000, (args.batch,), device="cuda")
        for _ in range(5):
            step(x, y)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            step(x, y)
        torch.cuda.synchronize()
        emit(kind="step_alone", model=args.model, img_per_s=round(10 * args.batch / (time.perf_counter() - t), 1))
        for workers in args.workers:
            for path in ("cpu", "gpu"):
                for with_step in (False, True):
                    decode_ms.clear()
                    nvjpeg_ms.clear()
                    result = measure(loader_for(path, urls, workers, args.batch), step if with_step else None, epoch=0)
                    extra = {"stage_ms_per_batch": round(float(np.median(decode_ms)), 1),
                             "nvjpeg_ms_per_batch": round(float(np.median(nvjpeg_ms)), 1)} if decode_ms else {}
                    emit(kind="loader", path=path, workers=workers, with_step=with_step, **result, **extra)


if __name__ == "__main__":
    main()
