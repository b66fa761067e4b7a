"""``metrics.jsonl``: a run's record of what happened, one JSON object per line, appended.

Every record has a ``kind`` (``train``, ``eval``, ``resume``, ``teacher_guard``, ``restart``, ...)
and a ``time`` (Unix seconds, to the millisecond). Two kinds of process write it: the training
run's main process (through :class:`harness.metrics.MetricsLog`, which also feeds the trackers)
and the batch script's restart decisions (:mod:`harness.restarts`), which run outside training.
Both append through :func:`append_record`, so the file has one format; readers use
:func:`read_records`. This module imports nothing heavy: the restart decisions start fast.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def append_record(path: Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one record of ``kind`` to the file at ``path``; returns it (with its ``time``)."""
    record = {"kind": kind, "time": round(time.time(), 3), **fields}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record in the file at ``path``, in order; none if it does not exist.

    A line a killed writer cut short (the last one) is left out rather than refused: the
    records before it are the run's history, and a restart or a plot must still read them.
    """
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
