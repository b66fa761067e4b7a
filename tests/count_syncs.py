"""harness/run.py with every host-synchronising call counted by where it was made.

Launched in place of harness/run.py (``accelerate launch tests/count_syncs.py RECIPE ...``) with
``COUNT_SYNCS_OUT`` naming a folder: each rank writes ``rank<r>.json`` there, the calls made
inside the training loop (``StepLoop.train_epoch`` in harness/step_loop.py) by call site, split
into those of a logging or check step (``StepLoop.log_window``, the periodic non-finite and
stop-signal checks, checkpoints, evaluation) and the rest, which a step between logging steps
should never make.

Counted: ``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``,
``numpy``, ``nonzero`` of a tensor on the training device (see ``_on_device``); ``torch.tensor`` / ``torch.as_tensor`` given a ``device`` (host values
copied to it); ``Tensor.to`` from the CPU to another device; ``torch.cuda.synchronize``; and,
where CUDA exists, every synchronisation ``torch.cuda.set_sync_debug_mode`` reports. Beside
them (``other``, outside logging and check steps): ``torch.manual_seed`` and the
``torch.distributed.all_reduce`` calls made from Python (DDP's and DeepSpeed's own reductions
run in C++ and are not among them).
"""
import collections
import json
import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the parts of a step that read the device on purpose: logging, the periodic checks, saves
EXEMPT = {"log_window", "check_nonfinite", "agreed", "save", "evaluate_split", "evaluate", "all_gather_objects"}
counts = {"step": collections.Counter(), "exempt": collections.Counter(), "other": collections.Counter()}
_busy = [False]


def _record(kind: str, into: str = "") -> None:
    frame, site, in_loop, exempt = sys._getframe(2), None, False, False
    while frame is not None:
        code = frame.f_code
        if site is None and "/torch/" not in code.co_filename and code.co_filename != __file__:
            site = f"{os.path.relpath(code.co_filename, ROOT)}:{frame.f_lineno} {code.co_name}"
        exempt = exempt or code.co_name in EXEMPT
        if code.co_name == "train_epoch" and code.co_filename.endswith(os.path.join("harness", "step_loop.py")):
            in_loop = True
            break
        frame = frame.f_back
    if in_loop and not (into and exempt):
        counts[into or ("exempt" if exempt else "step")][f"{kind} @ {site}"] += 1


def _counted(kind: str, fn, when=None, into: str = ""):
    def wrapper(*args, **kwargs):
        if not _busy[0] and (when is None or when(*args, **kwargs)):
            _busy[0] = True  # calls the counted call makes itself are part of it
            try:
                _record(kind, into)
            finally:
                _busy[0] = False
        was, _busy[0] = _busy[0], True
        try:
            return fn(*args, **kwargs)
        finally:
            _busy[0] = was
    return wrapper


def _to_device(self, *args, **kwargs) -> bool:
    if self.device.type != "cpu":
        return False
    target = kwargs.get("device", args[0] if args else None)
    try:
        return isinstance(target, (str, torch.device)) and torch.device(target).type != "cpu"
    except (RuntimeError, TypeError):
        return False


def _on_device(self, *args, **kwargs) -> bool:
    """Whether reading ``self`` waits for the training device.

    With CUDA: a tensor on a GPU. On a CPU-only host the device is the host itself, so every
    tensor counts except the loader's own: the shared-memory batches the workers hand over and
    what torch's DataLoader does with host tensors, which never were on the device.
    """
    if torch.cuda.is_available():
        return self.device.type != "cpu"
    if self.is_shared():
        return False
    frame = sys._getframe(2)
    while frame is not None:
        if os.path.join("torch", "utils", "data") in frame.f_code.co_filename:
            return False
        frame = frame.f_back
    return True


def install() -> None:
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero"):
        setattr(torch.Tensor, name, _counted(f"Tensor.{name}", getattr(torch.Tensor, name), _on_device))
    torch.Tensor.to = _counted("Tensor.to (host to device)", torch.Tensor.to, _to_device)
    for name in ("tensor", "as_tensor"):
        setattr(torch, name, _counted(f"torch.{name}(device=...)", getattr(torch, name),
                                      lambda *a, **k: k.get("device") is not None))
    torch.cuda.synchronize = _counted("torch.cuda.synchronize", torch.cuda.synchronize)
    # not host synchronisations, reported beside them ("other"): reseeding, and the harness's own
    # collectives (each one a point where every rank waits for the slowest)
    torch.manual_seed = _counted("torch.manual_seed", torch.manual_seed, into="other")
    import torch.distributed as dist

    dist.all_reduce = _counted("dist.all_reduce", dist.all_reduce, into="other")
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if "synchroniz" in str(message).lower():
                _record(f"cuda sync ({str(message)[:60]})")
            else:
                shown(message, category, *args, **kwargs)
        warnings.showwarning = show
        warnings.filterwarnings("always", message=".*synchroniz.*")


def main() -> int:
    install()
    sys.path.insert(0, str(ROOT))
    from harness.run import main as run

    try:
        return run(sys.argv[1:])
    finally:
        out = Path(os.environ["COUNT_SYNCS_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        (out / f"rank{rank}.json").write_text(json.dumps({k: dict(v) for k, v in counts.items()}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
