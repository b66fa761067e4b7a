"""ImageNet shard writer and verifier, on a 20-class fake ImageNet in both source layouts.

The fake has real image files (JPEG, one class as PNG, one greyscale JPEG), an ImageFolder tree
and the same images as the official ILSVRC2012 files (a tar of per-class tars, a flat
validation tar, a labels file and, with scipy, a devkit whose meta.mat has the real structure).
"""
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import verify as verify_cli
from shards import write as write_cli

ROOT = Path(__file__).resolve().parents[1]
WNIDS = [f"n{i:08d}" for i in range(1, 21)]
PNG_CLASS, GREY_CLASS = WNIDS[3], WNIDS[5]
TRAIN_PER_CLASS, VAL_PER_CLASS, SHARD = 6, 2, 16

try:
    import scipy.io  # noqa: F401
    HAVE_SCIPY = True
except ImportError:
    HAVE_SCIPY = False


@dataclass
class FakeImageNet:
    folder: Path  # ImageFolder layout
    ilsvrc: Path  # official files (with the devkit if scipy is available)
    labels_file: Path  # '<filename> <wnid>' for every validation image
    wnid_of: dict  # sample key -> wnid, both splits
    data_of: dict  # sample key -> source bytes


def _image(rng: np.random.Generator, index: int, fmt: str, grey: bool = False) -> bytes:
    """A small random-ish image (landscape or portrait) encoded as ``fmt``."""
    h, w = (48, 64) if index % 2 == 0 else (64, 48)
    base = np.linspace(0, 200, w)[None, :, None] + rng.integers(0, 55, (h, w, 3))
    pixels = base.clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels[:, :, 0] if grey else pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            _add(tar, name, data)
    return buf.getvalue()


