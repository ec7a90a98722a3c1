"""Handing freed memory back to the operating system between layers.

A layer-by-layer pass allocates and frees thousands of tensors of a few MB (one expert's
weights, its refit, its activations). glibc's malloc serves those from its heap once its
dynamic mmap threshold has risen past their size, and a heap fragmented by tensors of
different lifetimes keeps its pages: at Qwen3-30B-A3B layer size the shape probe grew by
~1.4 GB a layer that way (3.5 -> 7.5 GiB over four layers, tools/bench_scale.py), with
nothing alive. `malloc_trim(0)` returns every free page, wherever it lies in the heap.

Every pass calls `release_freed` once per step (layer, probed shape, rewritten layer), so it is
also where a benchmark learns where memory peaks: with $MOE2GGUF_PEAK_LOG set to a file, each
call appends the exact peak RSS since the previous one (the kernel's VmHWM, reset through
/proc/self/clear_refs) and its caller (Linux only; tools/bench_scale.py reads it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import time
import types

PEAK_LOG = "MOE2GGUF_PEAK_LOG"


def physical_ram() -> int | None:
    """This machine's memory in bytes (None where the OS does not say): what a step that would
    hold more is refused or skipped against, before the work rather than by the OOM killer."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@functools.cache
def _trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators return memory themselves
        return None


def trim() -> None:
    """Give the pages of freed tensors back to the OS now (a no-op off glibc), inside a step.

    A loop that allocates and frees tensors of a few MB (a calibration batch's activations, a
    vocabulary slice of logits) is served from wherever malloc's heap has room, and every
    page it touches stays resident until a trim. The heap's free address space grows as the
    layers go (0.4 GB a layer in the shape probe at Qwen3-30B-A3B's layer size), so without a
    trim inside such a loop its step peaked higher the deeper the model: the probe's KLD step
    1.99 / 2.07 / 2.21 GiB after 2 / 4 / 8 layers, with one trim per vocabulary slice 1.89 /
    1.92 after 2 / 4 (tools/bench_scale.py)."""
    t = _trim()
    if t is not None:
        t(0)


def release_freed() -> None:
    """Give the pages of freed tensors back to the OS (a no-op off glibc), ending a step."""
    log = os.environ.get(PEAK_LOG)
    hwm = _high_water() if log else None  # the step's peak, before the trim lowers the RSS
    trim()
    if log and hwm is not None:
        _log_peak(log, hwm, sys._getframe(1))


def _high_water() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None  # not Linux


def _log_peak(path: str, hwm: int, caller: types.FrameType) -> None:
    """Append "time<TAB>peak bytes<TAB>file:line function" for the step that ends here, and
    start the next step's peak from the RSS of now (after the trim)."""
    code = caller.f_code
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return  # a read-only /proc: every "step" would be the peak since the start; no log
    try:
        with open(path, "a") as f:
            f.write(f"{time.time():.1f}\t{hwm}\t{code.co_filename.rsplit('/', 1)[-1]}:{caller.f_lineno} {code.co_name}\n")
    except OSError:
        pass  # a diagnostic: an unwritable log must not stop the work it measures
