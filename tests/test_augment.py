"""timm's augmentations (harness/data/augment.py): seeded per sample and per batch, resumable, Mixup by hand.

Per-sample policies (auto-augment, colour jitter) run in the CPU path's workers after the crop;
random erasing and Mixup/CutMix on the normalised batch in the training process, both paths.
"""
import io
import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from harness.data.augment import BatchAugment, Seeded, batch_seed, python_and_numpy_seeded, sample_policy
from harness.build import build_distiller
from harness.data import (DeferredDecode, EpochLoader, Preprocess, ShardStream, build_loaders, decode_on,
                          decode_sample, select_shards, train_transform)
from harness.recipe import Augment, RecipeError, load_recipe
from test_method import STUDENT_PRE, batch, models, recipe

PRE = Preprocess(image_size=16, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CROP = ((0.5, 1.0), (3 / 4, 4 / 3), 0.5)
POLICIES = ["rand-m9-mstd0.5-inc1", "original", "v0", "augmix-m5-w4-d2", "trivialaugment"]


def jpeg_sample(key: str, seed: int = 0, label: int = 3) -> dict:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "cls": label}


def augmented(sample: dict, policy, seed: int = 7) -> torch.Tensor:
    return decode_sample(sample, train_transform(PRE, *CROP, policy), 10, seed)[0]


# ----------------------------------------------------------------------------- per sample


@pytest.mark.parametrize("policy, jitter", [(p, 0.0) for p in POLICIES] + [(None, 0.4)])
def test_each_per_sample_key_is_seeded_by_seed_epoch_and_key(policy, jitter):
    ops = sample_policy(PRE.image_size, PRE.mean, policy, jitter)
    assert len(ops) == 1
    a, b = jpeg_sample("a"), jpeg_sample("b")  # the same pixels under two keys
    first = [augmented(a, ops, seed=s) for s in range(8)]
    assert all(torch.equal(augmented(a, ops, seed=s), x) for s, x in enumerate(first))  # same seed+key: same pixels
    assert sum(torch.equal(augmented(b, ops, seed=s), x) for s, x in enumerate(first)) <= 1  # another key: others
    assert sum(torch.equal(first[s], first[s + 1]) for s in range(7)) <= 1  # another (seed, epoch): others
    plain = [augmented(a, [], seed=s) for s in range(8)]
    # it changes the image (RandAugment leaves it as is a quarter of the time: each of its 2 ops has p=0.5)
    assert sum(not torch.equal(p, x) for p, x in zip(plain, first)) >= 3


def test_a_policy_draws_after_the_crop_and_leaves_global_generators_as_they_were():
    sample = jpeg_sample("k")
    random.seed(11)
    np.random.seed(11)
    expected = random.random(), np.random.rand()
    random.seed(11)
    np.random.seed(11)
    identity = [Seeded(lambda image: image)]  # consumes a draw after the crop and flip, changes nothing
    for s in range(6):
        assert torch.equal(augmented(sample, identity, seed=s), augmented(sample, [], seed=s))
        augmented(sample, sample_policy(PRE.image_size, PRE.mean, "rand-m9-mstd0.5-inc1", 0.0), seed=s)
    assert (random.random(), np.random.rand()) == expected


def test_posterize_to_zero_bits_gives_a_black_image_as_timm_meant_not_a_crash():
    """timm's levels reach 0 bits, which Pillow 12+ refuses; harness.data.augment keeps Pillow 11's black image."""
    from harness.data.augment import _augment_ops, auto_augment_op

    for policy, name in (("rand-m10-inc1", "PosterizeIncreasing"), ("v0", "Posterize")):
        ops = [op for op in _augment_ops(auto_augment_op(policy, 16, PRE.mean).op) if op.name == name]
        assert ops
        op = ops[0]
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10 if name == "PosterizeIncreasing" else 0, 0
        image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
        assert np.array(op(image)).max() == 0


def test_keys_off_build_exactly_the_old_transforms_and_no_batch_stage(digits, tmp_path):
    plain = load_recipe(write_recipe(tmp_path, digits, {}))
    train_loader, val_loader = build_loaders(plain, PRE, 0, 1, torch.device("cpu"))
    assert [type(op).__name__ for op in train_loader.stream.transform.transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "function"]
    assert train_loader.augment is None and val_loader.augment is None
    assert sample_policy(16, PRE.mean, None, 0.0) == []
    assert not BatchAugment.wanted(Augment())


# ----------------------------------------------------------------------------- per batch


def normalised_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_is_seeded_per_batch(mode):
    erase = BatchAugment(Augment(erase_prob=1.0, erase_mode=mode, erase_count=2), 10)
    x, y = normalised_batch()
    out, labels = erase(x.clone(), y, seed=3)
    assert torch.equal(labels, y)  # erasing leaves the labels alone
    assert torch.equal(erase(x.clone(), y, seed=3)[0], out)
    assert not torch.equal(erase(x.clone(), y, seed=4)[0], out)
    changed = (out != x).flatten(1).any(1)
    assert changed.all()  # probability 1: every image has an erased rectangle
    if mode == "const":
        assert (out[out != x] == 0).all()
    assert batch_seed(0, 1, 2, 0) != batch_seed(0, 1, 2, 1) != batch_seed(0, 2, 1, 0)


