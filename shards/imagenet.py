"""ImageNet sources: what images a split holds, their labels, and how to read their bytes.

Two layouts are understood:

* ``imagefolder``: ``SOURCE/{train,val}/<wnid>/*.JPEG`` (one folder per class, as torchvision's
  ``ImageFolder`` reads it).
* ``ilsvrc``: the official ILSVRC2012 files, read in place without unpacking:
  ``ILSVRC2012_img_train.tar`` (a tar of per-class ``<wnid>.tar`` tars) and
  ``ILSVRC2012_img_val.tar`` (flat ``ILSVRC2012_val_00000001.JPEG`` ...), with validation labels
  from ``ILSVRC2012_devkit_t12.tar.gz`` or a ``<filename> <wnid>`` labels file.

Class indices follow the sorted WordNet ids, the order torchvision and timm use, so shards
written from either layout agree with each other and with pretrained ImageNet classifiers.

Images are not read here: a split is indexed into :class:`Item` records (file, byte offset,
size) that worker processes read directly, so members of a 140 GB tar are reached by a seek
instead of a scan.
"""
from __future__ import annotations

import io
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, TextIO

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
DEVKIT_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
FORMATS = ("imagefolder", "ilsvrc")

# torchvision's ImageFolder extensions: the same files are picked up as it would
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(Exception):
    """A problem with the user's input files. The message names the file and the fix."""


class Item(NamedTuple):
    """One image to shard: where its bytes are and which class it is.

    A tuple rather than a dataclass: ImageNet's train split is 1.28 M of these, kept in memory
    and pickled to workers shard by shard.
    """

    key: str  # the sample's webdataset key: the source file's stem, unique within the split
    label: int
    path: str  # the image file, or the tar that holds it
    offset: int  # byte offset of the image inside ``path``; -1: the whole file
    size: int  # bytes at ``offset`` (unused for whole files)
    member: str = ""  # the image's name inside the tar, for messages

    @property
    def where(self) -> str:
        """The image's location for messages: a file, or a tar and its member."""
        return f"{self.path} (member {self.member})" if self.member else self.path


def read_item(item: Item) -> bytes:
    """The image's bytes, exactly as stored in the source."""
    if item.offset < 0:
        return Path(item.path).read_bytes()
    fd = os.open(item.path, os.O_RDONLY)
    try:
        data = os.pread(fd, item.size, item.offset)
    finally:
        os.close(fd)
    if len(data) != item.size:
        raise SourceError(f"{item.where}: the tar ends inside this image ({len(data)} of {item.size} bytes); "
                          f"the file is truncated: download it again")
    return data


def _key(stem: str) -> str:
    # webdataset splits a member name at the first dot of its basename: keys must not hold one
    return stem.replace(".", "_")


def unique_keys(stems: list[str], wnids: list[str]) -> list[str]:
    """Webdataset keys for a split's files: their stems, made unique if two files share one.

    ImageNet's file names are unique, so its keys are the original names (timm maps a key back
    to ``<key>.JPEG``). Other ImageFolder trees may repeat a name across classes: those keys get
    the class folder as a prefix, and any left-over clash a counter.
    """
    keys = [_key(s) for s in stems]
    if len(set(keys)) == len(keys):
        return keys
    keys = [k if k.startswith(w) else f"{_key(w)}_{k}" for k, w in zip(keys, wnids)]
    taken, seen, out = set(keys), set(), []
    for k in keys:
        new, n = k, 0
        while new in seen or (n and new in taken):  # a suffixed key must not take another file's name
            n += 1
            new = f"{k}_{n}"
        seen.add(new)
        out.append(new)
    return out


def detect_format(source: Path) -> str:
    """``ilsvrc`` or ``imagefolder``, from what ``source`` holds."""
    if (source / TRAIN_TAR).is_file() or (source / VAL_TAR).is_file():
        return "ilsvrc"
    if (source / "train").is_dir() or (source / "val").is_dir():
        return "imagefolder"
    raise SourceError(f"{source}: unknown layout: expected {TRAIN_TAR} / {VAL_TAR} (the official ILSVRC2012 "
                      f"files) or train/ and val/ folders with one sub-folder per class; point SOURCE at the "
                      f"folder that holds them, or pass --format")


def _check_known(wnid: str, classes: dict[str, int], where: str, class_source: str) -> int:
    if wnid not in classes:
        raise SourceError(f"{where}: class {wnid} is not in the class list ({len(classes)} classes from "
                          f"{class_source}); remove these images or correct the label")
    return classes[wnid]


# ---------------------------------------------------------------------------------------------
# ImageFolder


