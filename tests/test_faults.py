"""Faults a long job meets: a diverging loss, a disk that fills up. Each must stop cleanly and
leave a checkpoint to continue from, with a message that names it."""
from pathlib import Path

from conftest import launch, records, summary, tiny_recipe
from harness import checkpoint


def test_a_diverging_run_skips_nan_steps_then_stops_naming_the_last_good_checkpoint(work, digits):
    recipe = tiny_recipe(work, digits, "diverged", schedule={"epochs": 3},
                         runtime={"log_every": 5, "signal_check_every": 5, "max_nonfinite_steps": 10})
    run = work / "diverged"
    assert launch([str(recipe), "--stop-after-epochs", "1"], cwd=work).returncode == 0
    # an absurd learning rate blows the weights up within a few steps: every loss after is NaN
    result = launch([str(recipe), "--resume", "--set", "optim.lr=1e30"], cwd=work)
    assert result.returncode != 0  # accelerate turns the run's exit status 2 into 1
    good = run / "checkpoints" / "epoch0001"
    assert "NaN/inf loss" in result.stderr and f"last good checkpoint is {good}" in result.stderr
    skipped = records(run, "nonfinite")
    assert skipped and skipped[-1]["in_a_row"] >= 10
    assert records(run, "train")[-1]["steps_skipped"] >= 5
    assert checkpoint.latest(run) == good  # nothing written from the diverged weights
    # the way back the message gives works: resume from the named checkpoint at a sane lr
    assert launch([str(recipe), "--resume", str(good)], cwd=work).returncode == 0
    assert summary(run)["student"]["top1"] > 0.5


def test_a_save_that_fails_stops_the_run_and_keeps_the_previous_checkpoint(work, digits):
    recipe = tiny_recipe(work, digits, "diskfull", schedule={"epochs": 2})
    run = work / "diskfull"
    assert launch([str(recipe), "--stop-after-epochs", "1"], cwd=work).returncode == 0
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "epoch0001").iterdir())
    # any file larger than a third of a checkpoint cannot be written: the next save fails as on a full disk
    result = launch([str(recipe), "--resume"], cwd=work, file_size_limit=size // 3)
    assert result.returncode != 0  # accelerate turns the run's exit status 2 into 1
    assert "saving checkpoint" in result.stderr and "epoch0001 is intact" in result.stderr
    assert "could not be written in full" in result.stderr  # the cause, not torch's "unexpected pos"
    assert checkpoint.latest(run).name == "epoch0001"
    assert not list((run / "checkpoints").glob("*.partial"))  # no half-written checkpoint left behind
    assert not (run / "summary.json").exists()
    # space again: the run continues from the intact checkpoint and finishes
    assert launch([str(recipe), "--resume"], cwd=work).returncode == 0
    assert summary(run)["epochs"] == 2


FAIL_ON_ONE_RANK = """
import os, sys
sys.path.insert(0, {root!r})
from harness import run
from harness.watchdog import Watchdog

beat = Watchdog.beat

def failing_beat(self, step=None):  # rank 1 alone meets an error at optimizer step 7 (mid-epoch 0)
    beat(self, step)
    if step == 7 and os.environ["RANK"] == "1":
        raise OSError("injected: rank 1 lost its scratch disk")

Watchdog.beat = failing_beat
if __name__ == "__main__":  # not in the loader workers, which import this module as their __main__
    sys.exit(run.main())
"""


def test_an_error_on_one_rank_mid_epoch_ends_the_job_within_a_minute_and_restarts_decides_on_it(work, digits):
    import json
    import subprocess
    import sys
    import time

    from conftest import LAUNCH_ENV, ROOT, launch_command

    # the watchdog would end it only after 300 s: anything faster is the failure path's own doing
    recipe = tiny_recipe(work, digits, "onerank", schedule={"epochs": 3}, runtime={"progress_timeout": 300})
    run = work / "onerank"
    script = work / "fail_on_one_rank.py"
    script.write_text(FAIL_ON_ONE_RANK.format(root=str(ROOT)))
    cmd = [str(script) if c == str(ROOT / "harness" / "run.py") else c for c in launch_command([str(recipe)], 2)]
    result = subprocess.run(cmd, cwd=work, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert result.returncode != 0
    record = json.loads((run / "failure-rank1.json").read_text())
    assert record["cause"] == "OSError: injected: rank 1 lost its scratch disk" and record["step"] == 7, record
    assert ended - record["time"] < 60, ended - record["time"]  # not the watchdog's 300 s
    assert "error: rank 1 crashed: OSError: injected" in result.stderr, result.stderr[-4000:]
    assert "Traceback" in result.stderr  # a crash keeps its traceback
    # any record rank 0 left (its collective failed) is later: the restart decision names rank 1's cause
    decided = subprocess.run([sys.executable, "-m", "harness.restarts", "failed", str(run), "--job", "1",
                              "--status", str(result.returncode)], cwd=ROOT, env=LAUNCH_ENV, capture_output=True,
                             text=True)
    assert decided.returncode == 0, decided.stdout + decided.stderr
    assert "after: OSError: injected: rank 1 lost its scratch disk (rank 1, at step 7)" in decided.stdout, decided.stdout
