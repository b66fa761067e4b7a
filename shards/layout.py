"""The layout of a shard directory, as every writer here produces it and the harness reads it.

    OUT/_info.json                 timm-style index: per split its shard files (relative to OUT),
                                   their sample counts and the split's total
    OUT/classes.txt                class names, line number = label
    OUT/train/train-000000.tar ... one folder per split
    OUT/val/val-000000.tar ...

One folder per split means a folder of shards is always exactly one split: recipes name
``OUT/train`` and ``OUT/val``, and ``_info.json`` tells the harness which split each shard
belongs to and how many samples the split has (so an evaluation can check it saw all of them).
timm's reader (``create_dataset("wds/NAME", root=OUT, split="train")``) joins the listed names
to ``OUT``, so it reads the same directory unchanged.

Writers before this layout put both splits' shards side by side in ``OUT``. Such a directory
is moved into split folders by renames (no shard is rewritten) with

    python -m shards.layout data/imagenet

and every writer does the same by itself when it is rerun on one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO

import webdataset as wds

INFO = "_info.json"
TMP_SUFFIX = ".tmp"  # a shard (or _info.json) being written; renamed when complete
TAR_MTIME = 0  # fixed member mtime: a rewritten shard is byte-identical to the one it replaces


def shard_name(split: str, index: int) -> str:
    """The file name of a split's ``index``-th shard."""
    return f"{split}-{index:06d}.tar"


def shard_file(split: str, index: int) -> str:
    """The shard's path relative to the dataset directory, as ``_info.json`` lists it."""
    return f"{split}/{shard_name(split, index)}"


def split_entry(split: str, lengths: Sequence[int], **extra) -> dict:
    """timm's split record (timm.data.readers.reader_wds reads exactly these keys) plus ``extra``.

    timm ignores keys it does not know, so the writers' records (how a split was made, what was
    skipped) travel in the same file.
    """
    lengths = [int(n) for n in lengths]
    return {"name": split, "num_samples": sum(lengths),
            "filenames": [shard_file(split, i) for i in range(len(lengths))], "shard_lengths": lengths, **extra}


@contextlib.contextmanager
def shard_writer(final: Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on ``<final>.tmp``, renamed to ``final`` when the block completes.

    A rename is atomic, so a final name never holds a partial shard, and whatever stops the
    block (an error, strict mode's stop, Ctrl-C) removes the half-written file. No fsync: a
    shard damaged by a power cut is found incomplete on the next run and rewritten.
    """
    tmp = final.with_name(final.name + TMP_SUFFIX)
    try:
        with wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
            yield sink
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def read_info(out: Path) -> Optional[dict]:
    """``OUT/_info.json`` if it is a readable timm-style index, else None."""
    try:
        info = json.loads((out / INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("splits"), dict) else None


def write_info(out: Path, info: dict) -> None:
    """Replace ``OUT/_info.json`` atomically: a reader never sees half of it."""
    path = out / INFO
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def remove_temporaries(out: Path, splits: Sequence[str]) -> None:
    """Delete half-written shards (``*.tar.tmp``) of ``splits``: a stopped writer's leftovers.

    Called by a writer at its start and on its way out, whatever stopped it, so a directory it
    leaves holds only complete shards (those of the older flat layout's writers included).
    """
    for split in splits:
        for tmp in [*(out / split).glob(f"*.tar{TMP_SUFFIX}"), *out.glob(f"{split}-*.tar{TMP_SUFFIX}")]:
            tmp.unlink(missing_ok=True)


def move_flat_layout(out: Path, log: Optional[TextIO] = None) -> int:
    """Move the shards of an older, flat directory (every split in ``OUT``) into split folders.

    Only files ``_info.json`` lists without a folder are moved, each into the folder named after
    its split, and ``_info.json`` is rewritten last; a move interrupted half-way is finished by
    calling this again. Returns the number of listed shards put into split folders.
    """
    info = read_info(out)
    if info is None:
        return 0
    moved = 0
    for split, entry in info["splits"].items():
        names = entry.get("filenames") if isinstance(entry, dict) else None
        if not isinstance(names, list):
            continue
        renamed = []
        for name in names:
            if "/" in name:
                renamed.append(name)
                continue
            source, target = out / name, out / split / name
            if source.is_file():  # else already moved by an interrupted earlier call (or missing: verify says so)
                target.parent.mkdir(exist_ok=True)
                os.replace(source, target)
            renamed.append(f"{split}/{name}")
            moved += 1
        entry["filenames"] = renamed
    if moved:
        write_info(out, info)
        print(f"{out}: moved {moved} shard(s) into per-split folders ({', '.join(f'{s}/' for s in info['splits'])})",
              file=log or sys.stderr, flush=True)
    return moved


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m shards.layout DIR``: move a flat shard directory into split folders."""
    p = argparse.ArgumentParser(prog="python -m shards.layout",
                                description="Move a shard directory written with every split side by side into "
                                            "per-split folders (renames only; _info.json rewritten last).")
    p.add_argument("dir", type=Path, help="shard directory holding _info.json")
    p.add_argument("--quiet", action="store_true", help="say nothing when there is nothing to move")
    args = p.parse_args(argv)
    if read_info(args.dir) is None:
        print(f"error: {args.dir / INFO}: not found or not a timm-style index; pass the directory a writer made "
              f"(its --out)", file=sys.stderr)
        return 2
    try:
        moved = move_flat_layout(args.dir)
    except OSError as e:
        print(f"error: {e.filename or args.dir}: {e.strerror or e}; fix this and rerun the same command",
              file=sys.stderr)
        return 2
    if not moved and not args.quiet:
        print(f"{args.dir}: already one folder per split; nothing to move")
    return 0


if __name__ == "__main__":
    sys.exit(main())
