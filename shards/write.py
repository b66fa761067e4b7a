"""Write ImageNet (or any ImageFolder tree) as shuffled webdataset shards that timm and this harness read.

    python -m shards.write /data/imagenet --out data/imagenet
    python -m shards.write /data/ilsvrc2012 --out data/imagenet --format ilsvrc --max-size 320

Each split's files are put in one global, seeded permutation (so every shard mixes classes)
and cut into shards of ``--shard-size`` samples: ``OUT/{split}/{split}-000000.tar`` ... (one
folder per split, see :mod:`shards.layout`) with members ``<key>.jpg`` (the source JPEG's
bytes, untouched unless ``--max-size`` shrinks it or the source is not a JPEG) and ``<key>.cls``
(the class index as text). ``classes.txt`` lists the wnids (line number = class index) and
timm's ``_info.json`` the shards, their lengths and what was skipped.

A file that does not decode is skipped: it is left out of its shard (every other sample keeps
its shard and position: the plan is made before anything is decoded) and listed, with the
reason, under ``splits.<split>.skipped`` in ``_info.json``. ``--strict`` stops at the first
such file instead.

Restarting the same command resumes: the permutation depends only on the file list and the
seed, a shard is written to ``<name>.tmp`` and renamed when complete, and finished shards
(checked to hold exactly their planned samples, less those that still do not decode) are kept.
``_info.json`` is written last. A directory written before the per-split folders is moved into
them (renames only) when the command is rerun on it.

``--task I/N`` writes only the I-th of N contiguous ranges of the shards (all splits' shards in
order), for array jobs (``slurm/shards.sbatch``): N writers side by side, each resumable on its
own, none writing ``_info.json``; the same command without ``--task`` then keeps every complete
shard (each checked), writes any still missing, and writes ``_info.json``.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO

import numpy as np
from PIL import Image

from shards.imagenet import FORMATS, Item, SourceError, detect_format, open_source, read_item
from shards.layout import (TMP_SUFFIX, move_flat_layout, read_info, remove_temporaries, shard_file, shard_name,
                           shard_writer, split_entry, write_info)

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class Encoding:
    """How images are stored: the shorter-side limit (None: never resize) and the JPEG quality.

    ``decode_check``: decode every JPEG stored untouched (at 1/8 scale) to refuse damage inside
    a complete scan too; off, such a file is checked for a parsable header and an end marker.
    """

    max_size: Optional[int]
    quality: int
    decode_check: bool = False


@dataclass(frozen=True)
class ShardTask:
    """One shard to write (one Pool task): its path relative to ``out``, its samples in order."""

    out: str
    name: str  # as _info.json lists it: "train/train-000000.tar"
    items: list[Item]
    encoding: Encoding
    strict: bool = False  # an undecodable file stops the run instead of being skipped


@dataclass(frozen=True)
class Skipped:
    """A source file left out because it does not decode: _info.json's record of it."""

    key: str
    source: str
    reason: str


@dataclass(frozen=True)
class ShardResult:
    name: str
    samples: int  # samples in the shard (planned, less the skipped)
    resumed: bool  # the shard was already complete and kept
    skipped: tuple[Skipped, ...] = ()


class Undecodable(Exception):
    """An image PIL cannot decode (the loaders could not either); the message is PIL's reason."""


# ---------------------------------------------------------------------------------------------
# Planning: a pure function of the file list, the seed and the shard size


def plan_shards(items: Sequence[Item], seed: int, shard_size: int) -> list[list[Item]]:
    """The split's samples in one seeded global permutation, cut into shards of ``shard_size``.

    Shuffling across the whole split (not within shards) is what lets a loader that reads a few
    shards at a time still see every class; determinism is what makes a restart resume. The
    plan is made before any image is decoded, so a file skipped later changes no other
    sample's shard or position.
    """
    order = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in order[start:start + shard_size]] for start in range(0, len(items), shard_size)]


# ---------------------------------------------------------------------------------------------
# One shard (runs in a worker process)

