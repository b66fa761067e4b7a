"""The process group: one function that joins it from any launcher, and the collectives the harness uses.

Accelerate launches the processes (``accelerate launch``, torchrun, or SLURM through them) and
creates the process group: NCCL on GPU nodes, gloo on CPU-only hosts. A plain ``python
harness/run.py`` is a world of one. Everything here is a no-op in a world of one.

Nothing here imports DeepSpeed: its communication layer is joined by ``harness.zero`` when a
ZeRO 1-3 engine is built, over the process group made here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    bf16: bool
    zero_stage: int
    collective_timeout: Optional[float] = None  # seconds; None: torch's default (see init_runtime)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: the one way the harness asks.

    From the process group once it exists; before that (a preflight, a note printed before the
    group is joined) from the launcher's environment: ``RANK``/``WORLD_SIZE`` (accelerate,
    torchrun), else ``SLURM_PROCID``/``SLURM_NTASKS``; else a world of one, rank 0.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ or world in os.environ:
            return int(os.environ.get(rank, "0")), int(os.environ.get(world, "1"))
    return 0, 1


def many_ranks() -> bool:
    """Whether this process is in a process group of more than one rank: collectives have peers."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user of this harness (DeepSpeed's: ``harness.zero``)."""
    # "No CUDA runtime is found" on CPU hosts, where that is expected
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


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
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=state.device, rank=state.process_index, world_size=state.num_processes,
                   local_rank=state.local_process_index, bf16=bf16, zero_stage=zero_stage,
                   collective_timeout=collective_timeout)


FAILED_EXIT_WITHIN = 15.0  # seconds a failing rank may spend tearing down its process group


def _exit_now() -> None:
    sys.stderr.flush()
    os._exit(1)


def shutdown(wait_for_peers: bool = True) -> None:
    """Destroy the process group: exiting without it can abort with 'terminate called ...'.

    ``wait_for_peers=False`` on a failure: no barrier, since the peers may be waiting in a
    collective this rank will never join, and a barrier would hold both until a timeout. NCCL's
    teardown can itself wait for peers (ncclCommAbort with a collective in flight: NVIDIA/nccl
    issues 1013, 1777), so a failing rank that has not exited within ``FAILED_EXIT_WITHIN``
    seconds exits anyway: its error is recorded and printed by then.
    """
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        else:
            deadline = threading.Timer(FAILED_EXIT_WITHIN, _exit_now)
            deadline.daemon = True
            deadline.start()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already failing: the first error is the one to report
            if wait_for_peers:
                raise


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'max' or 'min') across ranks; a no-op in a world of one."""
    if many_ranks():
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return values


def all_gather_objects(value) -> list:
    """Every rank's ``value``, in rank order (a collective; for checkpoint-time state only)."""
    if not many_ranks():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Each rank updates its statistics from its own batches; as with DDP's default, rank 0's are
    the model's. Called before evaluation and export, so every rank evaluates, and the file
    holds, the same model, and a resumed run (which restores rank 0's) ends exactly the same.
    """
    if many_ranks():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)
