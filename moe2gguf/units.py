"""Sizes and counts as people read them, the same way in every verb's output."""

from __future__ import annotations


def human_bytes(n: float, exact: bool = False) -> str:
    """Bytes in binary units (GiB, MiB, KiB), as llama.cpp and the tables of `check` print
    them; `exact` adds the byte count, for sizes a user compares with a target."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}" + (f" ({int(n):,} bytes)" if exact else "")
    return f"{int(n)} B"


def human_count(n: int) -> str:
    """A parameter count with a decimal suffix (B, M, K), as model cards give sizes."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
