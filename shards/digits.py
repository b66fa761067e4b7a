"""Write scikit-learn's handwritten digits as webdataset shards: the demo's real data.

1,797 8x8 grey images of 10 classes ship inside scikit-learn, so the demo needs no download.
They are split once with a fixed seed (80/20), stored losslessly as PNG (``.png`` + ``.cls``
members) and described by a timm-style ``_info.json``, then streamed like any other shards.

    python -m shards.digits --out data/digits
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

SPLITS = {"train": 4, "val": 2}  # shards per split: enough for 2 ranks x 2 workers


def write_digits(out: str | os.PathLike, seed: int = 0, val_fraction: float = 0.2) -> dict:
    """Write the shards and ``_info.json`` into ``out`` (idempotent) and return the info dict."""
    from sklearn.datasets import load_digits

    out = Path(out)
    info_path = out / "_info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    split_index = {"val": order[:n_val], "train": order[n_val:]}
    info = {"name": "digits", "classes": [str(c) for c in range(10)], "splits": {}}
    for split, n_shards in SPLITS.items():
        filenames, lengths = [], []
        for shard, idx in enumerate(np.array_split(split_index[split], n_shards)):
            name = f"{split}-{shard:06d}.tar"
            tmp = out / (name + ".tmp")
            with wds.TarWriter(str(tmp)) as sink:
                for i in idx:
                    buf = io.BytesIO()
                    Image.fromarray(images[i], mode="L").save(buf, format="PNG")
                    sink.write({"__key__": f"{split}_{i:05d}", "png": buf.getvalue(), "cls": int(digits.target[i])})
            tmp.rename(out / name)  # a crash never leaves a truncated shard under a final name
            filenames.append(name)
            lengths.append(len(idx))
        info["splits"][split] = {"name": split, "num_samples": int(sum(lengths)),
                                 "filenames": filenames, "shard_lengths": lengths}
    (out / "classes.txt").write_text("\n".join(info["classes"]) + "\n")
    info_path.write_text(json.dumps(info, indent=2))  # written last: its presence means "complete"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits", help="output directory (default: data/digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = parser.parse_args()
    info = write_digits(args.out, args.seed)
    counts = ", ".join(f"{k}: {v['num_samples']} in {len(v['filenames'])} shards" for k, v in info["splits"].items())
    print(f"digits shards in {args.out} ({counts})")


if __name__ == "__main__":
    main()