def test_mixup_targets_by_hand():
    mix = BatchAugment(Augment(mixup=0.8), 10)
    x, y = normalised_batch()
    out, soft = mix(x.clone(), y, seed=21)
    with python_and_numpy_seeded(21):  # timm's draws, in its order: apply?, then lam ~ Beta(0.8, 0.8)
        assert np.random.rand() < 1.0
        lam = float(np.random.beta(0.8, 0.8))
    assert 0 < lam < 1
    n = len(y)
    for i in range(n):  # image i is blended with its mirror n-1-i, and so is its label
        j = n - 1 - i
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
        expected = torch.zeros(10)
        expected[y[i]] += lam
        expected[y[j]] += 1 - lam
        assert torch.allclose(soft[i], expected, atol=1e-6)
    assert soft.dtype == torch.float32 and soft.shape == (n, 10)


def test_cutmix_targets_by_hand():
    mix = BatchAugment(Augment(cutmix=1.0), 10)
    x, y = normalised_batch()
    pasted = 0
    for seed in range(6):
        out, soft = mix(x.clone(), y, seed=seed)
        box = (out != x).any(dim=1).any(dim=0)  # (H, W): where the mirror's pixels were pasted
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        area = 0
        if len(rows):  # a box under one pixel is empty: nothing pasted, lam 1
            top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
            area = (bottom - top) * (right - left)
            assert box[top:bottom, left:right].all() and box.sum() == area  # one rectangle
            assert torch.equal(out[:, :, top:bottom, left:right], x.flip(0)[:, :, top:bottom, left:right])
            assert torch.equal(out[:, :, ~box], x[:, :, ~box])
            pasted += 1
        lam = 1 - area / (12 * 12)  # timm's area-corrected lambda
        expected = lam * F.one_hot(y, 10).float() + (1 - lam) * F.one_hot(y.flip(0), 10).float()
        assert torch.allclose(soft, expected, atol=1e-6)
    assert pasted >= 3


def test_label_smoothing_is_applied_once_by_the_loss_as_timm_would_have():
    """Pure mixed targets + the loss's label_smoothing == timm's smoothed mixed targets + plain CE."""
    from timm.data import Mixup

    s, n, classes = 0.1, 8, 10
    x, y = normalised_batch(n)
    ours_x, soft = BatchAugment(Augment(mixup=0.8), classes)(x.clone(), y, seed=5)
    with python_and_numpy_seeded(5):
        timm_x, timm_soft = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=s, num_classes=classes)(
            x.clone(), y)
    assert torch.equal(ours_x, timm_x)
    # by hand: timm's smoothed one-hot is 1 - s + s/C on the class, s/C elsewhere, then mixed
    assert torch.allclose(timm_soft, (1 - s) * soft + s / classes, atol=1e-6)
    logits = torch.randn(n, classes)
    assert torch.allclose(F.cross_entropy(logits, soft, label_smoothing=s),
                          -(timm_soft * logits.log_softmax(-1)).sum(-1).mean(), atol=1e-6)


# ----------------------------------------------------------------------------- resume


