"""Stop requests (SIGTERM, SIGUSR1 and stop files), agreed across the ranks of a run."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import torch

from harness.distributed import all_reduce


class StopSignals:
    """Stop requests, which the ranks agree on every few steps.

    SIGUSR1 to a training process or a file ``<output>/stop-requeue`` (SLURM's warning before
    preemption or the time limit: the batch script then requeues), and SIGTERM or a file
    ``<output>/stop``, each ask for a checkpoint at the next check and a clean exit. The files
    serve launchers that cannot deliver a signal to every rank (slurm/train.sbatch).

    Only rank 0 (``poll_files``) looks at the files: the all-reduce shares its answer, and 511
    more stat calls on a shared filesystem every few steps would add nothing. A file is never
    cleared at start-up (a warning that arrives while the run starts must not be lost): the
    batch script clears stale ones before it launches, and rank 0 removes the one it acted on
    once the stop's checkpoint is written (:meth:`answered`).
    """

    FILES = {"requeue": "stop-requeue", "stop": "stop"}

    def __init__(self, out: Path, poll_files: bool):
        self.out, self.poll_files = out, poll_files
        self.received = {"requeue": False, "stop": False}
        signal.signal(signal.SIGUSR1, lambda *_: self.received.__setitem__("requeue", True))
        signal.signal(signal.SIGTERM, lambda *_: self.received.__setitem__("stop", True))

    def answered(self) -> None:
        """The stop was checkpointed: its request file is spent (a --resume must not stop at once)."""
        if self.poll_files:
            for name in self.FILES.values():
                (self.out / name).unlink(missing_ok=True)

    def agreed(self, device) -> Optional[str]:
        """'requeue' or 'stop' if any rank got a request (a collective: every rank must call)."""
        asked = {k: v or (self.poll_files and (self.out / self.FILES[k]).exists()) for k, v in self.received.items()}
        flags = torch.tensor([float(asked["requeue"]), float(asked["stop"])], device=device)
        all_reduce(flags, "max")
        return "requeue" if flags[0] else "stop" if flags[1] else None
