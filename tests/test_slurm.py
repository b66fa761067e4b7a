"""Real SLURM (a one-node cluster started by slurm/local-cluster.sh, which .ci/run calls):
a job warned of its end checkpoints, requeues itself, resumes and ends as an uninterrupted run."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, tiny_recipe


def _cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mix", "alloc"))


pytestmark = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster: run `bash slurm/local-cluster.sh` (root)")


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def trained_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if json.loads(line)["kind"] == "train")


def submit(recipe: Path, *overrides: str) -> str:
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", str(ROOT / "slurm" / "train.sbatch"), str(recipe),
                           *args], capture_output=True, text=True, check=True).stdout.strip().split(";")[0]


def atsc(work, digits, teacher, name):
    return tiny_recipe(work, digits, name, teachers=[{"model": "test_resnet", "checkpoint": str(teacher)}],
                       method={"name": "atsc", "anchor_weight": 1.0, "adapt_after": 1},
                       schedule={"epochs": 12}, runtime={"log_every": 5, "signal_check_every": 2})


def test_warned_job_checkpoints_requeues_resumes_and_matches_an_uninterrupted_run(work, digits, teacher):
    recipe = atsc(work, digits, teacher, "slurm-requeued")
    job = submit(recipe)
    run = work / "slurm-requeued"
    wait_for(lambda: trained_steps(run) >= 1, 180, "the job to start training")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@120 sends
    # SLURM holds a requeued job for a while before it may start again
    wait_for(lambda: job_field(job, "JobState") == "COMPLETED" and (run / "summary.json").exists(), 420, "the requeued job")
    assert int(job_field(job, "Restarts")) >= 1
    log = (ROOT / "logs" / f"atsc-{job}.out").read_text()
    assert "requeueing job" in log and "(restart 1)" in log
    reference = launch([str(recipe), "--set", f"output={work / 'slurm-reference'}"], cwd=work)
    assert reference.returncode == 0
    resumed, straight = (load_file(str(p / "student.safetensors")) for p in (run, work / "slurm-reference"))
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-6), key


def test_cancelled_job_is_not_requeued(work, digits, teacher):
    job = submit(atsc(work, digits, teacher, "slurm-cancelled"))
    wait_for(lambda: job_field(job, "JobState") == "RUNNING", 120, "the job to run")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: job_field(job, "JobState") in ("CANCELLED", "COMPLETED", "FAILED"), 120, "the job to end")
    time.sleep(3)
    assert job_field(job, "JobState") == "CANCELLED"
    assert job_field(job, "Restarts") == "0"
