"""What a run reports: ``metrics.jsonl`` records, a live progress line, and the final table."""
from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

import torch

from harness.records import append_record

if TYPE_CHECKING:
    from harness.tracking import Tracking


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepSums:
    """Loss terms summed on the device over a logging window; skipped optimizer steps left out.

    Each micro-step's terms go in as one stacked vector (one stack, one ``nan_to_num``, one add,
    whatever their number); at an optimizer step's end :meth:`close_step` folds them into the
    window weighted by whether the step was taken (the ranks' agreed flag), so nothing is read
    from the device before :meth:`means`, at a logging step. A term present in only some
    micro-steps (the two-pass bias step runs at the last) is averaged over those it was in.
    """

    def __init__(self):
        self.pending: dict[tuple[str, ...], tuple[torch.Tensor, int]] = {}
        self.window: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        names = tuple(terms)
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).nan_to_num_(0.0, 0.0, 0.0)
        total, count = self.pending.get(names, (None, 0))
        self.pending[names] = (values if total is None else total + values, count + 1)

    def close_step(self, skipped: torch.Tensor) -> None:
        """End of an optimizer step: ``skipped`` (1.0 if the ranks skipped it) weighs its micro-steps."""
        kept = 1.0 - skipped
        for names, (total, count) in self.pending.items():
            window = self.window.get(names)
            weighted, n = total * kept, kept * count
            self.window[names] = (weighted, n) if window is None else (window[0] + weighted, window[1] + n)
        self.pending = {}

    def means(self) -> dict[str, float]:
        """Each term's mean over the window's kept micro-steps (NaN: none kept), read in one transfer."""
        if not self.window:
            return {}
        keys = list(self.window)
        flat = torch.cat([torch.cat([t, n.reshape(1)]) for t, n in self.window.values()]).tolist()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        offset = 0
        for names in keys:
            row = flat[offset:offset + len(names) + 1]
            offset += len(names) + 1
            for name, value in zip(names, row):
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0.0) + row[-1]
        self.window = {}
        return {k: v / counts[k] if counts[k] else math.nan for k, v in sums.items()}


class MetricsLog:
    """Appends each record to ``metrics.jsonl`` (harness/records.py) and sends it to ``tracking``;
    only the main process writes.

    The tracking opens at the first record: a ``resume`` record (the first a resumed run writes)
    restarts it after the checkpoint's step, anything else from step 0 (see harness/tracking.py).
    """

    def __init__(self, path: Path, enabled: bool, tracking: Optional["Tracking"] = None):
        self.path, self.enabled, self.tracking = path, enabled, tracking if enabled else None
        self._opened = False

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        append_record(self.path, kind, **fields)
        if self.tracking is not None:
            if not self._opened:
                self.tracking.open(fields["step"] + 1 if kind == "resume" else 0)
                self._opened = True
            self.tracking.log(kind, fields)

    def close(self) -> None:
        """Flush the tracking (it also closes itself at exit)."""
        if self.tracking is not None:
            self.tracking.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Step, epoch, loss, images/s and ETA on the main process.

    On a terminal the line is redrawn in place; into a file (a SLURM log) it prints one plain
    line per update, at most every ``min_interval`` seconds, so logs stay readable.
    """

    def __init__(self, total_steps: int, enabled: bool, stream: TextIO = sys.stderr, min_interval: float = 10.0):
        self.total, self.enabled, self.stream = total_steps, enabled, stream
        self.tty = enabled and stream.isatty()
        self.min_interval = 0.0 if self.tty else min_interval
        self.last_print = 0.0

    def update(self, step: int, epoch: int, epochs: int, loss: float, images_per_s: float, eta_s: float,
               force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last_print < self.min_interval:
            return
        self.last_print = now
        pct = 100.0 * step / max(self.total, 1)
        text = (f"epoch {epoch + 1}/{epochs}  step {step}/{self.total} ({pct:4.1f}%)  loss {loss:.4f}  "
                f"{images_per_s:,.0f} img/s  eta {_duration(eta_s)}")
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()


def summary_table(summary: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    rows = [("model", "top-1", "top-5")]
    for name, m in summary.get("teachers", {}).items():
        rows.append((f"teacher {name} (adapted)", f"{m['top1']:.4f}", f"{m['top5']:.4f}"))
        if "loaded_top1" in m:
            rows.append((f"teacher {name} (as loaded)", f"{m['loaded_top1']:.4f}", ""))
    rows.append((f"student ({summary['student_path']})", f"{summary['student']['top1']:.4f}",
                 f"{summary['student']['top5']:.4f}"))
    if "student_ema" in summary:
        ema = summary["student_ema"]
        rows.append(("student EMA", f"{ema['top1']:.4f}", f"{ema['top5']:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>7}  {c:>7}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{'train images/s':<{width}}  {summary['images_per_s']:>7,.0f}")
    lines.append(f"{'wall time':<{width}}  {_duration(summary['wall_time_s']):>7}")
    return "\n".join(lines)
