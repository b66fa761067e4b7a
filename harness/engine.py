"""Processes, the DeepSpeed engine, the training step and evaluation.

Accelerate launches the processes (``accelerate launch``, torchrun, or SLURM through them) and
creates the process group: NCCL on GPU nodes, gloo on CPU-only hosts. The student, its
projectors and any adapted teachers are then one DeepSpeed engine at the recipe's ZeRO stage.
The engine is built with ``deepspeed.initialize`` rather than through Accelerate's DeepSpeed
plugin, which imports ``transformers`` unconditionally and would own the optimizer's groups.

Mixed precision is DeepSpeed's ``torch_autocast`` (bf16 compute, fp32 weights, BatchNorm
statistics and losses): its ``bf16`` mode casts whole modules, BatchNorm included, and measured
0.6-0.7x the speed of autocast on an H100 (``../shared/anchors/README.md``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    bf16: bool
    zero_stage: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def _quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user of this harness."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.setLevel(logging.WARNING)
    # Our optimizer is a torch SGD/AdamW with the anchor term: "untested" by DeepSpeed by design.
    ds_log.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    # "No CUDA runtime is found" on CPU hosts, where that is expected
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # DeepSpeed still calls collectives that torch has renamed; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_runtime(precision: str, zero_stage: int, threads: Optional[int] = None) -> Runtime:
    """Join (or, run directly with python, create) the process group and pick the device."""
    _quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    if "WORLD_SIZE" not in os.environ:  # plain `python harness/run.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    # On a CPU-only host Accelerate counts one process unless it is told the backend.
    state = PartialState(backend="nccl" if cuda else "gloo")
    import deepspeed

    # On CPU hosts DeepSpeed print()s "deepspeed_shm_comm_op built successfully" on every start.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=state.device, rank=state.process_index, world_size=state.num_processes,
                   local_rank=state.local_process_index, bf16=bf16, zero_stage=zero_stage)


def shutdown() -> None:
    """Destroy the process group: exiting without it can abort with 'terminate called ...'."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, micro_batch: int,
                 grad_accum: int, grad_clip: Optional[float]):
    """One DeepSpeed engine over the distiller: ZeRO stage from the recipe, autocast for bf16."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": rt.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip or 0.0,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if rt.bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine (ZeRO wraps it; stage 0 uses it as is)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'max' or 'min') across ranks; a no-op in a world of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return values


def all_gather_objects(value) -> list:
    """Every rank's ``value``, in rank order (a collective; for checkpoint-time state only)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def two_pass_bias_step(distiller, bias_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       rt: Runtime) -> torch.Tensor:
    """The authors' order: after the main step, a second teacher forward steps only the biases."""
    params = distiller.bias_parameters()
    with rt.autocast():
        loss = distiller.bias_loss(x, y)
    grads = torch.autograd.grad(loss, params)
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads])) / rt.world_size
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    bias_opt.step()
    bias_opt.zero_grad(set_to_none=True)
    return loss.detach()


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Each rank updates its statistics from its own batches; as with DDP's default, rank 0's are
    the model's. Called before evaluation and export, so every rank evaluates, and the file
    holds, the same model, and a resumed run (which restores rank 0's) ends exactly the same.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


class _Lockstep:
    """Under ZeRO-3 every forward is a collective: ranks with no batch left run a dummy one."""

    def __init__(self, loader: Iterable, rt: Runtime, image_size: int):
        self.loader, self.rt, self.image_size = loader, rt, image_size

    def __iter__(self):
        if self.rt.zero_stage != 3:  # forwards are local: no agreement (and no host sync) per batch
            for batch in self.loader:
                yield batch, True
            return
        it = iter(self.loader)
        dummy = None
        while True:
            batch = next(it, None)
            flag = all_reduce(torch.tensor([0.0 if batch is None else 1.0], device=self.rt.device))
            if flag.item() == 0:
                return
            if batch is None:
                if dummy is None:
                    dummy = (torch.zeros(1, 3, self.image_size, self.image_size, device=self.rt.device),
                             torch.zeros(1, dtype=torch.long, device=self.rt.device))
                yield dummy, False
            else:
                yield batch, True


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader: Iterable, rt: Runtime, image_size: int) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 of each model over the whole validation set, exact for any world size."""
    for m in models.values():
        m.eval()
    counts = torch.zeros(len(models), 2, dtype=torch.float64, device=rt.device)
    seen = torch.zeros(1, dtype=torch.float64, device=rt.device)
    for (x, y), real in _Lockstep(loader, rt, image_size):
        for i, model in enumerate(models.values()):
            with rt.autocast():
                logits = model(x)
            if real:
                top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
                hit = top5.eq(y[:, None])
                counts[i, 0] += hit[:, 0].sum()
                counts[i, 1] += hit.any(dim=-1).sum()
        if real:
            seen += y.numel()
    all_reduce(counts)
    all_reduce(seen)
    n = max(seen.item(), 1.0)
    return {name: {"top1": counts[i, 0].item() / n, "top5": counts[i, 1].item() / n, "samples": int(seen.item())}
            for i, name in enumerate(models)}
