"""The CPU cores a rank may use, checked against its loader workers.

Where the scheduler confines a job step to the cores it was granted (SLURM's task/affinity or
task/cgroup; a container's cpuset), every rank of a node and all their loader workers share
those cores. A rank with fewer cores than ``data.workers`` runs workers that wait for a core
and a step that waits for its data, without any error: the run is just slow. The check reads
the affinity mask the process was started with, which is what such confinement sets.
"""
from __future__ import annotations

import os
from typing import Optional


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no confinement to see
        return os.cpu_count() or 1


def cores_warning(workers: int, rank: int, ranks_here: int) -> Optional[str]:
    """A warning when each of the ``ranks_here`` ranks sharing this node's cores gets fewer than ``workers``."""
    cores = usable_cores()
    if workers == 0 or cores >= workers * ranks_here:
        return None
    return (f"warning: rank {rank}: {cores} core(s) here for {ranks_here} rank(s), {cores / ranks_here:g} per rank, "
            f"fewer than its `data.workers` = {workers} loader workers: they will wait for cores and the step for "
            f"data. Ask the scheduler for more cores (slurm/train.sbatch takes whole nodes; with --oversubscribe "
            f"give --cpus-per-task={workers * ranks_here} or more) or lower `data.workers`")
