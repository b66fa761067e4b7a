"""`data.augment.kind: cifar`: zero-pad, random crop, flip; the whole image at evaluation; both data paths.

Shards come from shards.cifar on a tiny tarball in the official format (tests/test_cifar.py).
"""
import io
import itertools

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms as T

from harness.data import (DeferredDecode, EpochLoader, Preprocess, ShardStream, build_loaders, cifar_train_transform,
                          decode_on, decode_sample, eval_transform, expand_urls, train_transform)
from harness.recipe import RecipeError, load_recipe
from harness.data.transforms import PadCrop, seed_augmentation
from shards.cifar import write_cifar
from test_cifar import make_tarball

# mean 0, std 1/255: the loaders' output is the 0-255 pixel values themselves, in float
PRE = Preprocess(image_size=32, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
PAD = 4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory):
    """CIFAR-10 shards (40 train in 4 shards, 20 val in 2) and the source pixels/labels by split."""
    tmp = tmp_path_factory.mktemp("cifar")
    source = make_tarball(tmp / "cifar-10-python.tar.gz", "cifar10")
    write_cifar(tmp / "cifar-10-python.tar.gz", tmp / "shards", shard_size=10)
    return tmp / "shards", source


def png_sample(pixels: np.ndarray, key: str, label: int = 0) -> dict:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "cls": label}


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def test_the_crop_is_a_shifted_window_of_the_zero_padded_image():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zero: padding shows
    padded = np.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)))
    transform = cifar_train_transform(PRE, PAD, hflip=0.0)
    offsets = []
    for i in range(300):
        sample = png_sample(image, f"k{i}")
        out, _ = decode_sample(sample, transform, 10, seed=5)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        matches = [(t, l) for t in range(2 * PAD + 1) for l in range(2 * PAD + 1)
                   if np.array_equal(hwc(out), padded[t:t + 32, l:l + 32])]
        assert len(matches) == 1, f"{sample['__key__']}: not a window of the padded image"
        offsets.append(matches[0])
        seed_augmentation(sample, 5)  # the box PadCrop draws for this sample is that window
        top, left, _, _ = PadCrop(32, PAD).box(32, 32)
        assert (top + PAD, left + PAD) == matches[0]
    tops, lefts = zip(*offsets)
    assert set(tops) == set(lefts) == set(range(2 * PAD + 1))  # every shift, padding included, occurs


def test_it_is_torchvisions_random_crop_with_padding_and_flip():
    """The KD literature's `RandomCrop(32, padding=4), RandomHorizontalFlip()`: same draws, same pixels."""
    rng = np.random.default_rng(1)
    ours = cifar_train_transform(PRE, PAD, hflip=0.5)
    reference = T.Compose([T.RandomCrop(32, padding=PAD), T.RandomHorizontalFlip(0.5), T.PILToTensor()])
    for i in range(100):
        sample = png_sample(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"s{i}")
        image = Image.open(io.BytesIO(sample["png"]))
        seed_augmentation(sample, 3)
        expected = reference(image)
        assert torch.equal(decode_sample(sample, ours, 10, seed=3)[0], expected)


def test_flips():
    image = np.random.default_rng(2).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    always, never = cifar_train_transform(PRE, PAD, hflip=1.0), cifar_train_transform(PRE, PAD, hflip=0.0)
    half = cifar_train_transform(PRE, PAD, hflip=0.5)
    flipped = 0
    for i in range(200):
        sample = png_sample(image, f"f{i}")
        a, b = decode_sample(sample, always, 10, seed=0)[0], decode_sample(sample, never, 10, seed=0)[0]
        assert torch.equal(a, b.flip(-1))  # the same window, mirrored
        c = decode_sample(sample, half, 10, seed=0)[0]
        assert torch.equal(c, b) or torch.equal(c, a)
        flipped += torch.equal(c, a) and not torch.equal(a, b)
    assert 70 < flipped < 130


def test_no_padding_no_flip_is_the_identity():
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out, _ = decode_sample(png_sample(image, "x"), cifar_train_transform(PRE, 0, 0.0), 10, seed=0)
    assert np.array_equal(hwc(out), image)


