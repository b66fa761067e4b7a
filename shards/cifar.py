"""Write CIFAR-10 or CIFAR-100 as webdataset shards from the official python tarball (no download).

    python -m shards.cifar --source cifar-100-python.tar.gz --out data/cifar100
    python -m shards.cifar --source cifar-10-python.tar.gz --out data/cifar10

The dataset is recognised from the tarball's members (``cifar-100-python/{train,test,meta}`` or
``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``), read as a stream without
unpacking anything to disk; the pickles are loaded with an unpickler that accepts nothing but
numpy arrays, lists and strings.

Splits: ``train`` (the official training set, 50,000 images) and ``val`` (the official test
set, 10,000: the split the literature reports; named ``val`` because recipes point ``data.val``
at it). Files are ``OUT/train/train-000000.tar`` ... and ``OUT/val/val-000000.tar`` ..., one
folder per split (:mod:`shards.layout`); each sample is a lossless PNG (``.png``) and its label
(``.cls``), keyed by its official index: ``train_00042`` is image 42 of the training set (CIFAR-10:
``data_batch_1`` holds 0-9,999, ``data_batch_2`` 10,000-19,999, ...), ``test_00042`` image 42
of the test set. Samples stay in the official order, which is already a random permutation
(the dataset's authors shuffled it), so consecutive shards mix every class; the training
loader also shuffles shards per epoch and samples in a buffer. ``classes.txt`` lists the class
names (line number = label) and a timm-style ``_info.json`` the shards and their lengths.

Rerunning the same command is a no-op once ``_info.json`` (written last) lists every shard of
the same source and shard size; otherwise every shard is written again (byte-identical, via
``<name>.tmp`` and a rename: a crash never leaves a truncated shard under a final name). A
directory written before the per-split folders is moved into them (renames only).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import pickle
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, Optional, Sequence, TextIO

import numpy as np
from PIL import Image

from shards.imagenet import SourceError
from shards.layout import (move_flat_layout, read_info, remove_temporaries, shard_file, shard_writer, split_entry,
                           write_info)
from shards.write import Progress, ShardResult, class_report, stale_report, write_classes

SIDE = 32
PIXELS = 3 * SIDE * SIDE
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class Layout:
    """One dataset's tarball: its folder, member names and dictionary keys."""

    name: str  # dataset name in _info.json and the default output folder
    root: str  # the folder inside the tarball
    tarball: str  # the official file name, for messages
    train: tuple[str, ...]  # training batches, in index order
    test: str
    meta: str
    label_key: bytes
    names_key: bytes

    def members(self) -> list[str]:
        return [f"{self.root}/{m}" for m in (*self.train, self.test, self.meta)]


LAYOUTS = {layout.root: layout for layout in (
    Layout("cifar100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta",
           b"fine_labels", b"fine_label_names"),
    Layout("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)),
           "test_batch", "batches.meta", b"labels", b"label_names"),
)}
# the same datasets in the formats this tool does not read: worth a message of their own
OTHER_VERSIONS = {"cifar-10-batches-bin": "cifar-10-binary.tar.gz (the binary version)",
                  "cifar-10-batches-mat": "cifar-10-matlab.tar.gz (the MATLAB version)",
                  "cifar-100-binary": "cifar-100-binary.tar.gz (the binary version)",
                  "cifar-100-matlab": "cifar-100-matlab.tar.gz (the MATLAB version)"}
EXPECTED = ("the official CIFAR python tarball: cifar-100-python.tar.gz (cifar-100-python/{train,test,meta}) "
            "or cifar-10-python.tar.gz (cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}), from " + URL)
SPLITS = {"train": "train", "val": "test"}  # split name -> key prefix (the official set's name)
DEFAULT_SHARD_SIZE = 625  # 80 train shards: as many per rank on 1, 2, 4, 5, 8, 10 or 16 ranks; 16 val shards


class Split(NamedTuple):
    pixels: np.ndarray  # (N, 3072) uint8: R, G, B planes of 32 rows of 32, as the pickles store them
    labels: np.ndarray  # (N,) int64


class Labelled(NamedTuple):
    """What :func:`shards.write.class_report` reads of a sample."""

    label: int


# ---------------------------------------------------------------------------------------------
# Reading the tarball


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for CIFAR's batches: numpy arrays, dicts, lists, numbers and strings, nothing else."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does")
        if module == "numpy.core.multiarray":  # named by numpy 1 (the official files): this numpy's own
            return np.ndarray.__reduce__(np.zeros(0))[0]  # reconstructor, wherever it keeps it
        return super().find_class(module, name)


