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


def test_heartbeats_cost_the_store_a_constant_number_of_requests_per_rank(tmp_path):
    """One request per rank per interval while ranks progress, three (a set, a check, one multi_get) when about
    to fire, whatever the world size; and a peer that stopped ticking is still found silent."""
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from heartbeats import Counting

    from harness.watchdog import Watchdog

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    for world in (4, 16):
        dogs = []
        for rank in range(world):
            dog = Watchdog(None, rank, world, tmp_path)
            dog._store = Counting(dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30)))
            dog.timeout, dog.interval, dog.last = 600.0, 0.5, time.monotonic()
            dogs.append(dog)
        for dog in dogs:
            dog._exchange(1)
        assert [d._store.requests for d in dogs] == [1] * world  # steady: this rank's tick only
        # a set is not answered: wait until the server holds every tick, as seconds of training would
        wait_for(lambda: server.check([f"harness-watchdog/{r}" for r in range(world)]), 10, "the ticks", poll=0.01)
        for dog in dogs:
            dog.last = time.monotonic() - 599  # about to fire
            dog._exchange(2)
        assert [d._store.requests for d in dogs] == [4] * world
        silent = dogs[-1]
        for tick in range(3, 12):  # every rank but the last keeps ticking, long enough to exceed _silent's limit
            for dog in dogs[:-1]:
                dog._exchange(tick)
            time.sleep(0.5)
        assert sorted(dogs[0]._silent()) == [world - 1], dogs[0]._silent()
        assert dogs[0]._store.requests == 4 + 9 * 3