class ImageFolderSource:
    """``root/<split>/<wnid>/**/*.<image extension>``; classes from ``train/`` (else ``val/``)."""

    def __init__(self, root: Path):
        self.root = root

    def _class_root(self) -> Path:
        return self.root / "train" if (self.root / "train").is_dir() else self.root / "val"

    def classes(self) -> list[str]:
        """Sorted class folder names of the train split (of val if there is no train split)."""
        folder = self._class_root()
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not names:
            loose = any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(folder))
            hint = (f"it holds images directly: sort them into {folder}/<wnid>/ folders, or for the official "
                    f"validation images use --format ilsvrc with {VAL_TAR} and --val-labels") if loose else \
                "it is empty"
            raise SourceError(f"{folder}: no class folders ({hint})")
        return names

    def items(self, split: str, classes: list[str]) -> list[Item]:
        """Every image of ``split``, sorted by class and path (the order the permutation starts from)."""
        folder = self.root / split
        if not folder.is_dir():
            raise SourceError(f"{folder}: split folder not found; pass --splits with the splits that exist "
                              f"under {self.root}")
        index = {w: i for i, w in enumerate(classes)}
        found: list[tuple[str, Path]] = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            _check_known(entry.name, index, entry.path, str(self._class_root()))
            found += [(entry.name, p) for p in _images_under(Path(entry.path))]
        if not found:
            raise SourceError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        keys = unique_keys([p.stem for _, p in found], [w for w, _ in found])
        return [Item(k, index[w], str(p), -1, 0) for k, (w, p) in zip(keys, found)]


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, like torchvision), in sorted path order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


# ---------------------------------------------------------------------------------------------
# Official ILSVRC2012 files


class _Window(io.RawIOBase):
    """Bytes ``[start, end)`` of an open file, addressed in the file's own offsets.

    ``tarfile`` opened on a window lists a tar nested inside another with member offsets that
    are absolute in the outer file (so a worker can later read them with one ``pread``), and it
    cannot run past the nested tar into the outer tar's next header.
    """

    def __init__(self, f, start: int, end: int):
        super().__init__()
        self.f, self.start, self.end, self.pos = f, start, end, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.end + pos}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


