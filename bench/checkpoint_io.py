"""Bytes each rank reads to checksum checkpoints: at a save and at a resume, at N processes.

Runs the harness on the digits shards (ZeRO-2, so every rank writes a partition) under
``accelerate launch``: a save (``--stop-after-steps``), then a resume of it that saves once
more. In each training process the manifest's ``crc32`` (the only reader of checkpoint files
for checksums) is wrapped to add up the bytes it reads, and the sums are split into those read
inside ``checkpoint.save`` and those read outside it (the resume's verification).

    PYTHONPATH=. python bench/checkpoint_io.py --processes 2 4
    PYTHONPATH=<an older checkout> python bench/checkpoint_io.py --processes 2 4   # the same bench, older code
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def worker() -> None:
    """One training process: harness/run.py with its checksum reads counted per phase."""
    from harness import checkpoint, manifest, run

    counts = {"save": 0, "resume": 0}
    phase = ["resume"]
    crc32, save = manifest.crc32, checkpoint.save

    def counted_crc32(path):
        counts[phase[0]] += Path(path).stat().st_size
        return crc32(path)

    def counted_save(*args, **kwargs):
        phase[0] = "save"
        try:
            return save(*args, **kwargs)
        finally:
            phase[0] = "resume"

    manifest.crc32, checkpoint.save = counted_crc32, counted_save
    status = run.main(sys.argv[2:])
    out = Path(os.environ["BENCH_OUT"])
    (out / f"rank{os.environ['RANK']}-{os.environ['BENCH_PHASE']}.json").write_text(json.dumps(counts))
    sys.exit(status)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    args = p.parse_args()
    from shards.digits import write_digits

    work = Path(tempfile.mkdtemp(prefix="checkpoint-io-"))
    digits = work / "digits"
    write_digits(digits)
    for n in args.processes:
        run, out = work / f"run{n}", work / f"counts{n}"
        out.mkdir()
        recipe = work / f"run{n}.yaml"
        recipe.write_text(yaml.safe_dump({
            "output": str(run), "student": {"model": "test_resnet"}, "method": {"name": "supervised"},
            "data": {"train": str(digits / "train"), "val": str(digits / "val"), "num_classes": 10, "image_size": 16,
                     "crop_pct": 1.0, "batch_size": 8, "workers": 1},
            "optim": {"lr": 0.1}, "schedule": {"epochs": 2}, "runtime": {"zero_stage": 2, "signal_check_every": 1}}))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + n),
                  __file__, "--worker", str(recipe)]
        for phase, extra in (("first", ["--stop-after-steps", "2"]), ("resumed", ["--resume", "--stop-after-steps", "1"])):
            env = {**os.environ, "BENCH_OUT": str(out), "BENCH_PHASE": phase, "OMP_NUM_THREADS": "1"}
            subprocess.run(launch + extra, env=env, check=True, capture_output=True)
        size = sum(f.stat().st_size for f in (run / "checkpoints").glob("*/*") if f.name != "manifest.json") / \
            len(list((run / "checkpoints").glob("epoch*")))
        first = [json.loads((out / f"rank{r}-first.json").read_text()) for r in range(n)]
        resumed = [json.loads((out / f"rank{r}-resumed.json").read_text()) for r in range(n)]
        kib = lambda values: " ".join(f"{v / 1024:,.0f}" for v in values)
        print(f"{n} processes, checkpoint {size / 1024:,.0f} KiB: KiB read per rank (rank 0 first): "
              f"save [{kib(r['save'] for r in first)}], resume [{kib(r['resume'] for r in resumed)}]")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker()
    else:
        main()
