"""Batches handed from loader workers to the training process in reused shared memory.

A DataLoader worker's results reach the training process through shared memory, and torch
makes a fresh segment for every tensor it sends: ``posix_fallocate`` of a new tmpfs file, so
the kernel allocates and zeroes each page, then each page faults in on first write. For a
32x3x224x224 uint8 batch that is 4-8 ms on this project's 2-core VM, 5-10% of a worker's time.

Here a worker keeps its batch buffers and reuses one only once the training process has
released every tensor that views it. The tensor the training process receives is built by
:func:`_rebuild` over the buffer from a numpy view whose end (when the tensor's storage is
freed, whatever views or copies were made of it) clears the buffer's in-use byte. A buffer in
use is never written; when none is free a new one is made (pooled up to ``MAX_BUFFERS``).
"""
from __future__ import annotations

import math
import os
import weakref

import torch

HEADER = 64  # byte 0: in use; the rest pads the batch to an aligned start
MAX_BUFFERS = 16  # per worker; beyond this (a consumer holding many batches) buffers are not kept

_pool: list[tuple[torch.Tensor, object]] = []  # (shared uint8 buffer, numpy view of it) of this process
_pool_pid: int | None = None


class PooledBatch:
    """A batch tensor (``.tensor``, to fill in the worker) in a reused shared buffer.

    Pickled to the training process (the DataLoader does this with a worker's results) it
    arrives as a plain tensor of the same shape and dtype, over the same memory.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        self.buffer = _take(HEADER + nbytes)
        self.tensor = self.buffer[HEADER:].view(dtype).view(shape)

    def __reduce__(self):
        return _rebuild, (self.buffer, self.tensor.dtype, tuple(self.tensor.shape))


def _take(size: int) -> torch.Tensor:
    """A free shared buffer of ``size`` bytes from this process's pool (or a new one), marked in use."""
    global _pool, _pool_pid
    if _pool_pid != os.getpid():  # a forked child does not share its parent's buffers
        _pool, _pool_pid = [], os.getpid()
    for buffer, flags in _pool:
        if buffer.numel() == size and flags[0] == 0:
            flags[0] = 1
            return buffer
    buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
    flags = buffer.numpy()
    flags[0] = 1
    if len(_pool) < MAX_BUFFERS:
        _pool.append((buffer, flags))
    return buffer


def _rebuild(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """In the receiving process: the batch over ``buffer``, releasing it when its storage is freed."""
    raw = buffer.numpy()
    body = raw[HEADER:]  # the storage of the tensor below holds this view, and only it
    release = weakref.finalize(body, raw.__setitem__, 0, 0)
    release.atexit = False
    return torch.from_numpy(body).view(dtype).view(shape)