def _load(source: Path, member: str, stream: IO[bytes]) -> dict:
    """Unpickle one member straight from the tar stream (no copy of its bytes is held)."""
    try:
        obj = _ArraysOnly(stream, encoding="bytes").load()
    except (tarfile.TarError, OSError, zlib.error):
        raise  # the archive itself is broken: reported by read_tarball
    except Exception as e:  # a foreign file under a CIFAR name: any failure of the unpickler means "not CIFAR"
        raise SourceError(f"{source} (member {member}): not a pickled CIFAR batch ({type(e).__name__}: {e}); "
                          f"expected {EXPECTED}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{source} (member {member}): holds a {type(obj).__name__}, not the dict of a CIFAR batch; "
                          f"expected {EXPECTED}")
    return obj


def _detect(source: Path, name: str) -> Layout:
    root = name.removeprefix("./").split("/")[0]
    if root in LAYOUTS:
        return LAYOUTS[root]
    if root in OTHER_VERSIONS:
        raise SourceError(f"{source}: this is {OTHER_VERSIONS[root]}; this tool reads the python version: "
                          f"{EXPECTED}")
    raise SourceError(f"{source}: not a CIFAR python tarball (its first member is {name!r}); expected {EXPECTED}")


def read_tarball(source: Path) -> tuple[Layout, dict[str, dict]]:
    """The dataset's layout and its batches (member name -> unpickled dict), read in one streaming pass."""
    if not source.is_file():
        raise SourceError(f"{source}: file not found; pass --source the tarball you downloaded: {EXPECTED}")
    layout: Optional[Layout] = None
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(source, mode="r|*") as tar:  # a stream: members are read in order, nothing is extracted
            for member in tar:
                layout = layout or _detect(source, member.name)  # a foreign tarball fails at its first member
                name = member.name.removeprefix("./")
                if member.isfile() and name in layout.members():
                    batches[name] = _load(source, name, tar.extractfile(member))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{source}: cannot be read as a tar(.gz) archive ({type(e).__name__}: {e}); it is truncated "
                          f"or not a tarball: expected {EXPECTED}") from None
    if layout is None:
        raise SourceError(f"{source}: an empty archive; expected {EXPECTED}")
    missing = [m for m in layout.members() if m not in batches]
    if missing:
        raise SourceError(f"{source}: no member {', '.join(missing)}: the tarball is incomplete or not the official "
                          f"{layout.tarball}; download it again from {URL}")
    return layout, batches


def _batch(source: Path, member: str, obj: dict, label_key: bytes, num_classes: int) -> Split:
    """A batch's pixels and labels, checked: (N, 3072) uint8 and N labels in range."""
    where = f"{source} (member {member})"
    if b"data" not in obj or label_key not in obj:
        raise SourceError(f"{where}: a dict with keys {sorted(obj)}, not a CIFAR batch (b'data' and {label_key!r}); "
                          f"expected {EXPECTED}")
    pixels, labels = obj[b"data"], obj[label_key]
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == PIXELS):
        found = (f"{pixels.dtype} array of shape {pixels.shape}" if isinstance(pixels, np.ndarray)
                 else type(pixels).__name__)
        raise SourceError(f"{where}: b'data' is a {found}; a CIFAR batch holds N x {PIXELS} uint8 (32x32 RGB)")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: {label_key!r} is not a list of integer labels") from None
    if len(labels) != len(pixels):
        raise SourceError(f"{where}: {len(pixels)} images but {len(labels)} labels in {label_key!r}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise SourceError(f"{where}: label {labels[bad[0]]} of image {bad[0]} is outside [0, {num_classes}) "
                          f"({num_classes} class names in the meta file)")
    return Split(pixels, labels)


