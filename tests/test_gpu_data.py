"""The GPU data path (`data.decode: gpu`) against the CPU path it must reproduce.

Run with the decode stage on the CPU (torchvision's libjpeg decode stands in for nvJPEG), so
these pass on any host; where CUDA exists the image and robustness tests also run with nvJPEG.
"""
import io
import logging
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from scipy import stats
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from harness.data import (DataError, DeferredDecode, DeviceDecode, EpochLoader, Encoded, Preprocess, ShardStream,
                          cifar_train_transform, decode_on, eval_transform, train_transform)
from harness.data.gpu_decode import CountOps, _size_groups, resample

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



@pytest.mark.parametrize("size", [None, 1023, 1024, 3000])
def test_small_whole_jpegs_pass_through_as_jpegs(size):
    """The end-marker check near 1 KiB: a whole JPEG of any length goes to the decode stage as it is."""
    pixels = photo(np.random.default_rng(0), 24, 20)
    data = jpeg(pixels)
    if size is not None:
        data = jpeg(pixels, comment=b"x" * (size - len(data) - 4))  # a COM segment: 4 bytes and the text
        assert len(data) == size
    planned = DeferredDecode(PRE).plan({"__key__": "k", "jpg": data, "cls": 0}, CLASSES, seed=0)
    assert planned.pixels == (0, 0) and planned.data == data

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


def planned_batch(plan: DeferredDecode, n: int, seed: int) -> tuple[Encoded, torch.Tensor]:
    """``n`` photos of assorted sizes as the GPU path's workers send them; every fourth a PNG (sent as pixels)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        pixels = photo(rng, int(rng.integers(40, 96)), int(rng.integers(32, 80)))
        if i % 4 == 3:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            sample = {"__key__": f"k{i}", "png": buf.getvalue(), "cls": i}
        else:
            sample = {"__key__": f"k{i}", "jpg": jpeg(pixels), "cls": i}
        items.append(plan.plan(sample, CLASSES, seed))
    return DeferredDecode.collate(items)


@pytest.mark.parametrize("kind", ["rrc", "cifar", "eval"])
def test_decode_stage_operations_do_not_grow_with_the_batch(kind):
    """Past the decode (one torchvision call per JPEG on the CPU, one batched call on CUDA), a batch
    of 32 images costs as many operations as one of 8: no per-image work is left on the host."""
    plan = DeferredDecode(PRE, None if kind == "eval" else CROP, kind="cifar" if kind == "cifar" else "rrc")
    finishing = {}
    for n in (8, 32):
        encoded, y = planned_batch(plan, n, seed=n)
        stage = DeviceDecode(PRE, torch.device("cpu"), train=kind != "eval", kind=plan.kind)
        with CountOps() as count:
            x, labels, book = stage._finish(encoded, y, (0, n, 0))
        decodes = sum(k for op, k in count.ops.items() if op.startswith("image."))
        assert decodes == n - n // 4  # the counter does see per-image work: one decode per JPEG
        finishing[n] = sum(count.ops.values()) - decodes
        assert x.shape == (n, 3, PRE.image_size, PRE.image_size) and labels.tolist() == y.tolist() and book[2] == 0
    assert finishing[8] == finishing[32], finishing


def per_image_reference(image: torch.Tensor, mode: str, box, flip: bool, side: int, resize: int) -> torch.Tensor:
    """One image as the decode stage finished it before batching: torch's own resize, crop and paste, in float."""
    image = image.float()
    if mode == "rrc":
        top, left, height, width = box
        out = F.interpolate(image[None, :, top:top + height, left:left + width], size=(side, side),
                            mode="bilinear", align_corners=False, antialias=True)[0]
    elif mode == "eval":
        out = TF.center_crop(TF.resize(image, [resize], antialias=True), [side])
    else:  # cifar: shorter side to `side`, then the window at (top, left), zero outside the image
        resized, (top, left) = TF.resize(image, [side], antialias=True), box[:2]
        out = torch.zeros(3, side, side)
        height, width = resized.shape[-2:]
        y0, y1, x0, x1 = max(top, 0), min(top + side, height), max(left, 0), min(left + side, width)
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = resized[:, y0:y1, x0:x1]
    return (out.flip(-1) if flip else out).round()


@pytest.mark.parametrize("mode", ["rrc", "eval", "cifar"])
def test_batched_resample_is_torchs_per_image_resize(mode):
    """Against torch's antialiased bilinear resize image by image (the decode stage's former code), on
    noise (no smoothness to hide a shifted window): downscales up to 12x, upscales, flips, windows into
    the padding, center crops of odd margins, and a batch that splits into size groups (one large image)."""
    side, gen = 20, random.Random(0)
    pre = Preprocess(image_size=side, crop_pct=0.7, mean=PRE.mean, std=PRE.std)
    stage = DeviceDecode(pre, torch.device("cpu"), train=mode != "eval", kind="cifar" if mode == "cifar" else "rrc")
    sizes = [(gen.randint(12, 120), gen.randint(12, 120)) for _ in range(23)] + [(250, 190)]
    images, windows, expected = [], [], []
    for height, width in sizes:
        noise = torch.Generator().manual_seed(height * width)
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=noise)
        if mode == "rrc":
            box_height, box_width = gen.randint(1, height), gen.randint(1, width)
            box = (gen.randint(0, height - box_height), gen.randint(0, width - box_width), box_height, box_width)
        else:  # cifar: a PadCrop-like offset on the resized image, up to 4 px into the padding
            box = (gen.randint(-4, 4), gen.randint(-4, 4), side, side)
        flip = mode != "eval" and gen.random() < 0.5
        images.append(image)
        windows.append(stage._window(height, width, box, flip))
        expected.append(per_image_reference(image, mode, box, flip, side, stage.resize))
    assert len(_size_groups(sizes)) > 1 and len(_size_groups(sizes[:-1])) == 1  # both ways are exercised
    for count in (len(sizes) - 1, len(sizes)):
        out = resample(images[:count], windows[:count], side, torch.device("cpu"))
        diff = (out - torch.stack(expected[:count])).abs()
        # float sums in another order: a value within a hair of .5 may round the other way
        assert diff.max() <= 1 and (diff > 0).float().mean() < 2e-3, ((diff > 0).float().mean(), diff.max())


def test_products_keep_float32_precision_where_matmuls_run_in_tf32(monkeypatch):
    """TF32 (which the trainer enables on CUDA) emulated on the CPU: operands cut to 10 mantissa bits.

    Plain products would drift by a fraction of a level, biased low; the split products do not.
    """
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=gen) for _ in range(4)]
    windows = [DeviceDecode(PRE, torch.device("cpu"), train=True)._window(120, 160, (10, 5, 100, 140), flip)
               for flip in (False, True, False, True)]
    exact = resample(images, windows, 24, torch.device("cpu"))
    matmul = torch.matmul

    def tf32_matmul(a, b):
        return matmul(*((t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32) for t in (a, b)))

    monkeypatch.setattr(torch, "matmul", tf32_matmul)
    precision = torch.get_float32_matmul_precision()
    try:
        drift = {}
        for setting in ("highest", "high"):  # "high": what allow_tf32 = True reports
            torch.set_float32_matmul_precision(setting)
            drift[setting] = (resample(images, windows, 24, torch.device("cpu")) - exact).abs().mean().item()
    finally:
        torch.set_float32_matmul_precision(precision)
    assert drift["highest"] > 0.02  # the emulation bites: unprotected products drift
    assert drift["high"] < 1e-3, drift
