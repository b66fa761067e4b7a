"""Resumable checkpoints: the engine's (partitioned) weights and optimizer, plus the run's state.

One checkpoint per saved epoch under ``<output>/checkpoints/<tag>/``, written by DeepSpeed
(every rank writes its own partitions) with a client-state dict that holds everything else
needed to continue exactly: epoch, optimizer step, the data position within the epoch (see
``data.Position``), whether the teachers adapt, the two-pass bias optimizer, the teachers'
as-loaded accuracy and the best accuracy so far. Checkpoints are taken at epoch ends and, with
``runtime.checkpoint_steps``, every N optimizer steps; a resume replays and skips nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def save(engine, output: str | Path, tag: str, state: dict[str, Any]) -> Path:
    """Save under ``tag``; every rank must call it (each writes its ZeRO partitions)."""
    engine.save_checkpoint(str(checkpoint_dir(output)), tag=tag, client_state={"harness": state})
    return checkpoint_dir(output) / tag


def latest(output: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(output)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    return None


def load(engine, path: str | Path, bias_opt: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Restore engine weights and optimizer from ``path``; return the run state saved with them."""
    path = Path(path)
    loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
    if loaded is None:
        raise FileNotFoundError(f"could not load checkpoint {path}: incomplete or written by another setup")
    state = client["harness"]
    if bias_opt is not None and state.get("bias_optimizer"):
        bias_opt.load_state_dict(state["bias_optimizer"])
    return state
