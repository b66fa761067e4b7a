"""Checkpoint manifests: each file's size and CRC-32, so a damaged checkpoint is found before it is loaded.

``harness.checkpoint`` writes ``manifest.json`` into a checkpoint once every rank has written
its files and before the checkpoint is published, and verifies it before a resume. Each byte
is read once, by one rank: a file's checksum is computed by the rank that wrote it (from its
page cache, in parallel), gathered into the manifest with the rank that wrote it; on resume
each rank verifies its share (:func:`verify` with ``rank``, ``world_size``) and the ranks agree
on one verdict. A file that
is missing, shorter or longer than written (a copy cut short, a full quota on a shared file
system) or changed in place (a flipped bit) is named, instead of torch failing to unpickle it
or, worse, loading garbage.

Why CRC-32 (``zlib.crc32`` over streamed chunks): the threat is accidental damage, not an
adversary, and CRC-32 detects every one- or two-bit error and every burst of up to 32 bits
(and all but 1 in 2^32 other changes) at memory speed. Measured on this project's CPU
machine over a 195 MiB ResNet-50 checkpoint (weights and momentum) in the page cache: CRC-32
0.12 s (1.7 GB/s) against blake2b's 0.51 s (390 MB/s), and 2.9 s for ``torch.save`` of it.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional

NAME = "manifest.json"
CHUNK = 4 << 20  # 4 MiB reads: large enough to run at memory speed, small enough to hold per file


def crc32(path: Path) -> str:
    """The CRC-32 of a file's bytes as 8 hex digits, read in chunks (no whole-file copy in memory)."""
    value, buffer = 0, bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            value = zlib.crc32(view[:n], value)
    return f"{value:08x}"


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != NAME)


def entries(directory: Path, files: list[Path], rank: int = 0) -> dict[str, dict]:
    """Manifest entries (size, CRC-32, the writing ``rank``) of ``files`` under ``directory``."""
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "crc32": crc32(p), "rank": rank}
            for p in files}


def write(directory: Path, known: Optional[dict[str, dict]] = None) -> None:
    """Record every file under ``directory`` in ``<directory>/manifest.json``.

    ``known``: entries the writing ranks computed (:func:`entries`); any other file is read here.
    """
    files = dict(known or {})
    files.update(entries(directory, [p for p in _files(directory) if p.relative_to(directory).as_posix() not in files]))
    (directory / NAME).write_text(json.dumps({"checksum": "crc32", "files": dict(sorted(files.items()))}, indent=1))


def share(files: dict[str, dict], rank: int, world_size: int) -> list[str]:
    """The names rank ``rank`` of ``world_size`` verifies: those it wrote at the same world size (its
    page cache, and what it loads next), else a deal by position; together every name exactly once."""
    names = sorted(files)
    return [n for i, n in enumerate(names) if files[n].get("rank", i) % world_size == rank]


def verify(directory: Path, rank: int = 0, world_size: int = 1) -> Optional[list[str]]:
    """What is wrong with this rank's share of the checkpoint in ``directory``: one line per bad file, [] if intact.

    None if it has no manifest (written before manifests existed): it cannot be verified.
    Sizes are compared first, so a truncated file is named as such without reading it. With
    the defaults (a world of one) the share is every file.
    """
    path = directory / NAME
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        mine = share(files, rank, world_size)
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return [f"{NAME} is unreadable"]
    problems = []
    for name in mine:
        expected = files[name]
        file = directory / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        size = file.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{name} is {'truncated' if size < expected['bytes'] else 'longer than written'} "
                            f"({size:,} of {expected['bytes']:,} bytes)")
        elif crc32(file) != expected["crc32"]:
            problems.append(f"{name} is damaged (its CRC-32 differs from the one written)")
    return problems