# PIL's failures on bad image data: what the loaders' decode would fail with too
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def encode_image(data: bytes, encoding: Encoding) -> bytes:
    """JPEG bytes for a sample: the source bytes when they already fit, else an RGB re-encode.

    Untouched bytes keep the dataset exactly as published. They are checked without decoding
    the pixels: the header must parse and an end-of-image marker must close the file, which a
    file cut short or a JPEG header followed by garbage lacks. A full decode (even at the
    smallest DCT scale, which still reads the whole bitstream) cost 31% of the writer's
    throughput on 500 x 375 JPEGs, so it is opt-in (``decode_check``); damage inside a complete
    scan is rare, the loaders skip such a sample at run time and ``shards.verify`` decodes every
    one. EXIF rotation is not applied on re-encode, matching loaders (PIL, torchvision) that
    ignore it on the originals. Raises :class:`Undecodable`.
    """
    is_jpeg = data.startswith(JPEG_MAGIC)
    try:
        img = Image.open(io.BytesIO(data))
        target = _resized(img.size, encoding.max_size)
        if is_jpeg and target is None:
            if encoding.decode_check:
                img.draft(img.mode, (1, 1))  # 1/8 scale: a truncated or corrupt scan still fails
                img.load()
            elif data.rfind(JPEG_END, max(0, len(data) - 1024)) < 0:  # trailing bytes after it happen
                raise Undecodable("no JPEG end-of-image marker in the last KiB: the file is truncated or damaged")
            return data
        if target is not None:
            img.draft("RGB", target)  # JPEG: decode at a reduced DCT scale >= target, far faster
            img = img.convert("RGB").resize(target, Image.BICUBIC, reducing_gap=3.0)
        else:
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=encoding.quality)
    except DECODE_ERRORS as e:
        raise Undecodable(f"{type(e).__name__}: {e}") from None
    return buf.getvalue()


def _resized(size: tuple[int, int], max_size: Optional[int]) -> Optional[tuple[int, int]]:
    """The size with the shorter side scaled down to ``max_size``; None if no downscale is needed."""
    w, h = size
    if max_size is None or min(w, h) <= max_size:
        return None
    scale = max_size / min(w, h)
    return (max_size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), max_size)


def encoded(item: Item, encoding: Encoding, strict: bool) -> bytes | Skipped:
    """The sample's image bytes, or its :class:`Skipped` record; under ``strict`` a SourceError instead."""
    try:
        return encode_image(read_item(item), encoding)
    except Undecodable as e:
        if strict:
            raise SourceError(f"{item.where}: cannot decode this image ({e}); replace it with a valid image of the "
                              f"same name and rerun the same command (finished shards are kept), or rerun without "
                              f"--strict to skip such files") from None
        return Skipped(item.key, item.where, str(e))


def expected_members(keys: Iterable[str]) -> list[str]:
    """Member names of a complete shard, in the order TarWriter writes them (sorted per sample)."""
    return [f"{k}.{ext}" for k in keys for ext in ("cls", "jpg")]


def shard_members(path: Path) -> Optional[list[str]]:
    """Member names of a whole, readable tar; None for a truncated or unreadable one."""
    try:
        size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError):
        return None
    if any(m.offset_data + m.size > size for m in members):  # tarfile lists a header whose data is cut
        return None
    return [m.name for m in members]


