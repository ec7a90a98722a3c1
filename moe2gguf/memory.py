"""Handing freed memory back to the operating system between layers.

A layer-by-layer pass allocates and frees thousands of tensors of a few MB (one expert's
weights, its refit, its activations). glibc's malloc serves those from its heap once its
dynamic mmap threshold has risen past their size, and a heap fragmented by tensors of
different lifetimes keeps its pages: at Qwen3-30B-A3B layer size the shape probe grew by
~1.4 GB a layer that way (3.5 -> 7.5 GiB over four layers, tools/bench_scale.py), with
nothing alive. `malloc_trim(0)` returns every free page, wherever it lies in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators return memory themselves
        return None


def release_freed() -> None:
    """Give the pages of freed tensors back to the OS (a no-op off glibc)."""
    trim = _trim()
    if trim is not None:
        trim(0)
