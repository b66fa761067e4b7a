"""The training loader's hot path: tar reading, planar tensors, batches in reused shared memory."""
import io
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision import transforms as T
from webdataset.tariterators import tarfile_samples

from harness.data import Preprocess, ShardStream, pil_to_chw, read_samples, shm_batches, train_transform
from harness.data.stream import _collate
from harness.data.tars import TarFormatError, tar_members


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: one from webdataset's TarWriter, one from tarfile with awkward members."""
    out = tmp_path_factory.mktemp("tars")
    with wds.TarWriter(str(out / "a.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"s{i}", "png": _png(i), "cls": i})
    with tarfile.open(out / "b.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data))
        long_key = "d/" + "k" * 150  # longer than a ustar name: a pax path record
        add("d", kind=tarfile.DIRTYPE)
        add("__meta__", b"skipped")
        add(long_key + ".PNG", _png(50))  # upper-case extension: lower-cased
        add(long_key + ".cls", b"7")
        add("d/x.y/z.seg.png", _png(60))  # dots: the key ends at the base name's first dot
        add("d/x.y/z.seg.cls", b"8")
        add("d/link", kind=tarfile.SYMTYPE)
        add("d/\u00e9t\u00e9.png", _png(70))  # non-ASCII: a pax path record too
        add("d/\u00e9t\u00e9.cls", b"9")
    return [str(out / "a.tar"), str(out / "b.tar")]


def test_reader_yields_what_webdataset_yields(shards):
    ours = list(read_samples(shards))
    assert ours == list(tarfile_samples({"url": u} for u in shards))
    assert [s["__key__"] for s in ours][-3:] == ["d/" + "k" * 150, "d/x.y/z", "d/\u00e9t\u00e9"]
    assert ours[5]["png"] == _png(50) and ours[6]["seg.cls"] == b"8"


def test_reader_reads_pipe_urls(shards):
    assert len(list(read_samples([f"pipe:cat {shards[0]}"]))) == 5


# TarWriter writes a pax header (float mtime) before each member: a sample is 8 blocks, 4096 bytes.
# Cuts: inside the second sample's image, between the third sample's members, in the first header.
@pytest.mark.parametrize("cut", [4096 + 3584 + 30, 2 * 4096 + 2048, 40])
def test_truncated_shard_keeps_the_samples_before_the_cut_and_warns(shards, tmp_path, caplog, cut):
    data = open(shards[0], "rb").read()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING):
        samples = list(read_samples([str(broken), shards[0]]))
    complete = [s for s in samples if s["__url__"] == str(broken) and {"png", "cls"} <= set(s)]
    assert len(complete) == cut // 4096
    assert len([s for s in samples if s["__url__"] == shards[0]]) == 5  # the next shard is read
    assert "shard read error (rest of shard skipped): truncated tar" in caplog.text
    assert str(broken) in caplog.text


def test_corrupt_header_is_named_with_its_offset(shards):
    data = bytearray(open(shards[0], "rb").read())
    data[1024 + 10] ^= 0xFF  # the second member's header
    with pytest.raises(TarFormatError, match="bad tar header checksum at byte 1024"):
        list(tar_members(io.BytesIO(bytes(data)), "x.tar"))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pil_to_chw_matches_pil_to_tensor_and_is_contiguous(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (13, 17, 3), dtype=np.uint8)).convert(mode)
    ours = pil_to_chw(image)
    assert ours.is_contiguous() and ours.dtype == torch.uint8
    assert torch.equal(ours, T.PILToTensor()(image))


def test_augmentation_is_a_function_of_seed_epoch_and_key(tmp_path):
    """The same sample crops the same under any shuffle: resume and reordering cannot change it."""
    rng = np.random.default_rng(1)
    shard = tmp_path / "t-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(40):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"k{i:02d}", "png": buf.getvalue(), "cls": i})
    pre = Preprocess(image_size=16, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)

    def crops(shuffle: int, epoch: int) -> dict[int, torch.Tensor]:
        stream = ShardStream([str(shard)], train_transform(pre, (0.1, 1.0), (3 / 4, 4 / 3), 0.5), 40, 8, train=True,
                             shuffle_buffer=shuffle, lengths={str(shard): 40})
        stream.start(epoch)
        return {int(y): x for xs, ys, _ in stream for x, y in zip(xs, ys)}

    a, b, other_epoch = crops(0, 0), crops(20, 0), crops(0, 1)
    assert sorted(a) == sorted(b) == list(range(40))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(torch.equal(a[k], other_epoch[k]) for k in a) < 5


class _Batches(IterableDataset):
    """Batches collated in a worker, each filled with its index; also reports the worker's pool size."""

    def __init__(self, count: int):
        self.count = count

    def __iter__(self):
        for i in range(self.count):
            images, labels = _collate([(torch.full((3, 8, 8), i % 256, dtype=torch.uint8), i)] * 4)
            yield images, labels, len(shm_batches._pool)


def _loader(count: int) -> DataLoader:
    return DataLoader(_Batches(count), batch_size=None, num_workers=1, prefetch_factor=2)


def test_worker_batches_arrive_as_plain_tensors_and_reuse_buffers():
    pool_sizes = []
    for i, (images, labels, pool) in enumerate(_loader(40)):
        assert type(images) is torch.Tensor and images.shape == (4, 3, 8, 8)
        assert (images == i).all() and labels.tolist() == [i] * 4
        pool_sizes.append(pool)
    assert max(pool_sizes) <= 5  # released batches are written again, not fresh segments each time


def test_held_worker_batches_are_never_overwritten():
    held = [images if i % 2 else images[1:].flatten()[5:] for i, (images, _, _) in enumerate(_loader(40))]
    for i, x in enumerate(held):  # even ones: only a view of the batch is held, which is enough
        assert (x == i).all()
