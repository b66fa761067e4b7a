"""Processes, the training engine, the training step and evaluation.

Accelerate launches the processes (``accelerate launch``, torchrun, or SLURM through them) and
creates the process group: NCCL on GPU nodes, gloo on CPU-only hosts. The student, its
projectors and any adapted teachers are then one engine: at ZeRO-0 ``LocalEngine`` (the module,
DDP across ranks: nothing is partitioned, so nothing of DeepSpeed's is needed), at stages 1-3
DeepSpeed's, built with ``deepspeed.initialize`` rather than through Accelerate's DeepSpeed
plugin, which imports ``transformers`` unconditionally and would own the optimizer's groups.

Mixed precision is DeepSpeed's ``torch_autocast`` (bf16 compute, fp32 weights, BatchNorm
statistics and losses): its ``bf16`` mode casts whole modules, BatchNorm included, and measured
0.6-0.7x the speed of autocast on an H100 (``../shared/anchors/README.md``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from harness import zero

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


def init_runtime(precision: str, zero_stage: int, threads: Optional[int] = None,
                 collective_timeout: Optional[float] = None) -> Runtime:
    """Join (or, run directly with python, create) the process group and pick the device.

    ``collective_timeout`` (seconds; None: torch's default, 30 min for gloo) bounds how long a
    collective waits for a peer that died or stopped before it fails instead of hanging.
    """
    _quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    if "WORLD_SIZE" not in os.environ:  # plain `python harness/run.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    # On a CPU-only host Accelerate counts one process unless it is told the backend.
    timeout = {"timeout": timedelta(seconds=collective_timeout)} if collective_timeout else {}
    state = PartialState(backend="nccl" if cuda else "gloo", **timeout)
    zero.init_distributed("nccl" if cuda else "gloo", **timeout)  # compiles nothing (see there)
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
                 grad_accum: int, grad_clip: Optional[float], compile: bool = False):
    """The training engine over the distiller: ``LocalEngine`` at ZeRO-0, DeepSpeed at stages 1-3.

    Stage 0 partitions nothing, so it needs none of DeepSpeed's machinery: a plain module (DDP
    across ranks) steps as fast as a hand-written loop and writes checkpoints in DeepSpeed's
    ZeRO-0 layout. Stages 1-3 are DeepSpeed's engine with a configuration that adds no work
    per step that the recipe did not ask for (see ``harness.zero``). ``compile`` applies
    ``torch.compile`` to the distiller's forward in place (parameter names are unchanged).
    """
    if compile:
        model.compile()
    if rt.zero_stage == 0:
        return LocalEngine(model, optimizer, rt, grad_accum, grad_clip)
    if rt.device.type == "cuda":
        # DeepSpeed flattens parameters into contiguous buffers (channels_last weights are
        # refused at initialize); channels_last input still gets cuDNN's NHWC kernels.
        model.register_forward_pre_hook(_channels_last_input)
    return zero.initialize(model, optimizer, rt, micro_batch, grad_accum, grad_clip)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: image batches in channels_last (NHWC), the layout cuDNN is fastest in."""
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


