"""Failure records and bounded automatic restarts (``slurm/train.sbatch`` asks this module).

A rank that fails (an exception, a refusal, the watchdog of ``harness/watchdog.py``) writes
``<output>/failure-rank<N>.json``: a cause that is the same when the same failure recurs, and
the optimizer step. When the training step of a SLURM job fails, the batch script runs
``python -m harness.restarts failed OUTPUT --job ID --status S``, which decides:

* restart (exit 0; the script requeues the job, which resumes from the latest checkpoint),
  while fewer than ``--max`` restarts (default 3) were made for this job, counted across
  requeues, and the failure is not one that already caused a restart at the same step;
* give up (exit 1), saying why, when the limit is used or the same cause recurred at the same
  step: a bad recipe, divergence or a data error fails the same way every time, and retrying
  it would only burn the allocation.

Every decision is one line on stdout (the job's log) and one record in ``metrics.jsonl``
(``restart`` or ``restart_refused``), so a run's history shows each restart and its cause. A
job that SLURM itself requeued (its node failed, the batch script died with it) is counted
too: ``started`` compares SLURM's restart count with the records and adds the missing one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from harness.files import write_atomic
from harness.records import METRICS_FILE, append_record, read_records

FAILURE_GLOB = "failure-rank*.json"
DEFAULT_MAX_RESTARTS = 3


def record_failure(output: str | Path, rank: int, cause: str, step: Optional[int], message: str,
                   keep_since: Optional[float] = None) -> None:
    """Write this rank's failure record; ``cause`` must read the same when the failure recurs (it is compared).

    ``keep_since`` (a ``time.time()``): a record this rank wrote at or after it is kept, not
    replaced. The watchdog passes its process's start: a rank that raised and then hung on the
    way out keeps its real cause, not "hang".
    """
    out = Path(output)
    if not out.is_dir():  # refused before an output folder existed (a local run): nothing to restart
        return
    if keep_since is not None:
        try:
            # records keep their time to the millisecond: rounded alike, one written just after keep_since counts
            if json.loads((out / f"failure-rank{rank}.json").read_text()).get("time", 0) >= round(keep_since, 3):
                return
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: write ours
    record = {"rank": rank, "cause": cause, "step": step, "message": message[:2000], "time": round(time.time(), 3)}
    write_atomic(out / f"failure-rank{rank}.json", json.dumps(record))


def exception_cause(error: BaseException) -> str:
    """A failure's cause for comparison: the exception's type and the first line of its message."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def _records(output: Path) -> list[dict[str, Any]]:
    return read_records(output / METRICS_FILE)


def _append(output: Path, kind: str, **fields: Any) -> None:
    append_record(output / METRICS_FILE, kind, **fields)


def take_failures(output: Path) -> list[dict[str, Any]]:
    """The failure records the ranks left, earliest first (the first failure is the cause), removed."""
    found = []
    for path in output.glob(FAILURE_GLOB):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
        path.unlink(missing_ok=True)
    return sorted(found, key=lambda r: r.get("time", 0))


def decide(output: Path, job: str, status: int, max_restarts: int) -> tuple[bool, str]:
    """Whether the failed step of ``job`` is restarted, and the log line that says so and why."""
    failures = take_failures(output)
    if failures:
        first = failures[0]
        cause, step, rank = first["cause"], first.get("step"), first.get("rank")
        where = f"at step {step}" if step is not None else "before the first step"
        seen = f"{cause} (rank {rank}, {where})"
    else:  # nobody wrote a record: a rank was killed (SIGKILL, the OOM killer) or its node was lost
        cause, step, rank = f"exit status {status}, no rank recorded an error (a rank killed, or its node lost)", None, None
        seen = cause
    earlier = [r for r in _records(output) if r.get("kind") == "restart" and r.get("job") == job]
    fields = dict(job=job, cause=cause, step=step, rank=rank, status=status, max=max_restarts)
    repeated = failures and any(r.get("cause") == cause and r.get("step") == step for r in earlier)
    if repeated:
        why = (f"not restarting job {job}: the same failure recurred at the same step, which a restart cannot fix: "
               f"{seen}. Fix the cause, then resubmit (the run continues from its latest checkpoint)")
    elif len(earlier) >= max_restarts:
        why = (f"not restarting job {job}: its {max_restarts} automatic restarts are used (MAX_RESTARTS); last failure: "
               f"{seen}. Resubmit to continue from the latest checkpoint")
    else:
        line = f"restart {len(earlier) + 1}/{max_restarts} of job {job} after: {seen}; requeueing to resume from the latest checkpoint"
        _append(output, "restart", restart=len(earlier) + 1, **fields)
        return True, line
    _append(output, "restart_refused", **fields)
    return False, why


def note_start(output: Path, job: str, slurm_restarts: int) -> Optional[str]:
    """Count a requeue nobody recorded (SLURM requeued the job after its node failed); the log line, if any."""
    recorded = [r for r in _records(output) if r.get("job") == job and r.get("kind") in ("restart", "preempted")]
    if slurm_restarts <= len(recorded):
        return None
    cause = "requeued by SLURM without the batch script (node failure)"
    _append(output, "restart", job=job, restart=sum(r["kind"] == "restart" for r in recorded) + 1, cause=cause,
            step=None, rank=None, status=None)
    return f"job {job} was {cause}; counted as a restart, resuming from the latest checkpoint"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.restarts",
                                description="Restart decisions for slurm/train.sbatch (see the module docstring).")
    p.add_argument("event", choices=["failed", "preempted", "started"])
    p.add_argument("output", type=Path, help="the run's output directory")
    p.add_argument("--job", required=True, help="SLURM job id (restarts are counted per job, across requeues)")
    p.add_argument("--status", type=int, default=1, help="failed: the training step's exit status")
    p.add_argument("--max", type=int, default=DEFAULT_MAX_RESTARTS, help="failed: restarts allowed per job")
    p.add_argument("--slurm-restarts", type=int, default=0, help="started: SLURM_RESTART_COUNT")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.event == "preempted":  # a requeue asked for by the time limit or preemption: not a failure
        _append(args.output, "preempted", job=args.job)
        return 0
    if args.event == "started":
        line = note_start(args.output, args.job, args.slurm_restarts)
        if line:
            print(line, flush=True)
        return 0
    restart, line = decide(args.output, args.job, args.status, args.max)
    print(line, flush=True)
    return 0 if restart else 1


if __name__ == "__main__":
    sys.exit(main())