def kept_shard(path: Path, task: ShardTask) -> Optional[ShardResult]:
    """The result for a complete shard already at ``path``, or None if it must be (re)written.

    Complete: a whole tar holding the planned samples in order, where every planned sample it
    lacks still fails to decode (it was skipped; one lost otherwise, say a shard cut at a member
    boundary, decodes, and the shard is rewritten). A shard from an interrupted run, another
    seed or shard size fails this. Only the missing samples are decoded again.
    """
    members = shard_members(path)
    if members is None:
        return None
    present = {name.rsplit(".", 1)[0] for name in members}
    kept = [item.key for item in task.items if item.key in present]
    if members != expected_members(kept):
        return None
    skipped = []
    for item in task.items:
        if item.key not in present:
            result = encoded(item, task.encoding, task.strict)
            if not isinstance(result, Skipped):  # it decodes now: the shard lost it some other way
                return None
            skipped.append(result)
    return ShardResult(task.name, len(kept), resumed=True, skipped=tuple(skipped))


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (via a temporary name), unless a complete one is already there."""
    final = Path(task.out) / task.name
    if final.exists() and (kept := kept_shard(final, task)) is not None:
        return kept
    skipped, samples = [], 0
    with shard_writer(final) as sink:
        for item in task.items:
            image = encoded(item, task.encoding, task.strict)
            if isinstance(image, Skipped):
                skipped.append(image)
                continue
            sink.write({"__key__": item.key, "jpg": image, "cls": item.label})
            samples += 1
    return ShardResult(task.name, samples, resumed=False, skipped=tuple(skipped))


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


def load_info(out: Path, name: str, classes: list[str]) -> dict:
    """The existing ``_info.json`` (other splits are kept) or a new one."""
    info = read_info(out)
    if info is not None:
        return {**info, "name": name, "classes": classes}
    return {"name": name, "classes": classes, "splits": {}}


def stale_files(out: Path, split: str, planned: int) -> list[str]:
    """Shards of ``split`` beyond the plan (from a run with a smaller --shard-size), named in the report.

    _info.json does not list them, so the harness and timm ignore them, but they take space and
    ``shards.verify`` reports them.
    """
    names = {shard_name(split, i) for i in range(planned)}
    return sorted(p.name for p in (out / split).glob(f"{split}-*.tar") if p.name not in names)


def stale_report(out: Path, split: str, planned: int) -> list[str]:
    """The report's warning about :func:`stale_files`, if there are any."""
    stale = stale_files(out, split, planned)
    if not stale:
        return []
    return [f"{split}: warning: {len(stale)} shard(s) not in this plan (e.g. {out / split / stale[0]}) are left from "
            f"an earlier run with another --shard-size; _info.json does not list them: delete them"]


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
    p.add_argument("--strict", action="store_true",
                   help="stop at the first file that does not decode (default: skip it and list it in _info.json)")
    p.add_argument("--task", type=task_range, metavar="I/N",
                   help="write only range I (0-based) of N of the shards, for array jobs; no _info.json (see above)")
    p.add_argument("--decode-check", action="store_true",
                   help="decode every JPEG stored untouched to check it (default: header and end marker only; "
                        "about 30%% slower)")
    return p.parse_args(argv)