def write_recipe(tmp_path, digits, augment, **data):
    tree = {"output": str(tmp_path / "run"),
            "data": {"train": str(digits / "train"), "val": str(digits / "val"), "num_classes": 10,
                     "image_size": 16, "batch_size": 8, "workers": 0, "augment": augment, **data},
            "student": {"model": "test_resnet"}, "method": {"name": "supervised"}, "optim": {"lr": 0.1},
            "schedule": {"epochs": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_resume_mid_epoch_with_mixup_replays_the_uninterrupted_batches(digits, path):
    """Every key on (the CPU path; the batch-level ones on the GPU path's decode stage, here run on the CPU)."""
    shards = select_shards(str(digits / "train"))
    urls = shards.urls[:1]  # one shard, two workers: its samples dealt round-robin
    everything = Augment(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, erase_prob=0.5, mixup=0.8,
                         cutmix=1.0, mixup_mode="pair")

    def loader():
        transform = (train_transform(PRE, *CROP, sample_policy(16, PRE.mean, "rand-m9-mstd0.5-inc1", 0.3))
                     if path == "cpu" else DeferredDecode(PRE, CROP))
        stream = ShardStream(urls, transform, 10, 8, train=True, seed=3, shuffle_buffer=50,
                             lengths={u: shards.lengths[u] for u in urls})
        return EpochLoader(stream, 2, pin_memory=False, pre=PRE, augment=BatchAugment(everything, 10))

    def run(epoch, resume=None, stop=None):
        it = loader().epoch(epoch, resume)
        xs, ys = zip(*itertools.islice(it, stop))
        return torch.cat(xs), torch.cat(ys)

    straight_x, straight_y = run(1)
    assert straight_y.dtype == torch.float32 and straight_y.shape[1] == 10
    assert ((straight_y > 0).sum(1) > 1).float().mean() > 0.5  # most labels are mixtures
    again_x, again_y = run(1)
    assert torch.equal(again_x, straight_x) and torch.equal(again_y, straight_y)
    first = loader()
    seen = list(itertools.islice(first.epoch(1), 5))  # stopped after 5 batches: an odd count
    assert first.position.batches == 5
    rest_x, rest_y = zip(*loader().epoch(1, first.position))
    assert torch.equal(torch.cat([x for x, _ in seen] + list(rest_x)), straight_x)
    assert torch.equal(torch.cat([y for _, y in seen] + list(rest_y)), straight_y)
    other_x, _ = run(2, stop=len(seen))
    assert not torch.equal(other_x, straight_x[:len(other_x)])


# ----------------------------------------------------------------------------- the recipe, the GPU path


def test_per_sample_policies_are_refused_on_the_gpu_path_with_the_fix(digits, tmp_path):
    for augment, keys in (({"auto_augment": "original"}, "`data.augment.auto_augment`"),
                          ({"color_jitter": 0.4}, "`data.augment.color_jitter`"),
                          ({"auto_augment": "v0", "color_jitter": 0.4},
                           "`data.augment.auto_augment` and `data.augment.color_jitter`")):
        with pytest.raises(RecipeError) as e:
            load_recipe(write_recipe(tmp_path, digits, augment, decode="gpu"))
        assert (f"recipe.yaml: Value error, {keys} transform each decoded image in the loader workers, but with "
                f"`data.decode: gpu` the workers only read JPEG headers and the pixels exist only on the GPU; set "
                f"`data.decode: cpu` (or `auto`, which then decodes on the CPU), or remove {keys}") in str(e.value)
    # auto: the CPU path, even on a CUDA device
    assert decode_on("auto", torch.device("cuda", 0), "rrc", pixels=True) == "cpu"
    policy = load_recipe(write_recipe(tmp_path, digits, {"auto_augment": "rand-m9-mstd0.5-inc1"}))
    train_loader, val_loader = build_loaders(policy, PRE, 0, 1, torch.device("cuda"))
    assert train_loader.decode is None and isinstance(train_loader.stream.transform.transforms[2], Seeded)
    # batch-level augmentation runs on either path; evaluation is never augmented
    mixed = load_recipe(write_recipe(tmp_path, digits, {"mixup": 0.8, "erase_prob": 0.25}, decode="gpu"))
    train_loader, val_loader = build_loaders(mixed, PRE, 0, 1, torch.device("cuda"))
    assert isinstance(train_loader.stream.transform, DeferredDecode) and train_loader.augment is not None
    assert val_loader.augment is None


def test_recipe_refuses_bad_policies_and_odd_batches_for_mixup(digits, tmp_path):
    with pytest.raises(RecipeError, match=r"`data.augment.auto_augment`: Value error, timm does not accept the policy 'rand-x9' \(Unknown "
                                          r"RandAugment config section\); use one of the forms 'rand-m9-mstd0.5-inc1'"):
        load_recipe(write_recipe(tmp_path, digits, {"auto_augment": "rand-x9"}))
    with pytest.raises(RecipeError, match=r"need an even `data.batch_size`, not 7"):
        load_recipe(write_recipe(tmp_path, digits, {"cutmix": 1.0}, batch_size=7))


# ----------------------------------------------------------------------------- soft targets in the methods


@pytest.mark.parametrize("method, kw", [("supervised", {}), ("kd", {"ce_weight": 0.5, "kd_weight": 0.5}),
                                        ("atsc", {"ce_weight": 0.3, "kd_weight": 0.2})])
def test_one_hot_soft_targets_give_the_hard_label_loss(method, kw):
    student, teachers = models()
    teachers = [] if method == "supervised" else teachers
    r = recipe(method, teachers=() if method == "supervised" else ("test_resnet",), label_smoothing=0.1, **kw)
    d = build_distiller(r, student, teachers, STUDENT_PRE)
    if method == "atsc":
        d.set_adapting(True)
    d.eval()  # BatchNorm on running statistics: both calls see the same network
    x, y = batch()
    hard_loss, hard = d(x, y)
    soft_loss, soft = d(x, F.one_hot(y, 10).float())
    assert set(hard) == set(soft) and torch.allclose(soft_loss, hard_loss, atol=1e-6)
    assert all(torch.allclose(soft[k], hard[k], atol=1e-6) for k in hard)
    if method == "atsc":
        assert "bias0" in hard  # the fused bias step, unsmoothed CE against the targets
        assert torch.allclose(d.bias_loss(x, F.one_hot(y, 10).float()), d.bias_loss(x, y), atol=1e-6)
