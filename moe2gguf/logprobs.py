"""Scoring the perplexity protocol's positions one window at a time, in bounded memory.

A model's log-probabilities at the scored positions are [tokens x vocabulary]: at Qwen3's
151,936-entry vocabulary and 64 windows of 512 that is 10 GB as float32, so nothing here ever
holds more than one window of them. Per window a model's logits become, at once, each
position's NLL and, against a base, its KL-divergence and top-1 agreement.

The base is kept as llama-perplexity keeps it for `--kl-divergence-base`: one uint16 per
position and vocabulary entry on a linear grid spanning the position's log-probabilities
from the top down to `RANGE` nats below it (the grid's origin and step travel in the row's
first four uint16 as two float32). Entries further down are clamped to the floor: e^-30 of
the top entry's probability, so even 151,936 of them move the KLD by less than 1e-8. A
grid step is 30/65535 = 4.6e-4 nats; a row read back is renormalised, so KL(base || model)
stays a divergence of two distributions.

numpy only: the llama.cpp child imports this and never torch.
"""

from __future__ import annotations

import errno
import math
import os
import pathlib
from dataclasses import dataclass

import numpy as np

from moe2gguf.outputs import free_bytes
from moe2gguf.units import human_bytes

RANGE = 30.0  # nats below a position's top log-probability that the grid resolves
LEVELS = 65535
HEADER = 4  # uint16 columns holding the grid's origin and step as two float32
ROWS = 32  # positions converted at once: [32 x 151,936] float64 is 39 MB


@dataclass
class Scores:
    """Per-position negative log-likelihoods (and, against a base, KLD and top-1 match)."""

    nll: np.ndarray
    kld: np.ndarray | None = None
    top1: np.ndarray | None = None

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def ppl_se(self) -> float:
        # delta method, as llama-perplexity reports it: se(ppl) = ppl * se(mean nll)
        return self.ppl * float(self.nll.std(ddof=1) / math.sqrt(len(self.nll))) if len(self.nll) > 1 else 0.0

    @staticmethod
    def concat(parts: list[Scores]) -> Scores:
        with_base = all(p.kld is not None for p in parts)
        return Scores(
            np.concatenate([p.nll for p in parts]),
            np.concatenate([p.kld for p in parts]) if with_base else None,
            np.concatenate([p.top1 for p in parts]) if with_base else None,
        )


def _shifted(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits minus each row's max as float32, each row's log-sum-exp of those, float64):
    log-probabilities are their difference. float32 elementwise with float64 sums, as
    llama-perplexity computes them: the per-entry error (~1e-7 nats) is far under the grid's."""
    y = np.array(logits, dtype=np.float32)
    y -= y.max(-1, keepdims=True)
    lse = np.log(np.exp(y).sum(-1, dtype=np.float64, keepdims=True))
    return y, lse


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities of [n, V] logits."""
    y, lse = _shifted(logits)
    y -= lse.astype(np.float32)
    return y


def pack(lp: np.ndarray) -> np.ndarray:
    """[n, V] log-probabilities -> [n, HEADER + V] uint16 grid rows."""
    top = lp.max(-1, keepdims=True).astype(np.float64)
    lo = np.maximum(lp.min(-1, keepdims=True), top - RANGE).astype(np.float32)
    step = np.maximum((top - lo) / LEVELS, np.finfo(np.float32).tiny).astype(np.float32)
    out = np.empty((lp.shape[0], HEADER + lp.shape[1]), np.uint16)
    out[:, :HEADER] = np.concatenate([lo, step], -1).view(np.uint16)
    q = lp - lo
    q *= 1 / step
    q += 0.5  # round to nearest: the cast below truncates
    np.clip(q, 0, LEVELS, out=q)
    out[:, HEADER:] = q
    return out


def _grid(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unnormalised float32 log-probabilities on the grid, each row's log of their sum)."""
    head = np.ascontiguousarray(rows[:, :HEADER]).view(np.float32)
    lp = rows[:, HEADER:].astype(np.float32)
    lp *= head[:, 1:]
    lp += head[:, :1]
    return lp, np.log(np.exp(lp).sum(-1, dtype=np.float64, keepdims=True))