def task_range(text: str) -> tuple[int, int]:
    """``--task I/N``: (I, N) with 0 <= I < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/16), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"I must be 0 to N-1 in I/N, got {text!r}")
    return index, count


def task_shards(plans: dict[str, list[list[Item]]], task: tuple[int, int]) -> dict[str, set[int]]:
    """Shard indices per split of range I of N: every split's shards in order, cut into N contiguous ranges."""
    flat = [(split, i) for split, shards in plans.items() for i in range(len(shards))]
    index, count = task
    mine: dict[str, set[int]] = {split: set() for split in plans}
    for split, i in flat[len(flat) * index // count:len(flat) * (index + 1) // count]:
        mine[split].add(i)
    return mine


def write_split(pool, out: Path, split: str, shards: list[list[Item]], encoding: Encoding, strict: bool,
                progress_stream: TextIO, only: Optional[set[int]] = None) -> tuple[Progress, list[ShardResult]]:
    """Write (or resume) one split's shards (those in ``only``, if given) in parallel, one Pool task per
    shard; results in shard order."""
    tasks = [ShardTask(str(out), shard_file(split, i), shard, encoding, strict)
             for i, shard in enumerate(shards) if only is None or i in only]
    progress = Progress(split, len(tasks), sum(len(t.items) for t in tasks), progress_stream)
    results = {}
    for result in pool.imap_unordered(write_shard, tasks):
        progress.update(result.samples + len(result.skipped), result.resumed)
        results[result.name] = result
    return progress, [results[task.name] for task in tasks]


def skipped_report(out: Path, split: str, skipped: list[Skipped], shown: int = 10) -> list[str]:
    """The report's lines for files skipped as undecodable: a count, then the first few."""
    if not skipped:
        return []
    lines = [f"{split}: {len(skipped)} file(s) skipped because they do not decode (all listed under "
             f"splits.{split}.skipped in {out / '_info.json'}; --strict stops at the first instead):"]
    lines += [f"  {s.source}: {s.reason}" for s in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"  ... and {len(skipped) - shown} more")
    return lines


def run(args: argparse.Namespace, log: Optional[TextIO] = None) -> None:
    """Index the source, write every requested split, then ``_info.json``; raises SourceError.

    ``log`` (progress and the report) is the current ``sys.stderr`` unless given.
    """
    log = log or sys.stderr
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
    task = args.task
    lead = task is None or task[0] == 0  # array tasks run side by side: one of them changes the directory
    if lead:
        write_classes(out, classes)
        move_flat_layout(out, log)  # a directory from before the split folders: its shards are kept, moved
    for split in splits:
        (out / split).mkdir(exist_ok=True)
    info = load_info(out, args.name or source_dir.resolve().name, classes)
    if lead and any(s in info["splits"] for s in splits):
        # while these splits are rewritten _info.json must not vouch for them; other splits stay listed
        info["splits"] = {k: v for k, v in info["splits"].items() if k not in splits}
        write_info(out, info)
    encoding = Encoding(args.max_size, args.quality, args.decode_check)
    writer = {"source": str(source_dir.resolve()), "format": fmt, "seed": args.seed, "shard_size": args.shard_size,
              "max_size": args.max_size, "quality": args.quality}
    reports = []
    shard_plans = {split: plan_shards(items, args.seed, args.shard_size) for split, items in plans.items()}
    mine = task_shards(shard_plans, task) if task else None
    owned = sum(len(v) for v in mine.values()) if mine else sum(len(v) for v in shard_plans.values())

    def clean() -> None:
        """A killed run's half shards: all of them, or in an array task only its own (the others' are in use)."""
        if mine is None:
            remove_temporaries(out, splits)
        for split, indices in (mine or {}).items():
            for i in indices:
                (out / f"{shard_file(split, i)}{TMP_SUFFIX}").unlink(missing_ok=True)

    clean()
    try:
        with multiprocessing.Pool(max(1, min(args.workers, owned))) as pool:
            for split, items in plans.items():
                shards = shard_plans[split]
                progress, results = write_split(pool, out, split, shards, encoding, args.strict, log,
                                                mine[split] if mine else None)
                if mine is not None:
                    reports.append(f"{split}: task {task[0]}/{task[1]}: {len(results)} of {len(shards)} shards, "
                                   f"{progress.done_shards - progress.resumed} written, {progress.resumed} kept")
                    continue
                skipped = [s for r in results for s in r.skipped]
                if len(skipped) == len(items):
                    raise SourceError(f"{source_dir}: none of the {len(items)} files of split {split} decodes "
                                      f"(e.g. {skipped[0].source}: {skipped[0].reason}); check SOURCE")
                # how the split was made and what it left out, for the record (timm ignores extra keys)
                info["splits"][split] = split_entry(split, [r.samples for r in results], writer=writer,
                                                    skipped=[asdict(s) for s in skipped])
                left_out = {s.key for s in skipped}
                reports.append(class_report(split, [i for i in items if i.key not in left_out], classes, len(shards)))
                reports.append(f"{split}: {progress.done_shards - progress.resumed} shards written, "
                               f"{progress.resumed} kept from an earlier run")
                reports += skipped_report(out, split, skipped) + stale_report(out, split, len(shards))
    finally:
        clean()  # stopped by an error or Ctrl-C: the pool is gone, so are its half shards
    if task is not None:
        print("\n".join(reports + ["_info.json is left to the same command without --task, once every task ended"]),
              file=log, flush=True)
        return
    write_info(out, info)  # last: its entry for a split means every shard is complete
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
