"""Resumable checkpoints: the engine's (partitioned) weights and optimizer, plus the run's state.

One checkpoint per saved epoch under ``<output>/checkpoints/<tag>/``, written by DeepSpeed
(every rank writes its own partitions) with a client-state dict that holds everything else
needed to continue exactly: epoch, optimizer step, the data position within the epoch (see
``data.Position``), whether the teachers adapt, the two-pass bias optimizer, the teachers'
as-loaded accuracy and the best accuracy so far. Checkpoints are taken at epoch ends and, with
``runtime.checkpoint_steps``, every N optimizer steps; a resume replays and skips nothing.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from harness import manifest
from harness.distributed import all_reduce


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the previous, intact one."""


def _agree(ok: bool, device) -> bool:
    """True only if every rank says ok (a rank's failure must stop them all together)."""
    return bool(all_reduce(torch.tensor([1.0 if ok else 0.0], device=device), "min").item())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, output: str | Path, tag: str, state: dict[str, Any], keep: int = 3,
         rank_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Save under ``tag``, atomically; every rank must call it (each writes its ZeRO partitions).

    The checkpoint is written as ``<tag>.partial`` and published, by a rename and the
    ``latest`` pointer, only once every rank has written its part and rank 0 has recorded
    every file's size and checksum in its manifest (``harness.manifest``, verified on resume).
    A crash or a kill during the save leaves the previous checkpoint as ``latest``. Then all
    but the newest ``keep`` checkpoints and the best (``state['best_tag']``) are removed.
    ``rank_files(folder)``, if given, writes this rank's own further files into the checkpoint
    (the student EMA's partition, ``harness.ema``) before the manifest records them.
    """
    root = checkpoint_dir(output)
    partial = f"{tag}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    def write() -> None:
        engine.save_checkpoint(str(root), tag=partial, client_state={"harness": state}, save_latest=False)
        if rank_files is not None:
            (root / partial).mkdir(parents=True, exist_ok=True)
            rank_files(root / partial)

    error = _attempt(write, root)
    # every rank calls _agree twice: the second also carries the manifest's fate on rank 0
    if _agree(error is None, engine.device) and rank == 0:
        error = _attempt(lambda: manifest.write(root / partial), root)  # every rank's files are complete now
    if not _agree(error is None, engine.device):
        previous = latest(output)
        if rank == 0:
            shutil.rmtree(root / partial, ignore_errors=True)
        failure = CheckpointError(f"saving checkpoint {root / tag} failed{f' on rank {rank}: {error}' if error else ' on another rank'}; "
                                  f"the previous checkpoint {previous or '(none)'} is intact. Free space or fix permissions "
                                  f"under {root}, then continue with --resume")
        failure.all_ranks = error is None  # the ranks that met the cause say it; the others once, through rank 0
        raise failure
    if rank == 0:
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(root / partial, root / tag)
        _write_atomic(root / "latest", tag)
        prune(root, keep, state.get("best_tag"))
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def _attempt(action: Callable[[], None], root: Path) -> Optional[str]:
    """Run one step of a save; the cause in words if it failed (disk full, permissions, quota), else None."""
    try:
        action()
    except (OSError, RuntimeError) as e:
        return _explain(e, root)
    return None


def _explain(error: BaseException, root: Path) -> str:
    """The cause of a failed save in words: torch's writer reports a short write cryptically."""
    text = str(error).strip()
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        text = "a checkpoint file could not be written in full (disk full, quota or file size limit)"
    try:
        text += f" [{shutil.disk_usage(root).free / 2**30:.1f} GiB free under {root}]"
    except OSError:
        pass
    return text


def published(root: Path) -> list[str]:
    """The tags of the published checkpoints under ``root``, oldest first (tags sort chronologically)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.endswith(".partial"))


def prune(root: Path, keep: int, best: Optional[str]) -> None:
    """Remove published checkpoints beyond the newest ``keep``, and partials."""
    tags = published(root)
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != best:
            shutil.rmtree(root / tag, ignore_errors=True)
    for partial in root.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def latest(output: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(output)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    return None


def _note_once(text: str) -> None:
    """Print to stderr from rank 0 only (before the process group exists: every rank decides alike)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr)


def newest_intact(output: str | Path, note: Callable[[str], None] = _note_once) -> Optional[Path]:
    """The checkpoint to resume from: the newest whose files match its manifest, or None if none was saved.

    Candidates are the one ``latest`` names and the older ones (tags sort chronologically; the
    pointer rules out newer tags a run resumed from further back left behind), newest first.
    Each damaged one is ``note``d with its bad files, and so is the fallback. A checkpoint
    written before manifests existed is accepted (``load`` notes it: a refusal that follows
    stays one line). Raises ``CheckpointError`` if checkpoints exist but none is intact. Every
    rank calls it on the same files and decides alike.
    """
    root = checkpoint_dir(output)
    if not root.is_dir():
        return None
    tags = published(root)[::-1]
    pointed = latest(output)
    if pointed is not None:
        tags = [t for t in tags if t <= pointed.name]
    damaged: dict[str, str] = {}  # tag -> what is wrong with it
    for tag in tags:
        problems = manifest.verify(root / tag)
        if problems:
            damaged[tag] = "; ".join(problems)
            continue
        for bad, what in damaged.items():  # said only now: if none is intact, the error below says it all once
            note(f"warning: checkpoint {root / bad} is damaged ({what}); not resuming from it")
        if damaged:
            note(f"resuming from {root / tag}, the newest intact checkpoint")
        return root / tag
    if damaged:
        raise CheckpointError(f"no intact checkpoint under {root} to resume from "
                              f"({'; '.join(f'{bad}: {what}' for bad, what in damaged.items())}). Restore "
                              f"the damaged files from a copy, or start afresh in another directory with "
                              f"--set output=...")
    return None


def verified(path: Path) -> Path:
    """``path`` if its files match its manifest (or it has none); a ``CheckpointError`` naming the bad files if not."""
    problems = manifest.verify(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged ({'; '.join(problems)}); resume from another one, "
                              f"or with --resume alone from the newest intact one")
    return path


def check_world_size(path: Path, world_size: int) -> None:
    """ZeRO 1-3 partition the optimizer by rank; such a checkpoint resumes only at its world size."""
    partitions = len(list(path.glob("*zero_pp_rank_*_optim_states.pt")))
    if partitions and partitions != world_size:
        raise CheckpointError(f"checkpoint {path} holds optimizer state partitioned over {partitions} ranks (ZeRO); "
                              f"resume it with {partitions} processes. Checkpoints written at ZeRO stage 0 "
                              f"resume at any world size")


def load(engine, path: str | Path, bias_opt: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Restore engine weights and optimizer from ``path``; return the run state saved with them."""
    path = Path(path)
    check_world_size(path, dist.get_world_size() if dist.is_initialized() else 1)
    if not (path / manifest.NAME).is_file() and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"note: checkpoint {path} has no {manifest.NAME} (written by an older version): resuming from it "
              f"unverified", file=sys.stderr)
    loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
    if loaded is None:
        raise FileNotFoundError(f"could not load checkpoint {path}: incomplete or written by another setup")
    state = client["harness"]
    if bias_opt is not None and state.get("bias_optimizer"):
        bias_opt.load_state_dict(state["bias_optimizer"])
    return state
