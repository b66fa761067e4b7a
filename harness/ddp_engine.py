"""ZeRO-0 without DeepSpeed: the module on its device, DDP across ranks, DeepSpeed's interface."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from harness.distributed import Runtime
from harness.files import write_atomic


def channels_last_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: image batches in channels_last (NHWC), the layout cuDNN is fastest in."""
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


class DDPEngine:
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
            module.register_forward_pre_hook(channels_last_input)
        self.ddp = None
        self._ddp_for = None  # the teachers' frozen/adapting state the DDP wrapper was built for
        self._trainable = [p for g in optimizer.param_groups for p in g["params"]]

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-step (before ``step``) ends an optimizer step."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def _wrap(self, args: tuple, kwargs: dict) -> None:
        """(Re)build DDP over exactly the parameters this step's loss reaches.

        DDP's ``find_unused_parameters`` walks the autograd graph after every forward and, when it
        finds a parameter unused, copies its map to the host each backward; without it an unused
        parameter breaks the reduction. Neither is needed: frozen teachers, the student's own
        head under SimKD/ATSC (frozen by the method) and anything else no loss term reaches are
        left out of DDP altogether, found by walking the graph of one small forward. Which
        parameters a step reaches changes only when the teachers start adapting, so the wrapper
        is rebuilt then (the weights are the same on every rank; ``init_sync=False`` keeps each
        rank's own BatchNorm statistics, as ``forward_sync_buffers=False`` does at every forward).
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        reached = self._reached(args, kwargs)
        ignored = [name for name, p in self.module.named_parameters() if id(p) not in reached]
        for p in self.module.parameters():
            p._ddp_ignored = False  # DDP's marker is sticky: a teacher ignored while frozen is reduced once adapting
        self.ddp = None  # the old wrapper's reducer (and its gradient hooks) goes before the new one is made
        DDP._set_params_and_buffers_to_ignore_for_model(self.module, ignored)
        self.ddp = DDP(self.module, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None,
                       forward_sync_buffers=False, init_sync=False, find_unused_parameters=False,
                       gradient_as_bucket_view=True)

    def _reached(self, args: tuple, kwargs: dict) -> set[int]:
        """ids of the trainable parameters a forward on (two samples of) this batch reaches.

        Run in train mode like the step, with the BatchNorm statistics and the random state put
        back afterwards, so the step that follows is the one it would have been.
        """
        small = [a[:2] if isinstance(a, torch.Tensor) and a.dim() else a for a in args]
        buffers = list(self.module.buffers())
        saved = [b.detach().clone() for b in buffers]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.rt.autocast():
            out = self.module(*small, **kwargs)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        reached, seen, todo = set(), set(), [loss.grad_fn] if loss.grad_fn is not None else []
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf the gradient reaches
            if variable is not None:
                reached.add(id(variable))
            todo.extend(next_fn for next_fn, _ in fn.next_functions)
        del out, loss
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        return reached

    def __call__(self, *args, **kwargs):
        if self.rt.world_size > 1:
            frozen = tuple(bool(g.get("frozen")) for g in self.optimizer.param_groups)
            if frozen != self._ddp_for:
                self._wrap(args, kwargs)
                self._ddp_for = frozen
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
                 "mp_world_size": 1, "engine": "harness.LocalEngine",  # this class's name when the format was set: kept
                 **(client_state or {})}
        torch.save(state, os.path.join(path, self.CHECKPOINT_FILE))
        if save_latest:  # DeepSpeed's pointer file, replaced whole (harness.checkpoint publishes its own)
            write_atomic(os.path.join(save_dir, "latest"), str(tag))

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
