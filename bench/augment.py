"""CPU cost of each `data.augment` key of harness/data/augment.py, apart from the training step.

    python bench/end_to_end.py --data DIR          # once: writes 500x375 JPEG shards into DIR/shards
    python bench/augment.py --data DIR [--size 224] [--images 120] [--rounds 5]

Per-sample keys (loader workers, CPU path): CPU time per image of decode + RandomResizedCrop +
flip + the policy, against the same without a policy, rounds interleaved (the machine may be
shared: CPU time of this process, one torch thread). Batch keys (training process, either path):
CPU time per batch of ``--batch`` normalised images. ``bench/end_to_end.py --set
data.augment.KEY=VALUE`` gives the same keys' effect on a whole run (images/s, data wait).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from harness.data import Preprocess, decode_sample, normalize, read_samples, select_shards, train_transform  # noqa: E402
from harness.data.augment import BatchAugment, sample_policy  # noqa: E402
from harness.recipe import Augment  # noqa: E402

POLICIES = [("none", None, 0.0), ("rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5-inc1", 0.0),
            ("trivialaugment", "trivialaugment", 0.0), ("original", "original", 0.0), ("color_jitter 0.4", None, 0.4)]
BATCH = [("erase_prob 0.25", Augment(erase_prob=0.25)), ("mixup 0.8", Augment(mixup=0.8)),
         ("cutmix 1.0", Augment(cutmix=1.0)), ("mixup 0.8 + cutmix 1.0, elem", Augment(mixup=0.8, cutmix=1.0,
                                                                                    mixup_mode="elem"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the --data DIR of bench/end_to_end.py (its shards)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pre = Preprocess(args.size, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    samples = list(read_samples(select_shards(str(args.data / "shards" / "train")).urls[:1]))[:args.images]
    transforms = {name: train_transform(pre, (0.08, 1.0), (3 / 4, 4 / 3), 0.5,
                                        sample_policy(args.size, pre.mean, policy, jitter))
                  for name, policy, jitter in POLICIES}
    per_image: dict[str, list[float]] = {name: [] for name in transforms}
    for r in range(args.rounds):
        order = list(transforms.items())
        for name, transform in order if r % 2 == 0 else order[::-1]:
            start = time.process_time()
            for sample in samples:
                decode_sample(sample, transform, 10, r)
            per_image[name].append((time.process_time() - start) / len(samples) * 1e6)
    base = statistics.median(per_image["none"])
    for name, times in per_image.items():
        us = statistics.median(times)
        print(f"{name:32s} {us:7.0f} us CPU per image (decode, crop, flip, policy), +{us - base:.0f} over none")
    x = normalize(torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8), pre)
    y = torch.randint(0, 1000, (args.batch,))
    for name, augment in BATCH:
        batch_augment, times = BatchAugment(augment, 1000), []
        for i in range(3 * args.rounds):
            images = x.clone()
            start = time.process_time()
            batch_augment(images, y, i)
            times.append((time.process_time() - start) * 1e3)
        print(f"{name:32s} {statistics.median(times):7.2f} ms CPU per batch of {args.batch} at {args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