def _tar_members(path: Path, fileobj=None) -> list[tarfile.TarInfo]:
    """Regular-file members of a tar, or a :class:`SourceError` naming it if it cannot be read."""
    try:
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as tar:
            return [m for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: not a readable tar ({e}); download it again") from None


def read_labels_file(path: Path) -> dict[str, str]:
    """``{file stem: wnid}`` from lines ``<filename> <wnid>`` (blank lines and ``#`` comments skipped)."""
    if not path.is_file():
        raise SourceError(f"{path}: labels file not found; pass --val-labels with a file of "
                          f"'<filename> <wnid>' lines")
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise SourceError(f"{path}:{n}: expected '<filename> <wnid>', got {line!r}; fix or remove the line")
        labels[Path(parts[0]).stem] = parts[1]
    return labels


def _load_meta_mat(devkit: Path, data: bytes) -> list[tuple[int, str]]:
    """``(ILSVRC2012_ID, WNID)`` of the 1000 leaf synsets in the devkit's ``meta.mat``."""
    try:
        import scipy.io
    except ImportError:
        raise SourceError(f"{devkit}: reading its meta.mat needs scipy, which is not installed; "
                          f"`pip install scipy`, or pass --val-labels FILE with '<filename> <wnid>' lines "
                          f"instead of using the devkit") from None
    import numpy as np

    try:
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"])
        # only the leaves (num_children == 0; the first 1000 in the real file) are ILSVRC classes
        return [(int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0]
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise SourceError(f"{devkit}: {DEVKIT_META} is not the ILSVRC2012 synset table ({e!r}); download the "
                          f"devkit again or pass --val-labels FILE") from None


def read_devkit(devkit: Path) -> tuple[list[str], dict[str, str]]:
    """The devkit's class wnids and ``{validation file stem: wnid}`` from its ground truth."""
    try:
        with tarfile.open(devkit, "r:gz") as tar:
            meta, truth = (tar.extractfile(name).read() for name in (DEVKIT_META, DEVKIT_TRUTH))
    except KeyError as e:
        raise SourceError(f"{devkit}: no member {e}; this is not the ILSVRC2012 devkit (t12): download it again "
                          f"or pass --val-labels FILE") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{devkit}: not a readable .tar.gz ({e}); download it again or pass --val-labels FILE") \
            from None
    by_id = dict(_load_meta_mat(devkit, meta))
    labels = {}
    for n, line in enumerate(truth.decode().split(), 1):
        # line n is the class id of ILSVRC2012_val_<n:08d>.JPEG
        if int(line) not in by_id:
            raise SourceError(f"{devkit}: {DEVKIT_TRUTH} line {n}: class id {line} is not in {DEVKIT_META}; "
                              f"download the devkit again")
        labels[f"ILSVRC2012_val_{n:08d}"] = by_id[int(line)]
    return sorted(by_id.values()), labels


class IlsvrcSource:
    """The official ILSVRC2012 tars in ``root``, read in place."""

    def __init__(self, root: Path, val_labels: Optional[Path] = None, log: TextIO = sys.stderr):
        self.root, self.val_labels, self.log = root, val_labels, log
        self._outer: Optional[list[tarfile.TarInfo]] = None

    def _train_classes(self) -> list[tarfile.TarInfo]:
        """The train tar's per-class members ``<wnid>.tar`` (cached: listing seeks through 140 GB)."""
        if self._outer is None:
            path = self.root / TRAIN_TAR
            members = _tar_members(path)
            odd = [m.name for m in members if not m.name.endswith(".tar")]
            if odd:
                raise SourceError(f"{path}: member {odd[0]} is not a per-class <wnid>.tar; {TRAIN_TAR} must be "
                                  f"the official tar of class tars (or use --format imagefolder on unpacked files)")
            self._outer = sorted(members, key=lambda m: m.name)
        return self._outer

    def _class_source(self) -> Path:
        """Where the class list comes from: the train tar, else the devkit, else the labels file."""
        if (self.root / TRAIN_TAR).is_file():
            return self.root / TRAIN_TAR
        if self.val_labels is None and (self.root / DEVKIT).is_file():
            return self.root / DEVKIT
        return self.val_labels or self.root / DEVKIT

    def classes(self) -> list[str]:
        """Sorted wnids of the class tars in the train tar, the devkit's leaf synsets, or the labels file."""
        source = self._class_source()
        if source.name == TRAIN_TAR:
            return [Path(m.name).stem for m in self._train_classes()]
        if source.name == DEVKIT and self.val_labels is None:
            return read_devkit(source)[0]
        return sorted(set(self._labels().values()))

    def items(self, split: str, classes: list[str]) -> list[Item]:
        if split == "train":
            return self._train_items(classes)
        if split == "val":
            return self._val_items(classes)
        raise SourceError(f"split {split!r}: the ILSVRC2012 files hold only 'train' and 'val'; "
                          f"pass --splits train,val")

    def _require(self, name: str) -> Path:
        path = self.root / name
        if not path.is_file():
            raise SourceError(f"{path} not found; put the official file there, or leave its split out of --splits")
        return path

    def _train_items(self, classes: list[str]) -> list[Item]:
        """Every member of every class tar, by class then name, with offsets in the outer tar."""
        path = self._require(TRAIN_TAR)
        index = {w: i for i, w in enumerate(classes)}
        found: list[tuple[str, str, tarfile.TarInfo]] = []
        outers, last = self._train_classes(), time.monotonic()
        with open(path, "rb") as f:
            for n, outer in enumerate(outers, 1):
                if time.monotonic() - last >= 10:  # listing 1.28 M headers takes a while on a disk
                    last = time.monotonic()
                    print(f"indexing {path.name}: {n}/{len(outers)} class tars, {len(found)} images",
                          file=self.log, flush=True)
                wnid = Path(outer.name).stem
                _check_known(wnid, index, f"{path} (member {outer.name})", str(path))
                window = _Window(f, outer.offset_data, outer.offset_data + outer.size)
                inner = _tar_members(Path(f"{path}/{outer.name}"), fileobj=window)
                found += [(wnid, outer.name, m) for m in sorted(inner, key=lambda m: m.name)]
        keys = unique_keys([Path(m.name).stem for _, _, m in found], [w for w, _, _ in found])
        return [Item(k, index[w], str(path), m.offset_data, m.size, f"{o}/{m.name}")
                for k, (w, o, m) in zip(keys, found)]

    def _labels(self) -> dict[str, str]:
        """``{validation file stem: wnid}`` from --val-labels if given, else the devkit."""
        if self.val_labels is not None:
            return read_labels_file(self.val_labels)
        devkit = self.root / DEVKIT
        if not devkit.is_file():
            raise SourceError(f"no validation labels: {devkit} not found; put the devkit there or pass "
                              f"--val-labels FILE with '<filename> <wnid>' lines")
        return read_devkit(devkit)[1]

    def _val_items(self, classes: list[str]) -> list[Item]:
        path = self._require(VAL_TAR)
        labels, index = self._labels(), {w: i for i, w in enumerate(classes)}
        label_source = str(self.val_labels or self.root / DEVKIT)
        members = sorted((m for m in _tar_members(path) if m.name.lower().endswith(IMAGE_EXTENSIONS)),
                         key=lambda m: m.name)
        found = []
        for m in members:
            stem = Path(m.name).stem
            if stem not in labels:
                raise SourceError(f"{path} (member {m.name}): no label for this image in {label_source}; add a "
                                  f"'{Path(m.name).name} <wnid>' line (or pass the right --val-labels file)")
            where = f"{path} (member {m.name}), labelled in {label_source},"
            found.append((_check_known(labels[stem], index, where, str(self._class_source())), m))
        if not found:
            raise SourceError(f"{path}: no images in this tar; download it again")
        keys = unique_keys([Path(m.name).stem for _, m in found], [classes[i] for i, _ in found])
        return [Item(k, i, str(path), m.offset_data, m.size, m.name) for k, (i, m) in zip(keys, found)]


def open_source(fmt: str, root: Path, val_labels: Optional[Path],
                log: TextIO = sys.stderr) -> ImageFolderSource | IlsvrcSource:
    """The source reader for ``fmt`` (``log``: where slow indexing reports progress)."""
    if fmt == "imagefolder":
        if val_labels is not None:
            raise SourceError(f"--val-labels {val_labels}: only used with --format ilsvrc (an ImageFolder's "
                              f"labels are its class folders); drop the option")
        return ImageFolderSource(root)
    return IlsvrcSource(root, val_labels, log)
