"""No silent hangs: a rank whose peer stopped answering exits within `runtime.progress_timeout`,
with every thread's stack and a message that names the silent rank (harness/watchdog.py)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import LAUNCH_ENV, launch_command, rank_pids, tiny_recipe, wait_for


def trained(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and '"kind": "train"' in metrics.read_text()


def test_a_stopped_rank_is_named_and_the_other_exits_within_the_progress_timeout(work, digits):
    timeout = 30  # generous against a busy 2-core host: a step here takes well under a second
    recipe = tiny_recipe(work, digits, "hang", schedule={"epochs": 50},
                         runtime={"log_every": 2, "progress_timeout": timeout})
    run, log = work / "hang", work / "hang.log"
    with log.open("w") as sink:
        launcher = subprocess.Popen(launch_command([str(recipe)], processes=2), cwd=work, env=LAUNCH_ENV,
                                    stdout=sink, stderr=subprocess.STDOUT)
    stopped = None
    try:
        wait_for(lambda: trained(run) or launcher.poll() is not None, 300, "training to start", poll=0.5)
        assert launcher.poll() is None, log.read_text()[-4000:]
        ranks = rank_pids(str(run))
        assert sorted(ranks) == [0, 1], ranks
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)  # alive but silent: its peer's next collective would wait 15 min
        start = time.monotonic()
        wait_for(lambda: not Path(f"/proc/{ranks[0]}").exists() or _zombie(ranks[0]), timeout + 60,
                 "rank 0 to give up on its stopped peer", poll=0.5)
        waited = time.monotonic() - start
        launcher.wait(timeout=120)  # torchrun then ends the stopped rank too
    finally:
        if stopped is not None and Path(f"/proc/{stopped}").exists():
            os.kill(stopped, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log.read_text()
    assert launcher.returncode != 0
    assert timeout * 0.5 < waited < timeout + 60, waited
    assert "error: rank 0: no training step completed in" in text and "Ranks that stopped answering: 1 (silent" in text, text[-4000:]
    assert "most recent call first" in text  # faulthandler's dump of rank 0's threads
    record = json.loads((run / "failure-rank0.json").read_text())
    assert record["cause"] == "hang: rank(s) 1 stopped answering" and record["step"] >= 2


def _zombie(pid: int) -> bool:
    """True once ``pid`` has exited but is not yet reaped by its parent (torchrun)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True