class LocalEngine:
    """ZeRO-0 without DeepSpeed: the step a hand-written loop takes, with DeepSpeed's interface.

    The module is on the device (channels_last weights and input on GPUs), wrapped in
    DistributedDataParallel across ranks (gradients all-reduced in buckets while the backward
    runs). Forward runs under autocast in bf16; ``backward`` divides by the accumulation steps;
    ``step`` clips (only if asked), steps the optimizer and drops the gradients at each
    accumulation boundary. Nothing here reads a value from the device, so the host runs ahead.

    Checkpoints use DeepSpeed's ZeRO-0 layout (``<dir>/<tag>/mp_rank_00_model_states.pt`` with
    ``module``, ``optimizer`` and the client state), written by rank 0, so the checkpoint and
    export code reads them as it reads DeepSpeed's, and older stage-0 checkpoints still load.
    """

    CHECKPOINT_FILE = "mp_rank_00_model_states.pt"
    _OWN_KEYS = ("module", "optimizer", "global_steps", "dp_world_size", "mp_world_size", "skipped_steps",
                 "engine")

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, grad_accum: int,
                 grad_clip: Optional[float]):
        self.module, self.optimizer, self.rt = module, optimizer, rt
        self.device = rt.device
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.micro_steps = self.global_steps = 0
        module.to(rt.device)
        if rt.device.type == "cuda":
            module.to(memory_format=torch.channels_last)
            module.register_forward_pre_hook(_channels_last_input)
        self.ddp = None
        if rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # find_unused_parameters: a frozen teacher (and e.g. the student's unused own head)
            # gets no gradient; DDP then leaves those gradients None, so the optimizer skips them.
            # forward_sync_buffers off: BatchNorm statistics follow rank 0's only before evaluation
            # (broadcast_buffers in this module), not at every forward. (At construction DDP
            # still copies rank 0's, which every rank already holds: same seed, same checkpoint.)
            self.ddp = DDP(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                           forward_sync_buffers=False, find_unused_parameters=True, gradient_as_bucket_view=True)
        self._trainable = [p for g in optimizer.param_groups for p in g["params"]]

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-step (before ``step``) ends an optimizer step."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def __call__(self, *args, **kwargs):
        if self.ddp is not None:
            # gradients are all-reduced only in the boundary micro-step's backward (DDP's no_sync)
            self.ddp.require_backward_grad_sync = self.is_gradient_accumulation_boundary()
        with self.rt.autocast():
            return (self.ddp or self.module)(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        scaled = loss / self.grad_accum if self.grad_accum > 1 else loss
        scaled.backward()
        return scaled

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self._trainable, self.grad_clip, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    # --- checkpoints, in DeepSpeed's ZeRO-0 layout

    def save_checkpoint(self, save_dir: str, tag: str, client_state: Optional[dict] = None,
                        save_latest: bool = True) -> None:
        """Rank 0 writes ``<save_dir>/<tag>/mp_rank_00_model_states.pt``: weights, optimizer, client state."""
        if self.rt.rank != 0:
            return
        path = os.path.join(save_dir, str(tag))
        os.makedirs(path, exist_ok=True)
        # skipped_steps is DeepSpeed's count of fp16 overflow skips, which bf16/fp32 never take;
        # steps skipped for a NaN/inf loss are the harness's own count (guard.py, run state)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "global_steps": self.global_steps, "skipped_steps": 0, "dp_world_size": self.rt.world_size,
                 "mp_world_size": 1, "engine": "harness.LocalEngine", **(client_state or {})}
        torch.save(state, os.path.join(path, self.CHECKPOINT_FILE))
        if save_latest:  # DeepSpeed's pointer file, replaced whole (harness.checkpoint publishes its own)
            pointer = os.path.join(save_dir, "latest")
            with open(pointer + ".tmp", "w") as f:
                f.write(str(tag))
            os.replace(pointer + ".tmp", pointer)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = False) -> tuple[Optional[str], Optional[dict]]:
        """Restore weights (and optimizer); ``(None, None)`` if the tag holds no stage-0 checkpoint."""
        path = os.path.join(load_dir, str(tag), self.CHECKPOINT_FILE)
        if not os.path.isfile(path):
            return None, None
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["module"], strict=True)
        if load_optimizer_states and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.global_steps = int(state.get("global_steps") or 0)
        self.micro_steps = self.global_steps * self.grad_accum
        deepspeed_own = ("buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
                         "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
                         "sparse_tensor_module_names", "global_samples", "ds_config", "ds_version")
        client = {k: v for k, v in state.items() if k not in self._OWN_KEYS and k not in deepspeed_own}
        return path, client


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine (ZeRO wraps it; ``LocalEngine`` holds it as is)."""
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
