"""Write ImageNet (or any ImageFolder tree) as shuffled webdataset shards that timm and this harness read.

    python -m shards.write /data/imagenet --out data/imagenet
    python -m shards.write /data/ilsvrc2012 --out data/imagenet --format ilsvrc --max-size 320

Each split's files are put in one global, seeded permutation (so every shard mixes classes)
and cut into shards of ``--shard-size`` samples: ``{split}-000000.tar`` ... with members
``<key>.jpg`` (the source JPEG's bytes, untouched unless ``--max-size`` shrinks it or the
source is not a JPEG) and ``<key>.cls`` (the class index as text). ``classes.txt`` lists the
wnids (line number = class index) and timm's ``_info.json`` the shards and their lengths.

Restarting the same command resumes: the permutation depends only on the file list and the
seed, a shard is written to ``<name>.tmp`` and renamed when complete, and finished shards
(checked to hold exactly their planned samples) are kept. ``_info.json`` is written last.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO

import numpy as np
import webdataset as wds
from PIL import Image

from shards.imagenet import FORMATS, Item, SourceError, detect_format, open_source, read_item

# Fixed member mtime: a rewritten shard is byte-identical to the one it replaces.
TAR_MTIME = 0
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Encoding:
    """How images are stored: the shorter-side limit (None: never resize) and the JPEG quality."""

    max_size: Optional[int]
    quality: int


@dataclass(frozen=True)
class ShardTask:
    """One shard to write (one Pool task): its file name and its samples, in order."""

    out: str
    name: str
    items: list[Item]
    encoding: Encoding


@dataclass(frozen=True)
class ShardResult:
    name: str
    samples: int
    resumed: bool  # the shard was already complete and kept


# ---------------------------------------------------------------------------------------------
# Planning: a pure function of the file list, the seed and the shard size


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(items: Sequence[Item], seed: int, shard_size: int) -> list[list[Item]]:
    """The split's samples in one seeded global permutation, cut into shards of ``shard_size``.

    Shuffling across the whole split (not within shards) is what lets a loader that reads a few
    shards at a time still see every class; determinism is what makes a restart resume.
    """
    order = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in order[start:start + shard_size]] for start in range(0, len(items), shard_size)]


# ---------------------------------------------------------------------------------------------
# One shard (runs in a worker process)


def encode_image(data: bytes, encoding: Encoding, where: str) -> bytes:
    """JPEG bytes for a sample: the source bytes when they already fit, else an RGB re-encode.

    Untouched bytes keep the dataset exactly as published (and cost no decode). EXIF rotation is
    not applied on re-encode, matching loaders (PIL, torchvision) that ignore it on the originals.
    """
    is_jpeg = data.startswith(JPEG_MAGIC)
    if is_jpeg and encoding.max_size is None:
        return data
    try:
        img = Image.open(io.BytesIO(data))
        target = _resized(img.size, encoding.max_size)
        if is_jpeg and target is None:
            return data
        if target is not None:
            img.draft("RGB", target)  # JPEG: decode at a reduced DCT scale >= target, far faster
            img = img.convert("RGB").resize(target, Image.BICUBIC, reducing_gap=3.0)
        else:
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=encoding.quality)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SourceError(f"{where}: cannot decode this image ({e}); replace it with a valid image of the same "
                          f"name and rerun the same command (finished shards are kept)") from None
    return buf.getvalue()


def _resized(size: tuple[int, int], max_size: Optional[int]) -> Optional[tuple[int, int]]:
    """The size with the shorter side scaled down to ``max_size``; None if no downscale is needed."""
    w, h = size
    if max_size is None or min(w, h) <= max_size:
        return None
    scale = max_size / min(w, h)
    return (max_size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), max_size)


def expected_members(keys: Iterable[str]) -> list[str]:
    """Member names of a complete shard, in the order TarWriter writes them (sorted per sample)."""
    return [f"{k}.{ext}" for k in keys for ext in ("cls", "jpg")]


def shard_is_complete(path: Path, keys: Sequence[str]) -> bool:
    """Whether ``path`` is a whole, readable tar holding exactly the planned samples in order.

    A shard from an interrupted run, another seed or shard size, or a truncated copy fails this
    and is rewritten.
    """
    try:
        size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError):
        return False
    if any(m.offset_data + m.size > size for m in members):  # tarfile lists a header whose data is cut
        return False
    return [m.name for m in members] == expected_members(keys)


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard via ``<name>.tmp`` and a rename, unless a complete one is already there."""
    final = Path(task.out) / task.name
    if final.exists() and shard_is_complete(final, [item.key for item in task.items]):
        return ShardResult(task.name, len(task.items), resumed=True)
    # A rename is atomic, so a final name never holds a partial shard; no fsync: a shard damaged
    # by a power cut fails shard_is_complete on restart and is rewritten.
    tmp = final.with_name(final.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
        for item in task.items:
            image = encode_image(read_item(item), task.encoding, item.where)
            sink.write({"__key__": item.key, "jpg": image, "cls": item.label})
    os.replace(tmp, final)
    return ShardResult(task.name, len(task.items), resumed=False)


# ---------------------------------------------------------------------------------------------
# Progress and report


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Shard-completion progress with samples/s and ETA.

    On a terminal one line is rewritten per shard; otherwise (logs, CI) a plain line is printed
    at most every ``every`` seconds and at the end, so a 1,282-shard run does not flood the log.
    """

    def __init__(self, label: str, shards: int, samples: int, stream: TextIO = sys.stderr, every: float = 10.0):
        self.label, self.shards, self.samples, self.stream, self.every = label, shards, samples, stream, every
        self.tty = stream.isatty()
        self.start = self.last = time.monotonic()
        self.done_shards = self.done_samples = self.written = self.resumed = 0

    def update(self, samples: int, resumed: bool) -> None:
        """Count one finished shard (``resumed``: kept from an earlier run, not rewritten)."""
        self.done_shards += 1
        self.done_samples += samples
        self.resumed += resumed
        self.written += 0 if resumed else samples
        now = time.monotonic()
        final = self.done_shards == self.shards
        if self.tty or final or now - self.last >= self.every:
            self.last = now
            self._print(self.line(now), final)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.written / elapsed
        left = self.samples - self.done_samples
        eta = _duration(left / rate) if rate > 0 else "?"
        kept = f", {self.resumed} kept" if self.resumed else ""
        return (f"{self.label}: {self.done_shards}/{self.shards} shards{kept}, "
                f"{self.done_samples}/{self.samples} samples, {rate:.0f} samples/s, "
                f"elapsed {_duration(elapsed)}, ETA {eta}")

    def _print(self, line: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def class_report(split: str, items: Sequence[Item], classes: Sequence[str], shards: int) -> str:
    """Per-split counts: total, per-class min/max/mean, and every class with no samples."""
    counts = Counter(item.label for item in items)
    per_class = [counts.get(i, 0) for i in range(len(classes))]
    lo, hi = int(np.argmin(per_class)), int(np.argmax(per_class))
    empty = [classes[i] for i, n in enumerate(per_class) if n == 0]
    return (f"{split}: {len(items)} samples in {shards} shards; per class min {per_class[lo]} ({classes[lo]}), "
            f"max {per_class[hi]} ({classes[hi]}), mean {np.mean(per_class):.1f}; "
            f"classes with zero samples: {', '.join(empty) if empty else 'none'}")


# ---------------------------------------------------------------------------------------------
# Output directory: classes.txt and _info.json


def write_classes(out: Path, classes: list[str]) -> None:
    """Write ``classes.txt``; refuse to mix into a directory written with another class list."""
    path = out / "classes.txt"
    text = "\n".join(classes) + "\n"
    if path.is_file() and path.read_text() != text:
        old = path.read_text().split()
        raise SourceError(f"{path} lists {len(old)} classes that differ from SOURCE's {len(classes)}; the shards "
                          f"there use other class indices: write into an empty --out directory")
    path.write_text(text)


def _write_json(path: Path, info: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def load_info(out: Path, name: str, classes: list[str]) -> dict:
    """The existing ``_info.json`` (other splits are kept) or a new one."""
    path = out / "_info.json"
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except ValueError:
            info = {}
        if isinstance(info.get("splits"), dict):
            return {**info, "name": name, "classes": classes}
    return {"name": name, "classes": classes, "splits": {}}


def split_info(split: str, shards: list[list[Item]]) -> dict:
    """timm's split entry (timm.data.readers.reader_wds reads exactly these keys)."""
    lengths = [len(s) for s in shards]
    return {"name": split, "num_samples": sum(lengths), "filenames": [shard_name(split, i) for i in range(len(shards))],
            "shard_lengths": lengths}


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        return value

    def quality(text: str) -> int:
        value = int(text)
        if not 1 <= value <= 100:
            raise argparse.ArgumentTypeError(f"JPEG quality is 1-100, got {value}")
        return value

    p = argparse.ArgumentParser(prog="python -m shards.write", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="ImageFolder root (train/, val/) or the folder with the ILSVRC2012 tars")
    p.add_argument("--out", type=Path, required=True, help="output directory for shards, classes.txt, _info.json")
    p.add_argument("--format", choices=FORMATS, help="source layout (default: detected)")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write (default: train,val)")
    p.add_argument("--shard-size", type=positive, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--max-size", type=positive, help="downscale so the shorter side is at most this many px")
    p.add_argument("--quality", type=quality, default=90, help="JPEG quality when re-encoding (default: 90)")
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1,
                   help="writer processes (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample permutation (default: 0)")
    p.add_argument("--val-labels", type=Path, help="ilsvrc: '<filename> <wnid>' lines instead of the devkit")
    p.add_argument("--name", help="dataset name in _info.json (default: SOURCE's folder name)")
    return p.parse_args(argv)


def write_split(pool, out: Path, split: str, shards: list[list[Item]], encoding: Encoding,
                progress_stream: TextIO) -> Progress:
    """Write (or resume) one split's shards in parallel, one Pool task per shard."""
    tasks = [ShardTask(str(out), shard_name(split, i), shard, encoding) for i, shard in enumerate(shards)]
    progress = Progress(split, len(tasks), sum(len(s) for s in shards), progress_stream)
    for result in pool.imap_unordered(write_shard, tasks):
        progress.update(result.samples, result.resumed)
    return progress


def stale_files(out: Path, split: str, planned: int) -> list[str]:
    """Shards of ``split`` beyond the plan (from a run with a smaller --shard-size): loaders globbing
    the directory would read them, so they are named in the report."""
    names = {shard_name(split, i) for i in range(planned)}
    return sorted(p.name for p in out.glob(f"{split}-*.tar") if p.name not in names)


def run(args: argparse.Namespace, log: TextIO = sys.stderr) -> None:
    """Index the source, write every requested split, then ``_info.json``; raises SourceError."""
    source_dir: Path = args.source
    if not source_dir.is_dir():
        raise SourceError(f"{source_dir}: SOURCE not found (or not a directory); pass the folder holding "
                          f"train/ and val/ or the ILSVRC2012 tars")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise SourceError(f"--splits {args.splits!r} names no split; pass e.g. --splits train,val")
    fmt = args.format or detect_format(source_dir)
    source = open_source(fmt, source_dir, args.val_labels, log)
    print(f"indexing {source_dir} ({fmt})", file=log, flush=True)
    classes = source.classes()
    plans = {split: source.items(split, classes) for split in splits}  # every input error before any writing
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SourceError(f"{out}: cannot create the output directory ({e.strerror}); pass a writable --out") \
            from None
    write_classes(out, classes)
    info = load_info(out, args.name or source_dir.resolve().name, classes)
    if any(s in info["splits"] for s in splits):
        # while these splits are rewritten _info.json must not vouch for them; other splits stay listed
        info["splits"] = {k: v for k, v in info["splits"].items() if k not in splits}
        _write_json(out / "_info.json", info)
    encoding = Encoding(args.max_size, args.quality)
    writer = {"source": str(source_dir.resolve()), "format": fmt, "seed": args.seed, "shard_size": args.shard_size,
              "max_size": args.max_size, "quality": args.quality}
    reports = []
    with multiprocessing.Pool(min(args.workers, sum(math.ceil(len(v) / args.shard_size) for v in plans.values()))) \
            as pool:
        for split, items in plans.items():
            shards = plan_shards(items, args.seed, args.shard_size)
            progress = write_split(pool, out, split, shards, encoding, log)
            # how the split was made, for the record (timm ignores extra keys)
            info["splits"][split] = {**split_info(split, shards), "writer": writer}
            reports.append(class_report(split, items, classes, len(shards)))
            reports.append(f"{split}: {progress.done_shards - progress.resumed} shards written, "
                           f"{progress.resumed} kept from an earlier run")
            stale = stale_files(out, split, len(shards))
            if stale:
                reports.append(f"{split}: warning: {len(stale)} shard(s) not in this plan (e.g. {stale[0]}) are "
                               f"left from an earlier run; delete them before reading {out} as a directory")
    _write_json(out / "_info.json", info)  # last: its entry for a split means every shard is complete
    print(f"{len(classes)} classes -> {out / 'classes.txt'}", file=log)
    for line in reports:
        print(line, file=log)
    print(f"wrote {out / '_info.json'}", file=log, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; input errors print one message and return 2 (no traceback)."""
    args = parse_args(argv)
    try:
        run(args)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable source file, full disk, no permission: the user's to fix, then resume
        print(f"error: {e.filename or ''}: {e.strerror or e}; fix this and rerun the same command "
              f"(finished shards are kept)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
