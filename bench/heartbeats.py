"""Requests the watchdogs' heartbeats send to the launcher's store, with N simulated ranks.

Every rank's watchdog (``harness/watchdog.py``) talks to one TCPStore, the one torchrun's agent
hosts and NCCL's bootstrap uses. Here N threads each run a rank's ``Watchdog._exchange`` against
one real TCPStore on this host, each through its own client, and every store call is counted (a
``multi_get`` is one request: one round trip). Two states: "steady" (every rank progressing) and
"about to fire" (every rank near ``runtime.progress_timeout``, as in a global hang). Requests per
second are per default interval (10 s; ``--interval``), with the measured time one round took.

    PYTHONPATH=. python bench/heartbeats.py --ranks 256
    PYTHONPATH=<an older checkout> python bench/heartbeats.py --ranks 256   # the same bench, older watchdog
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from harness.watchdog import Watchdog


class Counting:
    """A store client that counts its requests."""

    def __init__(self, store):
        self.store, self.requests, self.lock = store, 0, threading.Lock()

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def counted(*args, **kwargs):
            self.requests += 1  # one thread per client: no lock needed
            return method(*args, **kwargs)

        return counted


def round_of(dogs: list[Watchdog], tick: int) -> float:
    """Every rank exchanges once, concurrently; the seconds the round took."""
    threads = [threading.Thread(target=d._exchange, args=(tick,)) for d in dogs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="rounds per state (the first is not timed: warm-up)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between a watchdog's exchanges (its maximum)")
    args = p.parse_args()
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    out = tempfile.mkdtemp()
    dogs, clients = [], []
    for rank in range(args.ranks):
        dog = Watchdog(None, rank, args.ranks, out)  # no thread: the bench drives the exchanges
        client = Counting(dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=60)))
        dog._store, dog.interval = client, args.interval
        dogs.append(dog)
        clients.append(client)
    tick = 0
    for state in ("steady", "about to fire"):
        for dog in dogs:
            dog.timeout = 600.0
            dog.last = time.monotonic() - (0 if state == "steady" else 599)
        seconds, requests = [], 0
        for r in range(args.rounds):
            before = sum(c.requests for c in clients)
            tick += 1
            took = round_of(dogs, tick)
            if r:  # the first round of a state only brings every key into the store
                seconds.append(took)
                requests += sum(c.requests for c in clients) - before
        per_round = requests / (args.rounds - 1)
        print(f"{args.ranks} ranks, {state}: {per_round:,.0f} requests per interval "
              f"({per_round / args.ranks:,.1f} per rank), {per_round / args.interval:,.0f} requests/s at a "
              f"{args.interval:g} s interval; one round took {sum(seconds) / len(seconds):.2f} s")


if __name__ == "__main__":
    main()
