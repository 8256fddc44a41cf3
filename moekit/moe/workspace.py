"""Scratch buffers that the routed experts reuse from one call to the next on CPU.

Why moekit keeps its own: torch's CPU allocator passes large requests to the C library's `malloc`. glibc gives
the freed memory at the top of its heap back to the kernel, so the next call faults in and zeroes every page
again. The benchmark's MoE block at T=2048 took 22 K page faults (86 MB zeroed) per bf16 forward that way, a
quarter of its time; transformers' block, which allocates per expert, took none (docs/benchmarks.md). CUDA's
caching allocator already keeps freed blocks, so other devices get a fresh tensor, as before.

A buffer's contents live until the next request for the same name on the same thread: callers use them within
one call and never return them. At most `LIMIT` bytes are kept per thread; a larger request gets a fresh tensor.
"""

from __future__ import annotations

import math
import threading

import torch

LIMIT = 256 << 20  # bytes kept per thread: T=8192 tokens of a 1.5B-class layer's scratch in bf16

_local = threading.local()


def _buffers() -> dict[tuple[str, torch.dtype], torch.Tensor]:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers


def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised `shape` tensor on `like`'s device (in `dtype`, default `like`'s), reused on CPU by the next
    request for `name` from this thread."""
    dtype = like.dtype if dtype is None else dtype
    if like.device.type != "cpu":
        return like.new_empty(shape, dtype=dtype)
    numel = math.prod(shape)
    buffers = _buffers()
    key = (name, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        kept = sum(b.numel() * b.element_size() for k, b in buffers.items() if k != key)
        if kept + numel * dtype.itemsize > LIMIT:
            return like.new_empty(shape, dtype=dtype)
        buffers.pop(key, None)  # freed before the larger one is taken
        buffer = buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def kept_bytes() -> int:
    """Bytes this thread's workspace holds."""
    return sum(b.numel() * b.element_size() for b in _buffers().values())


def release() -> None:
    """Drop this thread's buffers (after a long prompt, say); the next call allocates afresh."""
    _buffers().clear()