def read_cifar(source: Path) -> tuple[Layout, list[str], dict[str, Split]]:
    """The layout, the class names and the splits (``train``, ``val``) of a CIFAR python tarball."""
    layout, batches = read_tarball(source)
    meta_member = f"{layout.root}/{layout.meta}"
    names = batches[meta_member].get(layout.names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise SourceError(f"{source} (member {meta_member}): no list of class names under {layout.names_key!r}; "
                          f"expected {EXPECTED}")
    classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    parts = {split: [_batch(source, f"{layout.root}/{m}", batches.pop(f"{layout.root}/{m}"), layout.label_key,
                            len(classes)) for m in members]
             for split, members in (("train", layout.train), ("val", (layout.test,)))}
    splits = {split: ps[0] if len(ps) == 1 else Split(np.concatenate([p.pixels for p in ps]),
                                                      np.concatenate([p.labels for p in ps]))
              for split, ps in parts.items()}
    return layout, classes, splits


# ---------------------------------------------------------------------------------------------
# Writing


def png(row: np.ndarray) -> bytes:
    """One image's 3072 planar bytes as a PNG (lossless; RGB, 32x32)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(row.reshape(3, SIDE, SIDE).transpose(1, 2, 0))).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class ShardTask:
    """One shard to write (one Pool task): its path and its samples' rows, from official index ``start``."""

    path: str
    prefix: str
    start: int
    pixels: np.ndarray
    labels: np.ndarray


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (via a temporary name: a rewrite is byte-identical, a stop leaves nothing half-written)."""
    final = Path(task.path)
    with shard_writer(final) as sink:
        for i, (row, label) in enumerate(zip(task.pixels, task.labels)):
            sink.write({"__key__": f"{task.prefix}_{task.start + i:05d}", "png": png(row), "cls": int(label)})
    return ShardResult(final.name, len(task.labels), resumed=False)


def plan(split: str, data: Split, out: Path, shard_size: int) -> list[ShardTask]:
    """The split's shards in the official order, ``shard_size`` images each."""
    return [ShardTask(str(out / shard_file(split, i)), SPLITS[split], start, data.pixels[start:start + shard_size],
                      data.labels[start:start + shard_size])
            for i, start in enumerate(range(0, len(data.labels), shard_size))]


def _writer_record(source: Path, shard_size: int) -> dict:
    """How the shards were made; a rerun with the same record finds nothing to do."""
    return {"source": source.name, "source_bytes": source.stat().st_size, "shard_size": shard_size}


def _done(source: Path, out: Path, shard_size: int, log: TextIO) -> Optional[dict]:
    """The existing ``_info.json`` if it lists every shard, written from this source at this shard size.

    A directory written before the per-split folders is first moved into them (renames only).
    """
    move_flat_layout(out, log)
    try:
        record = _writer_record(source, shard_size)
        info = read_info(out)
        entries = [info["splits"][split] for split in SPLITS]
    except (OSError, KeyError, TypeError):  # no source file, no info (None), a split missing
        return None
    if not all(e.get("writer") == record and all((out / f).is_file() for f in e["filenames"]) for e in entries):
        return None
    print(f"{out}: already complete ({info.get('name')}, --shard-size {shard_size}); nothing to do", file=log)
    return info


def write_cifar(source: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1, log: Optional[TextIO] = None) -> dict:
    """Write the shards, ``classes.txt`` and ``_info.json`` (last) and return the info; raises SourceError."""
    source, log = Path(source), log or sys.stderr
    if out is not None and (info := _done(source, Path(out), shard_size, log)):  # no need to read the tarball
        return info
    layout, classes, splits = read_cifar(source)  # every input error before anything is written
    out = Path(out) if out is not None else Path("data") / layout.name
    if info := _done(source, out, shard_size, log):
        return info
    record = _writer_record(source, shard_size)
    out.mkdir(parents=True, exist_ok=True)  # an OSError (no permission, a file there) is reported by main()
    write_classes(out, classes)
    (out / "_info.json").unlink(missing_ok=True)  # it must not vouch for shards while they are rewritten
    info = {"name": layout.name, "classes": classes, "splits": {}}
    reports = []
    tasks = {split: plan(split, data, out, shard_size) for split, data in splits.items()}
    for split in tasks:
        (out / split).mkdir(exist_ok=True)
    processes = min(workers, sum(len(t) for t in tasks.values()))
    remove_temporaries(out, list(tasks))  # a killed run's half shards
    try:
        with (multiprocessing.Pool(processes) if processes > 1 else _Inline()) as pool:
            for split, split_tasks in tasks.items():
                progress = Progress(split, len(split_tasks), len(splits[split].labels), log)
                for result in pool.imap_unordered(write_shard, split_tasks):
                    progress.update(result.samples, result.resumed)
                info["splits"][split] = split_entry(split, [len(t.labels) for t in split_tasks], writer=record)
                reports.append(class_report(split, [Labelled(int(y)) for y in splits[split].labels], classes,
                                            len(split_tasks)))
                reports += stale_report(out, split, len(split_tasks))
    finally:
        remove_temporaries(out, list(tasks))  # stopped by an error or Ctrl-C: no half shard stays
    write_info(out, info)  # last: its presence means every shard is complete
    for line in reports:
        print(line, file=log)
    print(f"wrote {out / '_info.json'}", file=log, flush=True)
    return info


class _Inline:
    """A stand-in for a one-process Pool: the shards are written in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, tasks):
        return map(fn, tasks)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; input errors print one message and return 2 (no traceback)."""
    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
        return int(text)

    p = argparse.ArgumentParser(prog="python -m shards.cifar", description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True,
                   help="cifar-100-python.tar.gz or cifar-10-python.tar.gz, as downloaded from " + URL)
    p.add_argument("--out", type=Path, help="output directory (default: data/cifar100 or data/cifar10)")
    p.add_argument("--shard-size", type=positive, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default: {DEFAULT_SHARD_SIZE}: 80 train and 16 val shards)")
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1,
                   help="writer processes (default: all CPUs)")
    args = p.parse_args(argv)
    try:
        info = write_cifar(args.source, args.out, args.shard_size, args.workers)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, no permission: the user's to fix, then rerun
        print(f"error: {e.filename or ''}: {e.strerror or e}; fix this and rerun the same command", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}: {v['num_samples']} in {len(v['filenames'])} shards" for k, v in info["splits"].items())
    print(f"{info['name']} shards ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
