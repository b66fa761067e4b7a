"""The GPU data path (`data.decode: gpu`) against the CPU path it must reproduce.

Run with the decode stage on the CPU (torchvision's libjpeg decode stands in for nvJPEG), so
these pass on any host; where CUDA exists the image and robustness tests also run with nvJPEG.
"""
import io
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from scipy import stats

from harness.data import (DataError, DeferredDecode, EpochLoader, Encoded, Preprocess, ShardStream,
                          cifar_train_transform, decode_on, eval_transform, expand_urls, train_transform)

# mean 0, std 1/255: the loader's output is the 0-255 pixel values themselves, in float
PRE = Preprocess(image_size=24, crop_pct=0.875, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
CROP = ((0.25, 1.0), (3 / 4, 4 / 3), 0.5)
LENGTHS = [70, 60, 50, 40]
CLASSES = 1000  # label = sample index: labels identify samples
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth, photo-like RGB image (JPEG-friendly: no pixel noise to amplify resampling gaps)."""
    base = rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))


def jpeg(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=kwargs.pop("quality", 92), **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four train shards of real JPEGs of assorted sizes and aspect ratios; label = index."""
    out = tmp_path_factory.mktemp("jpeg")
    rng = np.random.default_rng(0)
    index, urls = 0, []
    for shard, n in enumerate(LENGTHS):
        url = str(out / f"train-{shard:06d}.tar")
        with wds.TarWriter(url) as sink:
            for _ in range(n):
                w, h = int(rng.integers(40, 96)), int(rng.integers(32, 80))
                sink.write({"__key__": f"s{index:05d}", "jpg": jpeg(photo(rng, w, h)), "cls": index})
                index += 1
        urls.append(url)
    return urls


def stream(urls, transform, train=True, batch=16, seed=3) -> ShardStream:
    return ShardStream(urls, transform, CLASSES, batch, train=train, seed=seed, shuffle_buffer=50 if train else 0,
                       lengths=dict(zip(urls, LENGTHS)))


def run(loader: EpochLoader, epoch: int = 0, resume=None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*((x.cpu(), y.cpu()) for x, y in loader.epoch(epoch, resume)))
    return torch.cat(xs), torch.cat(ys)


def cpu_path_with_spies(urls):
    """The CPU path's stream, recording the box and flip its own transform objects draw."""
    transform = train_transform(PRE, *CROP)
    rrc, flip = transform.transforms[0], transform.transforms[1]
    boxes, flips = [], []
    get_params, flip_forward = rrc.get_params, flip.forward

    def spy_params(img, scale, ratio):
        boxes.append(get_params(img, scale, ratio))
        return boxes[-1]

    def spy_flip(img):
        out = flip_forward(img)
        flips.append(out is not img)  # RandomHorizontalFlip returns its input untouched when it does not flip
        return out

    rrc.get_params, flip.forward = spy_params, spy_flip
    return stream(urls, transform), boxes, flips


def test_gpu_path_draws_the_cpu_paths_boxes_and_flips(shards):
    cpu_stream, cpu_boxes, cpu_flips = cpu_path_with_spies(shards)
    _, cpu_y = run(EpochLoader(cpu_stream, 0, pin_memory=False, pre=PRE))
    gpu_stream = stream(shards, DeferredDecode(PRE, CROP))
    gpu_stream.start(0)
    batches = list(gpu_stream)
    assert all(isinstance(encoded, Encoded) for encoded, _, _ in batches)
    labels = torch.cat([y for _, y, _ in batches])
    boxes = torch.cat([encoded.boxes for encoded, _, _ in batches]).tolist()
    flips = torch.cat([encoded.flips for encoded, _, _ in batches]).tolist()
    assert labels.tolist() == cpu_y.tolist()  # same samples, same order
    assert len(boxes) == len(cpu_y) >= 192
    assert [tuple(b) for b in boxes] == [tuple(b) for b in cpu_boxes[:len(boxes)]]
    assert flips == cpu_flips[:len(flips)]
    assert 0.3 < np.mean(flips) < 0.7  # both outcomes occur, so the comparison means something


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_path_images_match_the_cpu_paths(shards, device):
    """Training crops and evaluation crops, pixel for pixel within resampling/decoder tolerance.

    Tolerance, in 0-255 levels: PIL's and torch's antialiased bilinear resamplers implement the
    same filter in different arithmetic (PIL fixed-point on uint8, torch float), so single pixels
    differ by one level (measured: mean 0.15, no pixel off by more than 1); nvJPEG's IDCT and
    chroma upsampling differ from libjpeg's by about as much again.
    """
    tolerance = {"cpu": 0.5, "cuda": 2.0}[device]
    for train, cpu_transform in ((True, train_transform(PRE, *CROP)), (False, eval_transform(PRE))):
        cpu_x, cpu_y = run(EpochLoader(stream(shards, cpu_transform, train), 0, pin_memory=False, pre=PRE))
        gpu = EpochLoader(stream(shards, DeferredDecode(PRE, CROP if train else None), train), 0, pin_memory=False,
                          pre=PRE, device=device)
        gpu_x, gpu_y = run(gpu)
        assert gpu_y.tolist() == cpu_y.tolist()
        assert gpu_x.shape == cpu_x.shape == (len(cpu_y), 3, PRE.image_size, PRE.image_size)
        per_image = (gpu_x - cpu_x).abs().mean(dim=(1, 2, 3))
        assert per_image.mean() < tolerance, f"train={train}: mean abs diff {per_image.mean():.3f}"
        assert per_image.max() < 3 * tolerance, f"train={train}: worst image {per_image.max():.3f}"
        # a wrong box or flip would show: the images are not close to a shuffled pairing
        assert (gpu_x - cpu_x.roll(1, 0)).abs().mean() > 10 * tolerance


@pytest.mark.parametrize("device", DEVICES)
def test_cifar_kind_on_assorted_jpegs_draws_the_cpu_paths_boxes_and_pixels(shards, device):
    """`augment.kind: cifar` on images larger than the crop: shorter side resized, then pad and crop.

    Boxes are drawn on the resized size the worker computes from the header alone; they must be
    the CPU path's, whose PadCrop sees the resized image. Images agree within resampling tolerance.
    """
    transform = cifar_train_transform(PRE, 4, 0.5)
    pad_crop, boxes = transform.transforms[1], []
    draw = pad_crop.box
    pad_crop.box = lambda height, width: boxes.append(draw(height, width)) or boxes[-1]
    cpu_x, cpu_y = run(EpochLoader(stream(shards, transform), 0, pin_memory=False, pre=PRE))
    gpu_stream = stream(shards, DeferredDecode(PRE, CROP, kind="cifar", padding=4))
    gpu_stream.start(0)
    gpu_boxes = torch.cat([encoded.boxes for encoded, _, _ in gpu_stream]).tolist()
    assert [tuple(b) for b in gpu_boxes] == boxes[:len(gpu_boxes)] and len(gpu_boxes) == len(cpu_y)
    assert any(b[0] < 0 or b[1] < 0 for b in boxes)  # some crops reach into the padding
    gpu_x, gpu_y = run(EpochLoader(stream(shards, DeferredDecode(PRE, CROP, kind="cifar", padding=4)), 0,
                                   pin_memory=False, pre=PRE, device=device))
    assert gpu_y.tolist() == cpu_y.tolist()
    tolerance = {"cpu": 0.5, "cuda": 2.0}[device]
    per_image = (gpu_x - cpu_x).abs().mean(dim=(1, 2, 3))
    assert per_image.mean() < tolerance and per_image.max() < 3 * tolerance, per_image.max()
    assert (gpu_x - cpu_x.roll(1, 0)).abs().mean() > 10 * tolerance


def test_crop_statistics_follow_the_configured_distribution():
    """Over many samples, the boxes and flips follow RandomResizedCrop's distribution.

    With the area fraction at most 0.5 and the aspect within [3/4, 4/3], every first draw fits
    inside a square image, so area fraction ~ U(0.08, 0.5), log aspect ~ U(log 3/4, log 4/3), the
    box's offset ~ U over the free room, flips ~ Bernoulli(hflip). Seeds are fixed: no flakiness.
    """
    scale, ratio, hflip = (0.08, 0.5), (3 / 4, 4 / 3), 0.3
    plan = DeferredDecode(PRE, (scale, ratio, hflip))
    side = 640  # large: rounding the box to pixels barely moves the fractions
    blob = jpeg(np.zeros((side, side, 3), np.uint8))
    boxes, flips = [], []
    for i in range(3000):
        planned = plan.plan({"__key__": f"k{i}", "jpg": blob, "cls": 0}, 10, seed=7)
        boxes.append(planned.box)
        flips.append(planned.flip)
    top, left, h, w = np.array(boxes, dtype=float).T
    area, log_aspect = h * w / side**2, np.log(w / h)
    assert area.min() > scale[0] * 0.97 and area.max() < scale[1] * 1.03
    assert stats.kstest(area, stats.uniform(scale[0], scale[1] - scale[0]).cdf).pvalue > 1e-3
    assert stats.kstest(area, stats.uniform(0.08, 0.92).cdf).pvalue < 1e-6  # the test can tell scales apart
    lo, hi = np.log(ratio)
    assert stats.kstest(log_aspect, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    room = np.maximum(side - h, 1)
    assert stats.kstest((top + 0.5) / (room + 1), "uniform").pvalue > 1e-3
    assert stats.kstest((left + 0.5) / (np.maximum(side - w, 1) + 1), "uniform").pvalue > 1e-3
    assert abs(np.mean(flips) - hflip) < 4 * np.sqrt(hflip * (1 - hflip) / len(flips))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One shard: good JPEGs among a PNG, grey and CMYK JPEGs, and four broken samples."""
    rng = np.random.default_rng(1)
    pictures = [photo(rng, 64, 48) for _ in range(9)]
    png = io.BytesIO()
    Image.fromarray(pictures[1]).save(png, format="PNG")
    good = jpeg(pictures[0])
    members = [
        ("good0", "jpg", good),
        ("png", "png", png.getvalue()),
        ("grey", "jpg", jpeg(pictures[2][..., 0])),
        ("truncated", "jpg", jpeg(pictures[3])[:-700]),  # header intact, body cut: only a decode finds out
        ("cmyk", "jpg", _cmyk(pictures[4])),
        ("garbage", "jpg", good[:400] + bytes(rng.integers(0, 255, 2000, dtype=np.uint8))),
        ("bogus", "jpg", _bogus_huffman(jpeg(pictures[8]))),  # header reads, every decoder refuses
        ("good1", "jpg", jpeg(pictures[5])),
        ("notimage", "jpg", b"not an image at all"),
        ("good2", "jpg", jpeg(pictures[6], progressive=True)),
        ("good3", "jpg", jpeg(pictures[7])),
    ]
    url = str(tmp_path_factory.mktemp("mixed") / "val-000000.tar")
    with wds.TarWriter(url) as sink:
        for label, (key, ext, data) in enumerate(members):
            sink.write({"__key__": key, ext: data, "cls": label})
    return url, [key for key, _, _ in members]


def _bogus_huffman(data: bytes) -> bytes:
    """A JPEG whose first Huffman table claims 16 x 255 codes: PIL's header scan skips it, decoders fail."""
    at = data.index(b"\xff\xc4") + 5  # marker, 2 length bytes, table class/id, then the 16 code counts
    return data[:at] + b"\xff" * 16 + data[at + 16:]


def _cmyk(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_worker_sends_the_pixels_of_what_nvjpeg_should_not_see(mixed):
    """PNG, grey and CMYK JPEGs: decoded in the worker, sent as RGB planes, exactly the CPU path's pixels."""
    url, keys = mixed
    plan = DeferredDecode(PRE)
    for sample in wds.WebDataset(url, shardshuffle=False):
        if sample["__key__"] in ("png", "grey", "cmyk"):
            planned = plan.plan(sample, CLASSES, seed=0)
            image = Image.open(io.BytesIO(sample.get("png") or sample.get("jpg"))).convert("RGB")
            assert planned.pixels == (image.height, image.width)
            assert bytes(planned.data) == np.asarray(image).transpose(2, 0, 1).tobytes()  # CHW, lossless
        if sample["__key__"] in ("good0", "good2"):
            planned = plan.plan(sample, CLASSES, seed=0)
            assert planned.data == sample["jpg"] and planned.pixels == (0, 0)  # passed through as it is


@pytest.mark.parametrize("device", DEVICES)
def test_broken_samples_are_skipped_and_counted_and_the_rest_kept(mixed, device, caplog):
    url, keys = mixed
    caplog.set_level(logging.WARNING)
    cpu = EpochLoader(stream([url], eval_transform(PRE), train=False, batch=4), 0, pin_memory=False, pre=PRE)
    cpu_x, cpu_y = run(cpu)
    gpu = EpochLoader(stream([url], DeferredDecode(PRE), train=False, batch=4), 0, pin_memory=False, pre=PRE,
                      device=device)
    gpu_x, gpu_y = run(gpu)
    kept = [keys[i] for i in gpu_y.tolist()]
    assert kept == ["good0", "png", "grey", "cmyk", "good1", "good2", "good3"]
    assert gpu_y.tolist() == cpu_y.tolist()  # the CPU path keeps exactly the same samples
    assert gpu.position.skipped == cpu.position.skipped == 4
    for key in ("truncated", "garbage", "bogus", "notimage"):
        assert f"{url}:{key}" in caplog.text
    assert f"skipping undecodable JPEG {url}:bogus" in caplog.text  # the decode stage's per-image fallback
    # samples decoded in the worker carry the CPU path's own pixels: only the resampling differs
    diff = (gpu_x - cpu_x).abs().mean(dim=(1, 2, 3))
    assert diff.max() < {"cpu": 0.5, "cuda": 2.0}[device], dict(zip(kept, diff.tolist()))
    for key in ("png", "grey", "cmyk"):
        assert diff[kept.index(key)] < 0.5


def test_resume_mid_epoch_continues_with_exactly_the_unseen_samples(shards):
    def loader():
        return EpochLoader(stream(shards, DeferredDecode(PRE, CROP), batch=8), 2, pin_memory=False, pre=PRE)

    straight_x, straight_y = run(loader(), epoch=1)
    first = loader()
    seen_x, seen_y = [], []
    for i, (x, y) in enumerate(first.epoch(1)):
        seen_x.append(x)
        seen_y.append(y)
        if i == 4:  # an odd count: the worker round-robin must rotate on resume
            break
    assert first.position.batches == 5
    rest_x, rest_y = run(loader(), epoch=1, resume=first.position)
    assert torch.cat(seen_y + [rest_y]).tolist() == straight_y.tolist()
    assert torch.equal(torch.cat(seen_x + [rest_x]), straight_x)  # same crops too


def test_decode_setting_resolves_per_device():
    assert decode_on("auto", torch.device("cpu")) == "cpu"
    assert decode_on("auto", torch.device("cuda", 0)) == "gpu"
    assert decode_on("cpu", torch.device("cuda", 0)) == "cpu"
    with pytest.raises(DataError, match=r"`data.decode: gpu` .* runs on cpu; set `data.decode` to `auto` or `cpu`"):
        decode_on("gpu", torch.device("cpu"))
