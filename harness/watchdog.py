"""No silent hangs: a progress watchdog on every rank that names the ranks that stopped answering.

A rank whose peer has died or stopped waits inside a collective until the process group's
timeout, which is long by default (30 min for gloo). The :class:`Watchdog` is a thread on every
rank that the training loop feeds (:meth:`Watchdog.beat`, once per optimizer step, evaluation
batch and checkpoint). When nothing is fed for ``runtime.progress_timeout`` seconds it prints
every thread's stack (faulthandler), names the ranks that stopped answering, records the
failure and ends the process with :data:`HANG_EXIT`, so the launcher stops the other ranks and
``slurm/train.sbatch`` can restart the job.

"Stopped answering" needs a signal that a stuck rank's main thread cannot give: each watchdog
thread also ticks a heartbeat key in the launcher's rendezvous store (torchrun hosts it in its
agent, not in a training process). A peer that is waiting in a collective still ticks; one
that is SIGSTOPped, killed or on a lost node does not.

That store is one process, which the launcher and NCCL's bootstrap use too, so the load on it
must not grow with ranks squared: each rank writes its own tick (one request per interval) and
reads its peers' only when it is about to fire, in one ``multi_get`` per interval, for long
enough before firing to tell a silent peer (``_watching``). Measured by ``bench/heartbeats.py``.

A rank it ends leaves a failure record (``harness/restarts.py``) naming the cause and the step.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from harness.restarts import record_failure

HANG_EXIT = 3  # the exit status of a rank the watchdog ended


class Watchdog:
    """Ends this rank when no progress was reported for ``timeout`` seconds; None: never.

    The thread starts at construction but does nothing until the first :meth:`beat` (building
    models and loading weights have no steps to count). ``beat`` is a few attribute writes: it
    costs nothing per step and needs no collective.
    """

    def __init__(self, timeout: Optional[float], rank: int, world_size: int, output: str | Path):
        self.timeout, self.rank, self.world_size, self.output = timeout, rank, world_size, Path(output)
        self.step: Optional[int] = None  # the last optimizer step reported, for failure records
        self.last: Optional[float] = None  # monotonic time of the last beat; None: not armed yet
        # check often enough to fire within a few per cent of the timeout, at most every 10 s
        self.interval = min(10.0, max(0.5, (timeout or 60) / 20))
        self.peers: dict[int, tuple[str, float]] = {}  # rank -> (last tick seen, local time it changed)
        self.started = time.monotonic()
        self.started_wall = time.time()  # records this process wrote from here on hold a cause: kept
        self._store = None
        if timeout is not None:
            threading.Thread(target=self._run, name="harness-watchdog", daemon=True).start()

    def beat(self, step: Optional[int] = None) -> None:
        """Report progress (a step, an evaluation batch, a checkpoint); arms the watchdog."""
        self.last = time.monotonic()
        if step is not None:
            self.step = step

    def _run(self) -> None:
        tick = 0
        while True:
            time.sleep(self.interval)
            tick += 1
            self._exchange(tick)
            if self.last is not None and time.monotonic() - self.last > self.timeout:
                self._fire()

    def _connect(self):
        """A client of the launcher's rendezvous store, our own (the process group's is not shared across threads)."""
        if self._store is None and self.world_size > 1 and "MASTER_ADDR" in os.environ:
            import torch.distributed as dist

            self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=timedelta(seconds=max(5.0, 2 * self.interval)))
        return self._store

    def _watching(self) -> bool:
        """Whether the peers' ticks are read now: within the last stretch before this rank would fire.

        That stretch is long enough for a peer to go unchanged for ``_silent``'s limit, plus two
        intervals of slack, so a rank fires knowing which peers are silent.
        """
        if self.last is None or self.timeout is None:
            return False
        lead = 3 * self.interval + 2 + 2 * self.interval
        return time.monotonic() - self.last > self.timeout - lead

    def _exchange(self, tick: int) -> None:
        """Publish this rank's heartbeat (one request); when about to fire, note when each peer's last changed."""
        try:
            store = self._connect()
            if store is None:
                return
            store.set(f"harness-watchdog/{self.rank}", str(tick))
            if not self._watching():
                return
            peers = [p for p in range(self.world_size) if p != self.rank]
            keys = [f"harness-watchdog/{p}" for p in peers]
            if not store.check(keys):  # a peer never started its watchdog (multi_get would wait for it): those that did
                peers = [p for p, key in zip(peers, keys) if store.check([key])]
                keys = [f"harness-watchdog/{p}" for p in peers]
            now = time.monotonic()
            for peer, value in zip(peers, store.multi_get(keys) if keys else []):
                value = value.decode()
                if self.peers.get(peer, ("", 0.0))[0] != value:
                    self.peers[peer] = (value, now)
        except Exception:  # noqa: BLE001 - an unreachable store is itself reported by _silent()
            self._store = None

    def _silent(self) -> dict[int, float]:
        """Peers whose heartbeat has not changed for three check intervals: rank -> seconds silent."""
        now, limit = time.monotonic(), 3 * self.interval + 2
        silent = {}
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            since = self.peers.get(peer, ("", self.started))[1]
            if now - since > limit:
                silent[peer] = now - since
        return silent

    def _fire(self) -> None:
        silent = self._silent()
        waited = time.monotonic() - self.last
        if silent:
            who = ", ".join(f"{r} (silent {s:.0f} s)" for r, s in sorted(silent.items()))
            cause = f"hang: rank(s) {', '.join(map(str, sorted(silent)))} stopped answering"
            hint = "stopped, killed, or on a lost node"
        else:
            who, cause = "none (every rank's watchdog still answers)", "hang: no rank progressed"
            hint = "all alive: a deadlock or a stuck device; the stacks show where each rank waits"
        message = (f"error: rank {self.rank}: no training step completed in {waited:.0f} s (after step {self.step}; "
                   f"`runtime.progress_timeout` = {self.timeout:g} s). Ranks that stopped answering: {who}; {hint}. "
                   f"This rank's stacks follow; the job can continue with --resume from its latest checkpoint.")
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(message, file=sys.stderr, flush=True)  # again below the stacks, where a log's reader looks
        try:
            record_failure(self.output, self.rank, cause, self.step, message, keep_since=self.started_wall)
        finally:
            os._exit(HANG_EXIT)
