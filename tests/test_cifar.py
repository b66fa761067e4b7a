"""CIFAR shard writer, on tiny tarballs in the exact official format (CIFAR-100 and CIFAR-10).

The fakes have the official member names and dict keys, pickled with protocol 2 and naming
numpy's reconstructor as numpy 1 did (``numpy.core.multiarray``), as the published files do.
"""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import cifar
from shards import verify as verify_cli

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN, TEST = 40, 20


def official_pickle(obj) -> bytes:
    """Protocol 2 with numpy 1's module name for the array reconstructor, as in the published files."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def make_tarball(path: Path, dataset: str, train: int = TRAIN, test: int = TEST, seed: int = 0) -> dict:
    """A CIFAR python tarball of random pixels; returns {"train"/"val": (pixels, labels), "classes": names}."""
    rng = np.random.default_rng(seed)
    classes = CIFAR10_NAMES if dataset == "cifar10" else [f"class_{i:02d}" for i in range(100)]
    pixels = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", train), ("val", test))}
    labels = {s: rng.integers(0, len(classes), len(p)).tolist() for s, p in pixels.items()}

    def batch(split, lo, hi, label_key, title):
        return {b"batch_label": title.encode(), label_key: labels[split][lo:hi], b"data": pixels[split][lo:hi],
                b"filenames": [f"img_{i}.png".encode() for i in range(lo, hi)]}

    with tarfile.open(path, "w:gz") as tar:
        if dataset == "cifar100":
            _add_dir(tar, "cifar-100-python")
            _add(tar, "cifar-100-python/file.txt~", b"")
            for split, member in (("train", "train"), ("val", "test")):
                b = batch(split, 0, len(labels[split]), b"fine_labels", f"{member}ing batch 1 of 1")
                b[b"coarse_labels"] = [y // 5 for y in labels[split]]
                _add(tar, f"cifar-100-python/{member}", official_pickle(b))
            _add(tar, "cifar-100-python/meta", official_pickle(
                {b"fine_label_names": [c.encode() for c in classes],
                 b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}))
        else:
            _add_dir(tar, "cifar-10-batches-py")
            per = train // 5
            for i in (4, 1, 3, 5, 2):  # not in index order, as in the published tarball
                _add(tar, f"cifar-10-batches-py/data_batch_{i}",
                     official_pickle(batch("train", (i - 1) * per, i * per, b"labels", f"training batch {i} of 5")))
            _add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
            _add(tar, "cifar-10-batches-py/test_batch",
                 official_pickle(batch("val", 0, test, b"labels", "testing batch 1 of 1")))
            _add(tar, "cifar-10-batches-py/batches.meta", official_pickle(
                {b"num_cases_per_batch": per, b"label_names": [c.encode() for c in classes], b"num_vis": 3072}))
    return {"train": (pixels["train"], labels["train"]), "val": (pixels["val"], labels["val"]), "classes": classes}


def files_under(out: Path) -> dict[str, Path]:
    """Every file below ``out`` by its relative path (shards sit in split folders)."""
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}


def read_shard(path: Path) -> dict:
    """key -> (HWC pixels, label) of every sample in a shard."""
    samples: dict = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            samples.setdefault(key, {})[ext] = data
    return {k: (np.asarray(Image.open(io.BytesIO(m["png"]))), int(m["cls"])) for k, m in samples.items()}


@pytest.mark.parametrize("dataset", ["cifar100", "cifar10"])
def test_shards_round_trip_pixels_labels_counts_and_info(tmp_path, dataset, capsys):
    source = make_tarball(tmp_path / f"{dataset}.tar.gz", dataset)
    out = tmp_path / "out"
    info = cifar.write_cifar(tmp_path / f"{dataset}.tar.gz", out, shard_size=16)
    assert verify_cli.main([str(out), "--workers", "1"]) == 0
    assert "no problems" in capsys.readouterr().out

    assert info == json.loads((out / "_info.json").read_text())
    assert info["name"] == dataset and info["classes"] == source["classes"]
    assert (out / "classes.txt").read_text().split() == source["classes"]
    assert sorted(info["splits"]) == ["train", "val"]
    for split, prefix, n in (("train", "train", TRAIN), ("val", "test", TEST)):
        entry = info["splits"][split]
        shards = (n + 15) // 16
        assert entry["name"] == split and entry["num_samples"] == n
        assert entry["filenames"] == [f"{split}/{split}-{i:06d}.tar" for i in range(shards)]
        assert entry["shard_lengths"] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
        pixels, labels = source[split]
        keys = []
        for name in entry["filenames"]:
            samples = read_shard(out / name)
            keys += list(samples)
            for key, (image, label) in samples.items():
                index = int(key.removeprefix(f"{prefix}_"))
                assert image.shape == (32, 32, 3) and image.dtype == np.uint8
                # planar R, G, B of 32 rows of 32 -> exactly this image, pixel for pixel
                assert np.array_equal(image, pixels[index].reshape(3, 32, 32).transpose(1, 2, 0))
                assert label == labels[index]
        assert keys == [f"{prefix}_{i:05d}" for i in range(n)]  # official order, official index in the key


def test_rerun_is_a_no_op_and_a_rewrite_is_byte_identical(tmp_path, capsys):
    make_tarball(tmp_path / "c.tar.gz", "cifar100")
    out = tmp_path / "out"
    cifar.write_cifar(tmp_path / "c.tar.gz", out, shard_size=16)
    before = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in files_under(out).items()}
    capsys.readouterr()
    again = cifar.write_cifar(tmp_path / "c.tar.gz", out, shard_size=16)
    assert "already complete" in capsys.readouterr().err
    assert again == json.loads((out / "_info.json").read_text())
    assert {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in files_under(out).items()} == before
    # an interrupted run: a shard missing, a half-written .tmp; the rerun writes everything again, identically
    (out / "train" / "train-000001.tar").unlink()
    (out / "val" / "val-000000.tar.tmp").write_bytes(b"partial")
    cifar.write_cifar(tmp_path / "c.tar.gz", out, shard_size=16, workers=2)  # a Pool of 2 writes the same bytes
    assert {name: p.read_bytes() for name, p in files_under(out).items()} == {k: v[0] for k, v in before.items()}


def test_other_dataset_into_the_same_directory_is_refused(tmp_path, capsys):
    make_tarball(tmp_path / "c100.tar.gz", "cifar100")
    make_tarball(tmp_path / "c10.tar.gz", "cifar10")
    out = tmp_path / "out"
    assert cifar.main(["--source", str(tmp_path / "c100.tar.gz"), "--out", str(out), "--workers", "1"]) == 0
    assert cifar.main(["--source", str(tmp_path / "c10.tar.gz"), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"classes.txt lists 100 classes that differ" in err and "empty --out directory" in err


def _foreign_tar(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "train/n01440764/img.JPEG", b"\xff\xd8\xff")


def _binary_version(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-bin/data_batch_1.bin", bytes(3073))


def _missing_test(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-100-python/train", official_pickle({b"data": np.zeros((1, 3072), np.uint8)}))


def _not_a_pickle(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name in ("train", "test", "meta"):
            _add(tar, f"cifar-100-python/{name}", b"this is not a pickle")


class Boom:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def _code_in_pickle(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-100-python/train", pickle.dumps({b"data": Boom()}, protocol=2))


def _wrong_shape(path: Path) -> None:
    make_tarball(path, "cifar100")
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    members["cifar-100-python/test"] = official_pickle({b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            _add(tar, name, data)


def _truncated(path: Path) -> None:
    make_tarball(path, "cifar10")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


BAD = {
    "foreign": (_foreign_tar, "not a CIFAR python tarball (its first member is 'train/n01440764/img.JPEG')"),
    "binary": (_binary_version, "this is cifar-10-binary.tar.gz (the binary version); this tool reads the python"),
    "missing": (_missing_test, "no member cifar-100-python/test, cifar-100-python/meta: the tarball is incomplete"),
    "not_pickle": (_not_a_pickle, "(member cifar-100-python/train): not a pickled CIFAR batch (UnpicklingError"),
    "code": (_code_in_pickle, "not a pickled CIFAR batch (UnpicklingError: it refers to posix.system"),
    "shape": (_wrong_shape, "(member cifar-100-python/test): b'data' is a uint8 array of shape (2, 1024); a CIFAR"),
    "truncated": (_truncated, "cannot be read as a tar(.gz) archive"),
    "not_tar": (lambda p: p.write_bytes(b"hello, not a tarball" * 50), "cannot be read as a tar(.gz) archive"),
    "absent": (lambda p: None, "file not found; pass --source the tarball you downloaded"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_wrong_tarball_gives_one_message_naming_the_file_and_what_was_expected(tmp_path, case, capsys,
                                                                                  monkeypatch):
    make, message = BAD[case]
    source = tmp_path / "download.tar.gz"
    make(source)
    monkeypatch.chdir(tmp_path)
    assert cifar.main(["--source", str(source), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}") and err.count("\n") == 1, err
    assert message in err
    if case not in ("binary", "missing", "shape"):
        assert "cifar-100-python.tar.gz (cifar-100-python/{train,test,meta}) or cifar-10-python.tar.gz" in err
    assert not (tmp_path / "out").exists()  # nothing written
    assert not (tmp_path / "pwned").exists()  # nothing executed


def test_command_line_writes_and_a_bad_source_exits_2_without_traceback(tmp_path):
    make_tarball(tmp_path / "cifar-10-python.tar.gz", "cifar10")
    ok = subprocess.run([sys.executable, "-m", "shards.cifar", "--source", str(tmp_path / "cifar-10-python.tar.gz"),
                         "--out", str(tmp_path / "out"), "--shard-size", "8"], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert "cifar10 shards (train: 40 in 5 shards, val: 20 in 3 shards)" in ok.stdout
    _foreign_tar(tmp_path / "other.tar.gz")
    bad = subprocess.run([sys.executable, "-m", "shards.cifar", "--source", str(tmp_path / "other.tar.gz")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"error: {tmp_path / 'other.tar.gz'}: not a CIFAR python tarball")
