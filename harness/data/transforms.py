"""Image transforms: what a model needs from an image, and the CPU path that gives it.

Workers crop and return uint8 tensors; scaling and normalisation (:func:`normalize`) happen
after the batch reaches the training process (on the GPU there), which quarters what crosses
between processes and takes the float work off the loader's CPU cores. The augmentation of a
sample is seeded from (seed, epoch, key) alone, so a resumed run crops exactly as an
uninterrupted one, and the GPU path (:mod:`harness.data.gpu_decode`) draws the very same crops.

Two augmentations (``data.augment.kind``): ``rrc``, torchvision's RandomResizedCrop and flip
(:func:`train_transform`, evaluated by :func:`eval_transform`'s resize and center crop), and
``cifar``, the CIFAR literature's zero-pad and random crop and flip (:func:`cifar_train_transform`;
evaluated by :func:`eval_transform` at ``crop_pct`` 1: a 32 px image as it is). Either may end
in per-sample policies (auto-augment, colour jitter: :mod:`harness.data.augment`), which draw after
the crop, so a sample's crop stays the same with them.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

log = logging.getLogger("harness.data")
R = TypeVar("R")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Preprocess:
    """What a model needs from an image: crop side, eval crop fraction, normalisation."""

    image_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def train_transform(pre: Preprocess, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                    policy: Sequence[Callable] = ()) -> T.Compose:
    """RandomResizedCrop, horizontal flip, uint8 CHW tensor: torchvision's, ending in :func:`pil_to_chw`.

    ``policy``: per-sample PIL ops after the flip (:func:`harness.data.augment.sample_policy`); they
    draw after the crop, so the crop and flip are the same with or without them.
    """
    ops = [T.RandomResizedCrop(pre.image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(ops + list(policy) + [pil_to_chw])


class PadCrop:
    """Zero-pad ``padding`` pixels on every side, then crop a random ``size`` square.

    torchvision's ``RandomCrop(size, padding)``: the same draws from the generator, the same
    pixels (tested), in one PIL call (``Image.crop`` fills what lies outside the image with 0).
    """

    def __init__(self, size: int, padding: int):
        self.size, self.padding = size, padding

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop in the unpadded image; negative: into the padding."""
        pad, side = self.padding, self.size
        if height + 2 * pad < side or width + 2 * pad < side:
            raise ValueError(f"a {side} px crop does not fit a {height}x{width} image padded by {pad}")
        if height + 2 * pad == width + 2 * pad == side:  # as RandomCrop.get_params: nothing drawn
            return -pad, -pad, side, side
        top = int(torch.randint(0, height + 2 * pad - side + 1, size=(1,)))
        left = int(torch.randint(0, width + 2 * pad - side + 1, size=(1,)))
        return top - pad, left - pad, side, side

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, height, width = self.box(image.height, image.width)
        return image.crop((left, top, left + width, top + height))


def resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) after ``T.Resize(side)`` (shorter side to ``side``): torchvision's arithmetic."""
    short, long = sorted((height, width))
    new_long = int(side * long / short)
    return (side, new_long) if height <= width else (new_long, side)


def cifar_train_transform(pre: Preprocess, padding: int, hflip: float, policy: Sequence[Callable] = ()) -> T.Compose:
    """The CIFAR augmentation: shorter side to ``image_size`` (a no-op for 32 px images at 32), pad, crop, flip.

    ``policy``: per-sample PIL ops after the flip, as in :func:`train_transform`.
    """
    ops = [T.Resize(pre.image_size, antialias=True), PadCrop(pre.image_size, padding)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(ops + list(policy) + [pil_to_chw])


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """A PIL image as a contiguous uint8 CHW tensor: the values of ``T.PILToTensor``, cheaper.

    PILToTensor returns the HWC pixel buffer viewed as CHW, so batching it transposes byte by
    byte (about 90 us for 224x224 RGB); PIL's packer writes one band at a time instead, planar
    from the start (about 35 us for the three).
    """
    if image.mode != "RGB":
        return TF.pil_to_tensor(image).contiguous()
    return torch.frombuffer(rgb_planes(image), dtype=torch.uint8).view(3, image.height, image.width)


def rgb_planes(image: Image.Image) -> bytearray:
    """An RGB image's pixels as R, G and B planes (CHW order), written by PIL band by band."""
    return bytearray().join(image.tobytes("raw", band) for band in "RGB")


def eval_transform(pre: Preprocess) -> T.Compose:
    """Shorter side to ``image_size / crop_pct``, then the center ``image_size`` square (crop_pct 1: a square as is)."""
    resize = int(math.floor(pre.image_size / pre.crop_pct))
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(pre.image_size), T.PILToTensor()])


def normalize(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW images to the float input a model expects: scaled to [0, 1], then standardised."""
    mean, std = _constants(tuple(pre.mean), tuple(pre.std), images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalize``'s mean and std, made once per device: a tensor built from host values on a GPU
    is a copy the host waits for, which per batch would hold the host behind the previous step."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def sample_name(sample: dict) -> str:
    """``shard:key`` of a tar sample, for the messages that skip it."""
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a tar sample (StopIteration when it has none)."""
    return sample[next(k for k in IMAGE_KEYS if k in sample)]


def label_in_range(label: int, num_classes: int, where: str) -> bool:
    if 0 <= label < num_classes:
        return True
    log.warning("skipping sample %s: label %d outside [0, %d)", where, label, num_classes)
    return False


def seed_augmentation(sample: dict, seed: int) -> None:
    """Seed the augmentation from (seed, key): both data paths then draw a sample's crop alike."""
    # The CPU generator alone: torch.manual_seed also queues CUDA/XPU seeding, ~1 ms a call.
    torch.random.default_generator.manual_seed(zlib.crc32(f"{seed}:{sample.get('__key__')}".encode()))


def read_sample(sample: dict, num_classes: int, read: Callable[[bytes], R]) -> Optional[tuple[R, int, str]]:
    """``read`` of one tar sample's image bytes, its label and its name (shard:key); None (logged) when
    either cannot be used: no image, an unreadable one (``read`` raises), no label or one out of range."""
    where = sample_name(sample)
    try:
        image = read(image_bytes(sample))
        label = int(sample["cls"])
    except (StopIteration, KeyError, ValueError, OSError) as e:
        log.warning("skipping unreadable sample %s: %s", where, e)
        return None
    if not label_in_range(label, num_classes, where):
        return None
    return image, label, where


def _rgb_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != "RGB":  # convert() copies the image even when it has nothing to convert
        image = image.convert("RGB")
    return image


def decode_sample(sample: dict, transform, num_classes: int, seed: int) -> Optional[tuple[torch.Tensor, int]]:
    """Image tensor and label of one tar sample, or None (logged) when it cannot be used.

    The augmentation's randomness is seeded from the sample itself, so a sample's crop depends
    on (seed, epoch, key) alone: a resumed run crops exactly as an uninterrupted one.
    """
    found = read_sample(sample, num_classes, _rgb_image)
    if found is None:
        return None
    image, label, _ = found
    seed_augmentation(sample, seed)
    return transform(image), label