def _write_devkit(path: Path, val_wnids: list) -> None:
    """A devkit tar.gz shaped like the real one: 'synsets' struct array, leaves first, then parents.

    ILSVRC2012_IDs are not in wnid order (as in the real file), so a reader that confuses the
    id with the sorted-wnid index gets the labels wrong.
    """
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    order = list(reversed(WNIDS))  # id 1 is the last wnid
    parents = ["n09999998", "n09999999"]
    synsets = np.zeros((len(order) + len(parents), 1), dtype=[(f, "O") for f in fields])
    for i, wnid in enumerate(order + parents):
        leaf = i < len(order)
        children = np.zeros((1, 0)) if leaf else np.arange(1, 11, dtype=np.uint16)[None, :]
        synsets[i, 0] = (np.array([[i + 1]], dtype=np.uint16), np.array([wnid]), np.array([f"synset {i}"]),
                         np.array(["a fake synset"]), np.array([[0 if leaf else 10]], dtype=np.uint8), children,
                         np.array([[0 if leaf else 1]], dtype=np.uint8),
                         np.array([[TRAIN_PER_CLASS if leaf else 0]], dtype=np.uint16))
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{order.index(w) + 1}\n" for w in val_wnids)
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> FakeImageNet:
    root = tmp_path_factory.mktemp("fake_imagenet")
    rng = np.random.default_rng(0)
    folder, ilsvrc = root / "folder", root / "ilsvrc"
    ilsvrc.mkdir()
    wnid_of, data_of, inner_tars = {}, {}, {}
    for c, wnid in enumerate(WNIDS):
        ext, fmt = (".png", "PNG") if wnid == PNG_CLASS else (".JPEG", "JPEG")
        (folder / "train" / wnid).mkdir(parents=True)
        members = {}
        for j in range(TRAIN_PER_CLASS):
            key = f"{wnid}_{j}"
            data = _image(rng, j, fmt, grey=wnid == GREY_CLASS and j == 0)
            (folder / "train" / wnid / f"{key}{ext}").write_bytes(data)
            members[f"{key}.JPEG"] = data  # the official tar names every file .JPEG (a few are PNG inside)
            wnid_of[key], data_of[key] = wnid, data
        inner_tars[f"{wnid}.tar"] = _tar_bytes(members)
    (ilsvrc / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(dict(reversed(list(inner_tars.items())))))
    # validation numbers interleave the classes, as in the real set
    val_wnids = [WNIDS[i] for i in rng.permutation(np.repeat(np.arange(len(WNIDS)), VAL_PER_CLASS))]
    val_files = {}
    for n, wnid in enumerate(val_wnids, 1):
        key = f"ILSVRC2012_val_{n:08d}"
        data = _image(rng, n, "PNG" if wnid == PNG_CLASS else "JPEG", grey=wnid == GREY_CLASS)
        (folder / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (folder / "val" / wnid / f"{key}.JPEG").write_bytes(data)
        val_files[f"{key}.JPEG"] = data
        wnid_of[key], data_of[key] = wnid, data
    (ilsvrc / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val_files))
    labels_file = root / "val_labels.txt"
    labels_file.write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG {w}\n" for n, w in enumerate(val_wnids, 1)))
    if HAVE_SCIPY:
        _write_devkit(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz", val_wnids)
    return FakeImageNet(folder, ilsvrc, labels_file, wnid_of, data_of)


def write(source: Path, out: Path, *extra: str) -> int:
    return write_cli.main([str(source), "--out", str(out), "--shard-size", str(SHARD), "--workers", "2", *extra])


@pytest.fixture(scope="module")
def written(fake, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards_folder")
    assert write(fake.folder, out) == 0
    return out


def shard_files(out: Path) -> dict:
    """``{relative path: (mtime_ns, bytes)}`` of every shard below ``out``."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*.tar"))}


def read_shards(out: Path, split: str) -> list:
    """``(shard, key, label, jpg bytes)`` of every sample, in _info.json's shard order."""
    info = json.loads((out / "_info.json").read_text())
    samples = []
    for name in info["splits"][split]["filenames"]:
        with tarfile.open(out / name) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        for (cls_name, cls), (jpg_name, jpg) in zip(members[::2], members[1::2]):
            key = cls_name[:-len(".cls")]
            assert cls_name.endswith(".cls") and jpg_name == f"{key}.jpg"
            samples.append((name, key, int(cls.decode("ascii")), jpg))
    return samples


def test_imagefolder_shards_labels_bytes_info_and_shuffle(fake, written):
    classes = (written / "classes.txt").read_text().split()
    assert classes == sorted(WNIDS)
    info = json.loads((written / "_info.json").read_text())
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        samples = read_shards(written, split)
        n = len(WNIDS) * per_class
        entry = info["splits"][split]
        assert entry["name"] == split and entry["num_samples"] == n == len(samples)
        assert entry["filenames"] == [f"{split}/{split}-{i:06d}.tar" for i in range(-(-n // SHARD))]
        assert entry["skipped"] == []
        assert entry["shard_lengths"] == [SHARD] * (n // SHARD) + ([n % SHARD] if n % SHARD else [])
        assert sorted(k for _, k, _, _ in samples) == sorted(k for k in fake.wnid_of if k.startswith("n") == (split == "train"))
        for _, key, label, jpg in samples:
            assert classes[label] == fake.wnid_of[key]
            assert jpg.startswith(b"\xff\xd8\xff")  # PNG sources re-encoded to JPEG
            if fake.wnid_of[key] != PNG_CLASS:
                assert jpg == fake.data_of[key]  # JPEG sources stored untouched
    by_shard = {}
    for shard, _, label, _ in read_shards(written, "train"):
        by_shard.setdefault(shard, set()).add(label)
    assert all(len(labels) >= 5 for shard, labels in by_shard.items() if shard != "train/train-000007.tar")


def test_ilsvrc_files_give_the_same_classes_labels_and_bytes(fake, written, tmp_path):
    # the devkit route when scipy is there, otherwise the labels file
    extra = [] if HAVE_SCIPY else ["--val-labels", str(fake.labels_file)]
    assert write(fake.ilsvrc, tmp_path, *extra) == 0
    assert (tmp_path / "classes.txt").read_text() == (written / "classes.txt").read_text()
    for split in ("train", "val"):
        from_folder = {k: (label, jpg) for _, k, label, jpg in read_shards(written, split)}
        from_tars = {k: (label, jpg) for _, k, label, jpg in read_shards(tmp_path, split)}
        assert from_tars == from_folder


def test_ilsvrc_val_labels_file(fake, tmp_path):
    labels = fake.labels_file.read_text().splitlines()
    shuffled = tmp_path / "labels.txt"  # any order, with a comment and paths
    shuffled.write_text("# filename wnid\n" + "".join(f"val/{line}\n" for line in reversed(labels)))
    assert write(fake.ilsvrc, tmp_path / "out", "--splits", "val", "--val-labels", str(shuffled)) == 0
    classes = (tmp_path / "out" / "classes.txt").read_text().split()
    samples = read_shards(tmp_path / "out", "val")
    assert len(samples) == len(WNIDS) * VAL_PER_CLASS
    assert all(classes[label] == fake.wnid_of[key] for _, key, label, _ in samples)


@pytest.mark.skipif(not HAVE_SCIPY, reason="the devkit's meta.mat is read with scipy")
def test_devkit_alone_gives_the_leaf_classes_and_val_labels(fake, tmp_path):
    source = tmp_path / "src"  # no train tar: the class list comes from the devkit's 20 leaves, not its parents
    source.mkdir()
    for name in ("ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        (source / name).symlink_to(fake.ilsvrc / name)
    assert write(source, tmp_path / "out", "--splits", "val") == 0
    classes = (tmp_path / "out" / "classes.txt").read_text().split()
    assert classes == sorted(WNIDS)
    assert all(classes[label] == fake.wnid_of[key] for _, key, label, _ in read_shards(tmp_path / "out", "val"))


def test_devkit_without_scipy_points_to_the_labels_file(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy.io now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    source = tmp_path / "src"
    source.mkdir()
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (source / name).symlink_to(fake.ilsvrc / name)
    with tarfile.open(source / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:  # contents never parsed
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", b"MATLAB 5.0 MAT-file")
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n")
    err = _error(capsys, source, tmp_path / "out", "--splits", "val")
    assert "ILSVRC2012_devkit_t12.tar.gz: reading its meta.mat needs scipy" in err and "--val-labels FILE" in err
    assert write(source, tmp_path / "out", "--splits", "val", "--val-labels", str(fake.labels_file)) == 0


def test_unique_keys_keep_imagenet_names_and_resolve_clashes():
    from shards.imagenet import unique_keys

    assert unique_keys(["n1_5", "ILSVRC2012_val_00000001"], ["n1", "n2"]) == ["n1_5", "ILSVRC2012_val_00000001"]
    assert unique_keys(["a.b", "a.b", "x"], ["n1", "n2", "n1"]) == ["n1_a_b", "n2_a_b", "n1_x"]
    assert unique_keys(["a", "a", "a_1"], ["c", "c", "c"]) == ["c_a", "c_a_2", "c_a_1"]


def run_verify(out: Path, capsys) -> tuple[int, str]:
    code = verify_cli.main([str(out), "--workers", "2"])
    return code, capsys.readouterr().out


def _rewrite_member(shard: Path, member_suffix: str, data: bytes, which: int = 3) -> str:
    """Replace the data of the ``which``-th member ending in ``member_suffix``; return its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    hit = [m.name for m, _ in members if m.name.endswith(member_suffix)][which]
    with tarfile.open(shard, "w") as tar:
        for m, old in members:
            new = data if m.name == hit else old
            m.size = len(new)
            tar.addfile(m, io.BytesIO(new))
    return hit[:-len(member_suffix)]


def test_verify_passes_good_shards_and_names_shard_and_key_of_each_problem(written, tmp_path, capsys):
    code, out = run_verify(written, capsys)
    assert code == 0, out
    assert "160 samples in 11 shards" in out and "no problems" in out

    bad = tmp_path / "bad"
    shutil.copytree(written, bad)
    key = _rewrite_member(bad / "train" / "train-000002.tar", ".jpg", b"this is not a jpeg" * 20)
    code, out = run_verify(bad, capsys)
    assert code == 1 and f"train/train-000002.tar:{key}: .jpg does not decode" in out
    assert "1 problem(s)" in out

    shutil.copy(written / "train" / "train-000002.tar", bad / "train" / "train-000002.tar")
    key = _rewrite_member(bad / "val" / "val-000001.tar", ".cls", b"20")  # 20 classes: 0..19
    code, out = run_verify(bad, capsys)
    assert code == 1 and f"val/val-000001.tar:{key}: label 20 outside [0, 20)" in out

    shutil.copy(written / "val" / "val-000001.tar", bad / "val" / "val-000001.tar")
    shard = bad / "train" / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copy(written / "val" / "val-000000.tar", bad / "val" / "extra-000000.tar")
    (bad / "val" / "val-000002.tar").unlink()
    code, out = run_verify(bad, capsys)
    assert code == 1
    assert "train/train-000004.tar: truncated or unreadable tar" in out
    assert re.search(rf"train/train-000004.tar: \d+ samples, _info.json says {SHARD}", out)
    assert "val/extra-000000.tar: .tar file not listed in _info.json (the harness and timm ignore it)" in out
    assert "val/val-000002.tar: listed in _info.json (split val) but missing" in out


def test_verify_flags_a_sample_without_label(written, tmp_path, capsys):
    shutil.copytree(written, tmp_path / "d")
    shard = tmp_path / "d" / "train" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for m, data in members[1:]:  # drop the first sample's .cls
            tar.addfile(m, io.BytesIO(data))
    key = members[0][0].name[:-len(".cls")]
    code, out = run_verify(tmp_path / "d", capsys)
    assert code == 1 and f"train/train-000000.tar:{key}: no .cls member" in out


def test_resume_rewrites_only_missing_or_broken_shards_identically(fake, written, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(written, out)
    before = shard_files(out)
    (out / "train" / "train-000003.tar").unlink()
    (out / "train" / "train-000003.tar.tmp").write_bytes(b"left by a killed writer")
    broken = out / "val" / "val-000001.tar"
    broken.write_bytes(broken.read_bytes()[:3000])  # a truncated copy under a final name
    assert write(fake.folder, out) == 0
    after = shard_files(out)
    assert sorted(after) == sorted(before) and not list(out.rglob("*.tmp"))
    rewritten = {name for name in before if after[name][0] != before[name][0]}
    assert rewritten == {"train/train-000003.tar", "val/val-000001.tar"}  # the other 9 untouched
    assert all(after[name][1] == before[name][1] for name in before)  # byte-identical, deterministic plan


def test_max_size_downscales_the_shorter_side_and_keeps_aspect(fake, tmp_path):
    assert write(fake.folder, tmp_path, "--max-size", "32", "--quality", "80") == 0
    for split in ("train", "val"):
        for _, key, _, jpg in read_shards(tmp_path, split):
            img = Image.open(io.BytesIO(jpg))
            assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 32
            assert max(img.size) == round(32 * 64 / 48)
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["val"]["writer"]["max_size"] == 32


def test_timm_wds_reader_yields_every_sample_with_its_label(written):
    timm_data = pytest.importorskip("timm.data")
    expected = [label for _, _, label, _ in read_shards(written, "train")]
    ds = timm_data.create_dataset("wds/fake-imagenet", root=str(written), split="train", is_training=False,
                                  batch_size=1)
    got = [(img.size, target) for img, target in ds]
    assert [t for _, t in got] == expected  # single reader, not training: shard and tar order
    assert all(min(size) == 48 for size, _ in got)


def test_harness_shard_stream_reads_timm_convention_shards(written):
    from harness.data import EpochLoader, Preprocess, ShardStream, eval_transform, expand_urls

    urls = expand_urls(str(written / "val"))
    pre = Preprocess(image_size=16, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    stream = ShardStream(urls, eval_transform(pre), len(WNIDS), 8, train=False)
    labels = [y for _, ys in EpochLoader(stream, workers=0, pin_memory=False, pre=pre).epoch(0) for y in ys.tolist()]
    assert labels == [label for _, _, label, _ in read_shards(written, "val")]


def test_missing_source_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shards.write", str(tmp_path / "nowhere"), "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: SOURCE not found "
                                                  f"(or not a directory); pass the folder holding train/ and val/ "
                                                  f"or the ILSVRC2012 tars"]


def _error(capsys, source: Path, out: Path, *extra: str) -> str:
    assert write_cli.main([str(source), "--out", str(out), "--workers", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_input_errors_name_the_file_and_exit_2(fake, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "unknown layout" in _error(capsys, tmp_path / "empty", tmp_path / "o1")

    labels = tmp_path / "labels.txt"
    labels.write_text("".join(line + "\n" for line in fake.labels_file.read_text().splitlines()[1:]))
    err = _error(capsys, fake.ilsvrc, tmp_path / "o2", "--splits", "val", "--val-labels", str(labels))
    assert "ILSVRC2012_img_val.tar (member ILSVRC2012_val_00000001.JPEG): no label" in err and str(labels) in err

    labels.write_text(fake.labels_file.read_text().replace(fake.wnid_of["ILSVRC2012_val_00000002"], "n12345678", 1))
    err = _error(capsys, fake.ilsvrc, tmp_path / "o3", "--splits", "val", "--val-labels", str(labels))
    assert "class n12345678 is not in the class list" in err

    tree = tmp_path / "tree"
    shutil.copytree(fake.folder, tree)
    (tree / "val" / "n99999999").mkdir()
    err = _error(capsys, tree, tmp_path / "o4")
    assert f"{tree / 'val' / 'n99999999'}: class n99999999 is not in the class list" in err

    err = _error(capsys, fake.folder, tmp_path / "o5", "--splits", "test")
    assert f"{fake.folder / 'test'}: split folder not found" in err
    assert not (tmp_path / "o5").exists()  # input errors are found before anything is written

    source = tmp_path / "only_val"
    source.mkdir()
    (source / "ILSVRC2012_img_val.tar").symlink_to(fake.ilsvrc / "ILSVRC2012_img_val.tar")
    err = _error(capsys, source, tmp_path / "o6", "--val-labels", str(fake.labels_file))
    assert f"{source / 'ILSVRC2012_img_train.tar'} not found" in err

    broken = tree / "train" / PNG_CLASS / f"{PNG_CLASS}_2.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    shutil.rmtree(tree / "val" / "n99999999")
    err = _error(capsys, tree, tmp_path / "o7", "--splits", "train", "--strict")
    assert f"{broken}: cannot decode this image" in err and "without --strict to skip" in err
    assert not list((tmp_path / "o7").rglob("*.tmp"))  # the stop left no half-written shard


# ----------------------------------------------------------------------------- undecodable files


def _break(tree: Path, fake: FakeImageNet) -> dict[str, Path]:
    """Two train files that do not decode: a JPEG cut in half, a PNG class file of garbage."""
    cut = tree / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG"
    cut.write_bytes(fake.data_of[f"{WNIDS[0]}_1"][: len(fake.data_of[f"{WNIDS[0]}_1"]) // 2])
    garbage = tree / "train" / PNG_CLASS / f"{PNG_CLASS}_4.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return {f"{WNIDS[0]}_1": cut, f"{PNG_CLASS}_4": garbage}


def test_undecodable_files_are_skipped_listed_and_every_other_sample_keeps_its_place(fake, written, tmp_path,
                                                                                     capsys):
    tree = tmp_path / "tree"
    shutil.copytree(fake.folder, tree)
    broken = _break(tree, fake)
    out = tmp_path / "out"
    assert write(tree, out) == 0
    err = capsys.readouterr().err
    assert "train: 2 file(s) skipped because they do not decode" in err
    assert all(str(path) in err for path in broken.values())
    info = json.loads((out / "_info.json").read_text())
    train = info["splits"]["train"]
    assert {s["key"]: s["source"] for s in train["skipped"]} == {k: str(p) for k, p in broken.items()}
    assert all(s["reason"] for s in train["skipped"])
    assert train["num_samples"] == sum(train["shard_lengths"]) == len(WNIDS) * TRAIN_PER_CLASS - 2
    # the plan is made before decoding: every other sample is in the same shard, in the same order
    expected = [(shard, key) for shard, key, _, _ in read_shards(written, "train") if key not in broken]
    assert [(shard, key) for shard, key, _, _ in read_shards(out, "train")] == expected
    assert read_shards(out, "val") == read_shards(written, "val")
    assert not list(out.rglob("*.tmp"))
    assert verify_cli.main([str(out), "--workers", "1"]) == 0  # the shards hold what _info.json says
    assert "train: 118 samples" in err

    # a rerun keeps every shard (the skipped files still do not decode); one repaired file: its shard only
    before = shard_files(out)
    assert write(tree, out) == 0
    assert shard_files(out) == before
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["skipped"] == train["skipped"]
    broken[f"{WNIDS[0]}_1"].write_bytes(fake.data_of[f"{WNIDS[0]}_1"])
    assert write(tree, out) == 0
    after = shard_files(out)
    rewritten = [name for name in before if after[name][0] != before[name][0]]
    assert len(rewritten) == 1 and f"{WNIDS[0]}_1" in [k for s, k, _, _ in read_shards(out, "train") if s == rewritten[0]]
    assert [s["key"] for s in json.loads((out / "_info.json").read_text())["splits"]["train"]["skipped"]] == \
        [f"{PNG_CLASS}_4"]


def test_strict_stops_at_an_undecodable_file_and_leaves_no_half_shard(fake, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(fake.folder, tree)
    broken = _break(tree, fake)
    out = tmp_path / "out"
    err = _error(capsys, tree, out, "--strict", "--shard-size", "4", "--workers", "2")
    assert any(f"error: {path}: cannot decode this image" in err for path in broken.values())
    assert not list(out.rglob("*.tmp")) and not (out / "_info.json").exists()
    assert err.count("error:") == 1


# ----------------------------------------------------------------------------- the older flat layout


def _flatten(written: Path, flat: Path) -> None:
    """``written`` as writers before the per-split folders left it: every shard side by side."""
    shutil.copytree(written, flat)
    info = json.loads((flat / "_info.json").read_text())
    for entry in info["splits"].values():
        for name in entry["filenames"]:
            (flat / name).rename(flat / Path(name).name)
        entry["filenames"] = [Path(name).name for name in entry["filenames"]]
    (flat / "_info.json").write_text(json.dumps(info))
    for split in info["splits"]:
        (flat / split).rmdir()


def test_a_flat_directory_is_refused_with_the_fix_and_moved_by_renames(fake, written, tmp_path, capsys):
    from harness.data import DataError, select_shards
    from shards import layout

    flat = tmp_path / "flat"
    _flatten(written, flat)
    with pytest.raises(DataError, match=rf"shard not found: {flat / 'train'}; {flat} holds its shards in the older "
                                        rf"layout .*`python -m shards.layout {flat}` \(renames only\)"):
        select_shards(str(flat / "train"), "data.train")
    with pytest.raises(DataError, match=r"names the shards of 2 splits: train \(8 shard\(s\).* and val \(3 shard"):
        select_shards(str(flat), "data.train")  # both splits in one folder
    code, out = verify_cli.main([str(flat), "--workers", "1"]), capsys.readouterr().out
    assert code == 1 and "./: holds the shards of splits train and val" in out

    inodes = {p.name: p.stat().st_ino for p in flat.glob("*.tar")}
    assert layout.main([str(flat)]) == 0
    assert {p.name: p.stat().st_ino for p in flat.rglob("*.tar")} == inodes  # moved, not rewritten
    assert select_shards(str(flat / "val")).split_samples == len(WNIDS) * VAL_PER_CLASS
    assert verify_cli.main([str(flat), "--workers", "1"]) == 0
    assert layout.main([str(flat)]) == 0 and "nothing to move" in capsys.readouterr().out

    again = tmp_path / "again"  # the writer, rerun on a flat directory, keeps every shard
    _flatten(written, again)
    before = {p.name: p.stat().st_mtime_ns for p in again.glob("*.tar")}
    assert write(fake.folder, again) == 0
    assert {p.name: p.stat().st_mtime_ns for p in again.rglob("*.tar")} == before
    assert shard_files(again).keys() == shard_files(written).keys()


def test_untouched_jpegs_are_checked_by_header_and_end_marker_or_decoded_on_request(fake):
    """Without a decode (the fast default), a JPEG header followed by garbage and a file cut short are
    still refused: neither ends with an end-of-image marker. `--decode-check` decodes them as well."""
    from shards.write import Encoding, Undecodable, encode_image

    good = fake.data_of[f"{WNIDS[0]}_1"]
    quick, decoded = Encoding(None, 90), Encoding(None, 90, decode_check=True)
    assert encode_image(good, quick) == good == encode_image(good, decoded)
    assert encode_image(good + b"\x00" * 100, quick)  # bytes after the end marker are common: kept
    header_then_garbage = good[:600] + bytes(range(0xd9)) * 8
    for broken in (header_then_garbage, good[: len(good) // 2]):
        for encoding in (quick, decoded):
            with pytest.raises(Undecodable):
                encode_image(broken, encoding)
