"""Augmentation beyond the crop and flip, from timm: per-sample policies and batch mixing.

Two stages, in timm's order (``transforms_imagenet_train`` then its train loop):

* **Per sample** (:func:`sample_policy`), on the PIL image after the crop and flip, in the loader
  workers of the CPU data path: timm's auto-augment policies (RandAugment, AutoAugment, AugMix),
  torchvision's TrivialAugmentWide, and colour jitter. They need the decoded image in a worker,
  which the GPU data path never has (its workers read only JPEG headers), so recipe validation
  refuses them there.
* **Per batch** (:class:`BatchAugment`), on the normalised batch where it reaches the training
  process, on both data paths: timm's ``RandomErasing``, then ``Mixup`` (Mixup/CutMix), which
  turns the labels into (B, num_classes) probabilities.

Seeding, so that a run resumed mid-epoch augments exactly as an uninterrupted one: timm's ops
draw from Python's ``random`` and NumPy's global generators, torchvision's from torch's. A
sample's torch generator is already seeded from (seed, epoch, key) before its transform runs
(:func:`harness.data.transforms.seed_augmentation`); :class:`Seeded` draws one number from it and
seeds ``random`` and NumPy with it for the op (restoring their state after), so the policy is a
function of (seed, epoch, key) too. A batch is seeded from (seed, epoch, batch index, rank)
(:func:`batch_seed`), the same position a mid-epoch checkpoint records.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

TRIVIAL = "trivialaugment"  # not a timm policy: torchvision's TrivialAugmentWide
POLICY_FORMS = ("'rand-m9-mstd0.5-inc1' (RandAugment: m magnitude, n ops, mstd, inc, p), 'original', 'originalr', "
                "'v0', 'v0r' (AutoAugment; '-mstd0.5' may follow), 'augmix-m5-w4-d2' (AugMix), "
                f"'{TRIVIAL}' (torchvision's TrivialAugmentWide)")


@contextlib.contextmanager
def python_and_numpy_seeded(seed: int) -> Iterator[None]:
    """Python's ``random`` and NumPy's global generator seeded with ``seed`` inside, as they were after.

    timm's augmentations draw from these module-level generators; restoring them keeps a seeded
    op from changing what any other code in the process draws.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class Seeded:
    """A PIL op drawing from ``random``/NumPy, seeded by one draw from the sample's torch generator."""

    def __init__(self, op: Callable[[Image.Image], Image.Image]):
        self.op = op

    def __call__(self, image: Image.Image) -> Image.Image:
        seed = int(torch.randint(0, 2**31 - 1, ()))  # the generator seed_augmentation set for this sample
        with python_and_numpy_seeded(seed):
            return self.op(image)

    def __repr__(self) -> str:
        return f"Seeded({self.op!r})"


def auto_augment_op(policy: str, image_size: int, mean: tuple[float, float, float]) -> Callable:
    """The PIL transform of a policy string, built as timm's ``transforms_imagenet_train`` builds it.

    Raises ValueError (with the accepted forms) for a string timm does not accept.
    """
    from timm.data.auto_augment import (augment_and_mix_transform, auto_augment_transform,
                                        rand_augment_transform)

    fill = tuple(min(255, round(255 * m)) for m in mean)  # what timm fills uncovered pixels with
    if policy == TRIVIAL:
        return T.TrivialAugmentWide(fill=list(fill))  # draws from torch: seeded per sample as it is
    params = dict(translate_const=int(image_size * 0.45), img_mean=fill)  # timm's hparams for these ops
    try:
        if policy.startswith("rand"):
            op = rand_augment_transform(policy, params)
        elif policy.startswith("augmix"):
            op = augment_and_mix_transform(policy, {**params, "translate_pct": 0.3})
        else:
            op = auto_augment_transform(policy, params)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"timm does not accept the policy {policy!r} ({e or 'unknown section'}); "
                         f"use one of the forms {POLICY_FORMS}") from None
    for augment_op in _augment_ops(op):
        if augment_op.aug_fn.__name__ == "posterize":
            augment_op.aug_fn = _posterize
    return Seeded(op)


def _augment_ops(policy) -> Iterator:
    """The timm ``AugmentOp`` objects of a RandAugment / AugMix (``.ops``) or AutoAugment (``.policy``)."""
    yield from getattr(policy, "ops", ())
    for sub_policy in getattr(policy, "policy", ()):
        yield from sub_policy


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, keeping 0 bits as Pillow did before 12 (a black image) instead of raising.

    timm's levels reach 0 bits (RandAugment 'inc1' at magnitude 10, AutoAugment 'v0'), which
    Pillow 12+ refuses ("bits must be between or equal to 1 and 8"): a worker would crash.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)  # Pillow < 12's lookup table: every value & 0
    return ImageOps.posterize(image, bits_to_keep)


def sample_policy(image_size: int, mean: tuple[float, float, float], auto_augment: Optional[str],
                  color_jitter: float) -> list[Callable]:
    """The per-sample PIL ops after the crop and flip (empty when both keys are off)."""
    ops: list[Callable] = []
    if auto_augment:
        ops.append(auto_augment_op(auto_augment, image_size, mean))
    if color_jitter > 0:  # timm's scalar form: brightness, contrast and saturation alike, no hue
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return ops


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of a training batch's augmentation: its position in the run, nothing else."""
    return zlib.crc32(f"batch-augment:{seed}:{epoch}:{batch}:{rank}".encode())


class BatchAugment:
    """Random erasing, then Mixup/CutMix, on a normalised training batch: timm's, seeded per batch.

    ``__call__(x, y, seed)`` returns the batch erased and mixed (``x`` is changed in place) and,
    with Mixup/CutMix on, ``y`` as (B, num_classes) float probabilities: lam * onehot(y) +
    (1 - lam) * onehot(y.flip(0)), timm's pairing of each sample with its mirror in the batch.
    The targets are not label-smoothed here: the loss terms apply ``method.label_smoothing`` to
    them (``F.cross_entropy`` smooths probability targets as timm's ``mixup_target`` does), so
    each term keeps the smoothing it has without mixing (the bias step none).
    """

    def __init__(self, augment, num_classes: int, device: torch.device | str = "cpu"):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.device = torch.device(device)
        self.erase = (RandomErasing(augment.erase_prob, mode=augment.erase_mode, max_count=augment.erase_count,
                                    device=self.device) if augment.erase_prob > 0 else None)
        mixing = augment.mixup > 0 or augment.cutmix > 0
        self.mix = (Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                          switch_prob=augment.mixup_switch_prob, mode=augment.mixup_mode, label_smoothing=0.0,
                          num_classes=num_classes) if mixing else None)

    @staticmethod
    def wanted(augment) -> bool:
        """Whether the recipe's ``data.augment`` asks for any batch-level augmentation."""
        return augment.erase_prob > 0 or augment.mixup > 0 or augment.cutmix > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        # 'rand'/'pixel' erasing draws its fill from torch on x's device: fork that generator too
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with python_and_numpy_seeded(seed), torch.random.fork_rng(devices, device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)  # this device only; torch.manual_seed would queue every device
            if self.erase is not None:
                x = self.erase(x)
            if self.mix is not None:
                x, y = self.mix(x, y)
        return x, y