def test_larger_images_are_resized_then_cropped_like_torchvision():
    """Shorter side to image_size first (T.Resize), then the same pad and crop: RandomCrop's windows."""
    rng = np.random.default_rng(4)
    reference = T.Compose([T.Resize(32, antialias=True), T.RandomCrop(32, padding=PAD), T.PILToTensor()])
    for i, (h, w) in enumerate([(48, 64), (64, 40), (32, 50)]):
        sample = png_sample(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), f"r{i}")
        seed_augmentation(sample, 0)
        expected = reference(Image.open(io.BytesIO(sample["png"])))
        assert torch.equal(decode_sample(sample, cifar_train_transform(PRE, PAD, 0.0), 10, seed=0)[0], expected)


def stream(urls, transform, train, batch=8, seed=3):
    lengths = {u: 10 for u in urls}
    return ShardStream(urls, transform, 10, batch, train=train, seed=seed, shuffle_buffer=20 if train else 0,
                       lengths=lengths)


def run(loader, epoch=0, resume=None):
    xs, ys = zip(*((x.cpu(), y.cpu()) for x, y in loader.epoch(epoch, resume)))
    return torch.cat(xs), torch.cat(ys)


def gpu_path(urls, train, device="cpu"):
    transform = DeferredDecode(PRE, ((0.08, 1.0), (3 / 4, 4 / 3), 0.5) if train else None, kind="cifar", padding=PAD)
    return EpochLoader(stream(urls, transform, train), 0, pin_memory=False, pre=PRE, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_returns_the_image_unchanged_on_both_paths(cifar_shards, device):
    out, source = cifar_shards
    urls = expand_urls(str(out / "val"))
    pixels, labels = source["val"]
    cpu_x, cpu_y = run(EpochLoader(stream(urls, eval_transform(PRE), False), 0, pin_memory=False, pre=PRE))
    gpu_x, gpu_y = run(gpu_path(urls, train=False, device=device))
    assert cpu_y.tolist() == gpu_y.tolist() == labels  # official order, every image once
    expected = torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float()
    assert torch.equal(cpu_x, expected) and torch.equal(gpu_x, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_path_equals_the_cpu_path_exactly(cifar_shards, device):
    """PNG members: the worker sends the PNG's pixels, so training crops match pixel for pixel."""
    out, _ = cifar_shards
    urls = expand_urls(str(out / "train"))
    cpu_x, cpu_y = run(EpochLoader(stream(urls, cifar_train_transform(PRE, PAD, 0.5), True), 0, pin_memory=False,
                                   pre=PRE))
    gpu_x, gpu_y = run(gpu_path(urls, train=True, device=device))
    assert len(cpu_y) == 40 and gpu_y.tolist() == cpu_y.tolist()
    assert torch.equal(gpu_x, cpu_x)
    assert (cpu_x == 0).any(dim=1).flatten(1).any(dim=1).float().mean() > 0.5  # padding shows in most crops


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_resume_mid_epoch_crops_as_an_uninterrupted_run(cifar_shards, path):
    out, _ = cifar_shards
    urls = expand_urls(str(out / "train"))

    def loader():
        transform = (cifar_train_transform(PRE, PAD, 0.5) if path == "cpu"
                     else DeferredDecode(PRE, ((0.08, 1.0), (3 / 4, 4 / 3), 0.5), kind="cifar", padding=PAD))
        return EpochLoader(stream(urls, transform, True, batch=4), 2, pin_memory=False, pre=PRE)

    straight_x, straight_y = run(loader(), epoch=1)
    again_x, _ = run(loader(), epoch=1)
    other_x, other_y = run(loader(), epoch=2)
    assert torch.equal(again_x, straight_x)  # seeded per sample: a rerun crops the same
    first = loader()
    seen_x, seen_y = zip(*itertools.islice(first.epoch(1), 3))  # stopped after 3 batches
    assert first.position.batches == 3
    rest_x, rest_y = run(loader(), epoch=1, resume=first.position)
    assert torch.cat([*seen_y, rest_y]).tolist() == straight_y.tolist()
    assert torch.equal(torch.cat([*seen_x, rest_x]), straight_x)
    # another epoch: other crops of the same samples
    by_label = {int(y): x for x, y in zip(straight_x, straight_y)}
    assert sum(torch.equal(by_label[int(y)], x) for x, y in zip(other_x, other_y) if int(y) in by_label) < 10


def test_auto_decodes_cifar_on_the_cpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decode_on("auto", cuda, "cifar") == "cpu"
    assert decode_on("auto", cuda, "rrc") == decode_on("auto", cuda) == "gpu"
    assert decode_on("auto", cpu, "cifar") == "cpu"
    assert decode_on("gpu", cuda, "cifar") == "gpu"  # asked for: lossless, pixels from the workers


def write_recipe(tmp_path, train, val, augment, **data):
    tree = {"output": str(tmp_path / "run"),
            "data": {"train": train, "val": val, "num_classes": 10, "image_size": 32, "batch_size": 4, "workers": 0,
                     "augment": augment, **data},
            "student": {"model": "test_resnet"}, "method": {"name": "supervised"}, "optim": {"lr": 0.1},
            "schedule": {"epochs": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_recipe_chooses_the_augmentation_and_the_data_path(cifar_shards, tmp_path):
    out, _ = cifar_shards
    train, val = str(out / "train"), str(out / "val")
    cifar = load_recipe(write_recipe(tmp_path, train, val, {"kind": "cifar", "padding": 2}))
    assert cifar.data.crop_pct == 1.0 and cifar.data.augment.padding == 2  # resolved: the whole image at eval
    for device in ("cpu", "cuda"):  # auto: the CPU path even on a CUDA device
        train_loader, val_loader = build_loaders(cifar, PRE, 0, 1, torch.device(device))
        crop = train_loader.stream.transform.transforms[1]
        assert isinstance(crop, PadCrop) and (crop.size, crop.padding) == (32, 2)
        assert isinstance(val_loader.stream.transform, T.Compose) and val_loader.decode is None
    gpu = load_recipe(write_recipe(tmp_path, train, val, {"kind": "cifar"}, decode="gpu"))
    train_loader, val_loader = build_loaders(gpu, PRE, 0, 1, torch.device("cuda"))
    assert train_loader.stream.transform.kind == val_loader.stream.transform.kind == "cifar"
    assert train_loader.decode.kind == "cifar"

    rrc = load_recipe(write_recipe(tmp_path, train, val, {"crop_scale": [0.5, 1.0]}))  # no kind: rrc, as before
    assert rrc.data.augment.kind == "rrc" and rrc.data.crop_pct is None
    train_loader, _ = build_loaders(rrc, PRE, 0, 1, torch.device("cpu"))
    ops = train_loader.stream.transform.transforms
    assert isinstance(ops[0], T.RandomResizedCrop) and ops[0].scale == (0.5, 1.0)
    reference = train_transform(PRE, (0.5, 1.0), (3 / 4, 4 / 3), 0.5)
    sample = png_sample(np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8), "z")
    assert torch.equal(decode_sample(sample, train_loader.stream.transform, 10, 1)[0],
                       decode_sample(sample, reference, 10, 1)[0])
    train_loader, _ = build_loaders(rrc, PRE, 0, 1, torch.device("cuda"))
    assert isinstance(train_loader.stream.transform, DeferredDecode) and train_loader.stream.transform.kind == "rrc"


def test_recipe_refuses_a_center_crop_with_cifar(cifar_shards, tmp_path):
    out, _ = cifar_shards
    train, val = str(out / "train"), str(out / "val")
    path = write_recipe(tmp_path, train, val, {"kind": "cifar"}, crop_pct=0.875)
    with pytest.raises(RecipeError, match=r"`data.augment.kind: cifar` evaluates the whole image, without a "
                                          r"center crop, but `data.crop_pct` is 0.875; remove `data.crop_pct` "
                                          r"or set it to 1.0"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"`data.augment.padding`"):
        load_recipe(write_recipe(tmp_path, train, val, {"kind": "cifar", "padding": -1}))
    with pytest.raises(RecipeError, match=r"`data.augment.kind`.*'rrc' or 'cifar'"):
        load_recipe(write_recipe(tmp_path, train, val, {"kind": "autoaugment"}))
