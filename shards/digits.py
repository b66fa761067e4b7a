"""Write scikit-learn's handwritten digits as webdataset shards: the demo's real data.

1,797 8x8 grey images of 10 classes ship inside scikit-learn, so the demo needs no download.
They are split once with a fixed seed (80/20), stored losslessly as PNG (``.png`` + ``.cls``
members) in one folder per split (``OUT/train/``, ``OUT/val/``, :mod:`shards.layout`) and
described by a timm-style ``_info.json``, then streamed like any other shards.

    python -m shards.digits --out data/digits
    python -m shards.digits --out data/digits-72 --train-samples 72   # the first 72 of the same train split

``--train-samples N`` keeps the first N images of the same (seeded) train split, in one shard,
and the whole validation split: a student that sees less than its teachers did
(``recipes/compare/adapt.yaml``).
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from shards.layout import move_flat_layout, read_info, shard_file, shard_writer, split_entry, write_info

SPLITS = {"train": 4, "val": 2}  # shards per split: enough for 2 ranks x 2 workers


def write_digits(out: str | os.PathLike, seed: int = 0, val_fraction: float = 0.2,
                 train_samples: Optional[int] = None) -> dict:
    """Write the shards and ``_info.json`` into ``out`` (idempotent) and return the info dict.

    ``train_samples``: only the first N of the train split (one shard); the val split is whole.

    A directory written before the per-split folders is moved into them (renames only).
    """
    out = Path(out)
    move_flat_layout(out)
    info = read_info(out)
    if info is not None:
        return info
    from sklearn.datasets import load_digits  # here: a complete directory needs no scikit-learn import
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    split_index = {"val": order[:n_val], "train": order[n_val:][:train_samples]}
    shards = {**SPLITS, "train": 1} if train_samples else SPLITS
    info = {"name": "digits", "classes": [str(c) for c in range(10)], "splits": {}}
    for split, n_shards in shards.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        parts = np.array_split(split_index[split], n_shards)
        for shard, idx in enumerate(parts):
            with shard_writer(out / shard_file(split, shard)) as sink:  # never a truncated shard under a final name
                for i in idx:
                    buf = io.BytesIO()
                    Image.fromarray(images[i], mode="L").save(buf, format="PNG")
                    sink.write({"__key__": f"{split}_{i:05d}", "png": buf.getvalue(), "cls": int(digits.target[i])})
        info["splits"][split] = split_entry(split, [len(idx) for idx in parts])
    (out / "classes.txt").write_text("\n".join(info["classes"]) + "\n")
    write_info(out, info)  # written last: its presence means "complete"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits", help="output directory (default: data/digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--train-samples", type=int, default=None, metavar="N",
                        help="keep only the first N images of the train split (default: all)")
    args = parser.parse_args()
    if args.train_samples is not None and args.train_samples < 1:
        parser.error("--train-samples must be at least 1")
    info = write_digits(args.out, args.seed, train_samples=args.train_samples)
    counts = ", ".join(f"{k}: {v['num_samples']} in {len(v['filenames'])} shards" for k, v in info["splits"].items())
    print(f"digits shards in {args.out} ({counts})")


if __name__ == "__main__":
    main()
