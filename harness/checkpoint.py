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
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from harness import manifest
from harness.distributed import all_gather_objects, all_reduce, many_ranks, rank_and_world
from harness.files import write_atomic


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the previous, intact one."""


def _agree(ok: bool, device) -> bool:
    """True only if every rank says ok (a rank's failure must stop them all together)."""
    return bool(all_reduce(torch.tensor([1.0 if ok else 0.0], device=device), "min").item())


def save(engine, output: str | Path, tag: str, state: dict[str, Any], keep: int = 3,
         rank_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Save under ``tag``, atomically; every rank must call it (each writes its ZeRO partitions).

    The checkpoint is written as ``<tag>.partial`` and published, by a rename and the
    ``latest`` pointer, only once every rank has written its part and its files' sizes and
    checksums are in the manifest (``harness.manifest``, verified on resume): each rank
    checksums the files it wrote, while they are in its page cache, and rank 0 gathers them
    (no rank reads another's files). A crash or a kill during the save leaves the previous
    checkpoint as ``latest``. Then all but the newest ``keep`` checkpoints and the best
    (``state['best_tag']``) are removed, off the save's path (:func:`prune`).
    ``rank_files(folder)``, if given, writes this rank's own further files into the checkpoint
    (the student EMA's partition, ``harness.ema``) before the manifest records them.
    """
    root = checkpoint_dir(output)
    partial = f"{tag}.partial"
    rank, _ = rank_and_world()
    checksums: dict[str, dict] = {}

    def write() -> None:
        engine.save_checkpoint(str(root), tag=partial, client_state={"harness": state}, save_latest=False)
        if rank_files is not None:
            (root / partial).mkdir(parents=True, exist_ok=True)
            rank_files(root / partial)
        checksums.update(manifest.entries(root / partial, _written_by(root / partial, rank), rank))

    error = _attempt(write, root)
    # every rank calls _agree twice: the second also carries the manifest's fate on rank 0
    if _agree(error is None, engine.device):
        gathered = _gather_to_main(checksums)
        if rank == 0:  # every rank's files are complete now; files no rank claimed are read here
            error = _attempt(lambda: manifest.write(root / partial, {k: v for part in gathered for k, v in part.items()}),
                             root)
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
        write_atomic(root / "latest", tag)
        prune(root, keep, state.get("best_tag"))
    if dist.is_initialized():
        dist.barrier()
    return root / tag


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|ema_rank)(\d+)")  # DeepSpeed's partitions and harness.ema's


def _written_by(folder: Path, rank: int) -> list[Path]:
    """The files of ``folder`` this rank wrote, known by their names (a rank's number in them);
    the rest (the model states, the run state) rank 0 writes, and they are left to it."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and (m := _RANK_FILE.search(p.name)) and int(m[1]) == rank)


def _gather_to_main(value: dict) -> list[dict]:
    """Every rank's ``value`` on rank 0 (a collective; others get []): one message per rank, not all to all."""
    if not many_ranks():
        return [value]
    rank, world = rank_and_world()
    out = [None] * world if rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out or []


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
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.endswith((".partial", ".pruning")))


def prune(root: Path, keep: int, best: Optional[str]) -> Optional[threading.Thread]:
    """Remove published checkpoints beyond the newest ``keep``, and partials; the thread deleting them.

    Deleting a checkpoint is many unlinks on a shared filesystem, and the save that calls this
    may be inside the 120 s SLURM's warning leaves: each is renamed to ``<tag>.pruning`` (one
    metadata operation: no longer a checkpoint to resume from) and deleted by a background
    thread. One that an exit cuts short is deleted by the next prune.
    """
    for tag in published(root)[:-keep] if keep > 0 else []:
        if tag != best:
            try:
                os.replace(root / tag, root / f"{tag}.pruning")
            except OSError:
                continue
    doomed = [*root.glob("*.pruning"), *root.glob("*.partial")]
    if not doomed:
        return None
    finish_pruning()  # one deleter at a time: the previous one may still hold some of these
    thread = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed],
                              name="harness-prune", daemon=True)
    thread.start()
    _pruning.append(thread)
    return thread


_pruning: list[threading.Thread] = []


def finish_pruning() -> None:
    """Wait for the background deletions of :func:`prune` (a run that ends leaves only its checkpoints)."""
    while _pruning:
        _pruning.pop().join()


def latest(output: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(output)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    return None


def newest_published(output: str | Path) -> Optional[Path]:
    """The newest published checkpoint whatever ``latest`` says (None if none): a resume's candidate, unverified."""
    root = checkpoint_dir(output)
    tags = published(root) if root.is_dir() else []
    return root / tags[-1] if tags else None


def _note_once(text: str) -> None:
    """Print to stderr from rank 0 only (before the process group exists: every rank decides alike)."""
    if rank_and_world()[0] == 0:
        print(text, file=sys.stderr)


def newest_intact(output: str | Path, note: Callable[[str], None] = _note_once) -> Optional[Path]:
    """The checkpoint to resume from: the newest whose files match its manifest, or None if none was saved.

    Candidates are the one ``latest`` names and the older ones (tags sort chronologically; the
    pointer rules out newer tags a run resumed from further back left behind), newest first.
    Each damaged one is ``note``d with its bad files, and so is the fallback. A checkpoint
    written before manifests existed is accepted (``load`` notes it: a refusal that follows
    stays one line). Raises ``CheckpointError`` if checkpoints exist but none is intact. In a
    process group every rank calls it: each verifies its share of each candidate, and all
    agree on one verdict (:func:`_verify_agreed`).
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
        problems = _verify_agreed(root / tag)
        if problems:
            damaged[tag] = "; ".join(problems)
            continue
        for bad, what in damaged.items():  # said only now: if none is intact, the error below says it all once
            note(f"warning: checkpoint {root / bad} is damaged ({what}); not resuming from it")
        if damaged:
            note(f"resuming from {root / tag}, the newest intact checkpoint")
        return root / tag
    if damaged:
        error = CheckpointError(f"no intact checkpoint under {root} to resume from "
                                f"({'; '.join(f'{bad}: {what}' for bad, what in damaged.items())}). Restore "
                                f"the damaged files from a copy, or start afresh in another directory with "
                                f"--set output=...")
        error.all_ranks = True  # the verdict is agreed: said once
        raise error
    return None


def verified(path: Path) -> Path:
    """``path`` if its files match its manifest (or it has none); a ``CheckpointError`` naming the bad files if not."""
    problems = _verify_agreed(path)
    if problems:
        error = CheckpointError(f"checkpoint {path} is damaged ({'; '.join(problems)}); resume from another one, "
                                f"or with --resume alone from the newest intact one")
        error.all_ranks = True  # the verdict is agreed: said once
        raise error
    return path


def _verify_agreed(path: Path) -> Optional[list[str]]:
    """:func:`manifest.verify` with each rank reading its share, and every rank getting all problems.

    In a process group a collective (every rank calls it, on the same checkpoint); before one
    exists, or in a world of one, this process verifies every file.
    """
    if not many_ranks():
        return manifest.verify(path)
    found = all_gather_objects(manifest.verify(path, *rank_and_world()))
    if any(f is None for f in found):  # no manifest: every rank saw the same
        return None
    return sorted({p for f in found for p in f})


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
    rank, world = rank_and_world()
    check_world_size(path, world)
    if not (path / manifest.NAME).is_file() and rank == 0:
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