def unpack(rows: np.ndarray) -> np.ndarray:
    """[n, HEADER + V] uint16 grid rows -> [n, V] float32 log-probabilities, renormalised."""
    lp, lse = _grid(rows)
    lp -= lse.astype(np.float32)
    return lp


def score_window(logits: np.ndarray, targets: np.ndarray, base_rows: np.ndarray | None = None, grid: bool = False) -> tuple[Scores, np.ndarray | None]:
    """One window's scored positions: logits [n, V], targets [n]; against the base's grid rows
    [n, HEADER + V] when given. With `grid`, also this model's own grid rows (to be a base)."""
    parts, rows_out = [], []
    for a in range(0, len(targets), ROWS):
        b = min(a + ROWS, len(targets))
        y, lse = _shifted(logits[a:b])
        nll = lse[:, 0] - y[np.arange(b - a), targets[a:b]]
        if grid or base_rows is not None:
            y -= lse.astype(np.float32)  # log-probabilities from here on
        if grid:
            rows_out.append(pack(y))
        if base_rows is None:
            parts.append(Scores(nll))
            continue
        rows = np.asarray(base_rows[a:b])
        lb, lse_b = _grid(rows)
        top1 = (rows[:, HEADER:].argmax(-1) == y.argmax(-1)).astype(np.float64)
        # KL(base || model) with the base renormalised: sum p (lb - lm) / Z - log Z, Z = sum p
        p = np.exp(lb)
        lb -= y
        kld = np.einsum("ij,ij->i", p, lb, dtype=np.float64) / np.exp(lse_b[:, 0]) - lse_b[:, 0]
        parts.append(Scores(nll, kld, top1))
    return Scores.concat(parts), (np.concatenate(rows_out) if grid else None)


class NoRoom(OSError):
    """The disk cannot hold a grid file; raised before its first row is written, not after
    minutes of a model's windows."""

    def __init__(self, path: str, need: int, free: int):
        folder = os.path.dirname(os.path.abspath(path))
        have = f", {human_bytes(free)} is free there" if free < 1 << 60 else ""
        super().__init__(errno.ENOSPC, f"disk full: the log-prob grid needs {human_bytes(need)} in {folder}{have}")

    def __str__(self) -> str:
        return self.strerror


def _reserve(f, path: str, size: int) -> None:  # noqa: ANN001 - an open binary file
    """Claim `size` bytes for `f` now, so a full disk is said at once rather than mid-run."""
    folder = pathlib.Path(path).resolve().parent
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoRoom(path, size, free_bytes(folder)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        if free_bytes(folder) < size:  # a file system that cannot reserve: its free space, then
            raise NoRoom(path, size, free_bytes(folder)) from None


class GridFile:
    """A grid file (.npy of [positions, HEADER + V] uint16) read or written a window at a time
    with plain reads and writes: a memory map's touched pages would count in the process's RSS,
    5 GB at Qwen3's vocabulary and 64 windows of 512."""

    def __init__(self, path: str, mode: str, shape: tuple[int, int] | None = None):
        self.f = open(path, mode + "b")  # noqa: SIM115 - closed by close()
        if mode == "w":
            assert shape is not None
            np.lib.format.write_array_header_1_0(self.f, {"descr": np.dtype(np.uint16).str, "fortran_order": False, "shape": shape})
            _reserve(self.f, path, self.f.tell() + shape[0] * shape[1] * 2)
        else:
            major, _ = np.lib.format.read_magic(self.f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(self.f)
            if fortran or dtype != np.uint16 or len(shape) != 2:
                raise ValueError(f"{path} is not a log-prob grid")
        self.shape = shape
        self.offset = self.f.tell()

    def read(self, start: int, n: int) -> np.ndarray:
        self.f.seek(self.offset + start * self.shape[1] * 2)
        rows = np.fromfile(self.f, np.uint16, n * self.shape[1])
        if rows.size != n * self.shape[1]:
            raise ValueError("the grid file is truncated")
        return rows.reshape(n, self.shape[1])

    def write(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, np.uint16).tobytes())

    def close(self) -> None:
        self.f.close()
