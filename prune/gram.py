"""Each expert's Gram matrix of down_proj inputs, G_e = sum_x (p h)(p h)^T, in bounded memory.

The least-squares refit (prune/rewrite.py `refit_down`) reads them. A layer's matrices are
E x W^2 floats: 604 MB in float64 at Qwen3-30B-A3B (128 experts x 768), half its expert weights,
but 13 GB at Mixtral-8x7B (8 x 14,336), 4.5x them: summed in memory over the layer's pass,
calibrate peaked at 17.5 GiB on one layer of that size, where one layer + embeddings + head is
3.4 GB. So during the pass each expert's router-weighted activations p h go to a file of their
own (float32, as the forward computed them), and once the layer is done the matrices are made
one expert at a time from those files (products of float32 chunks, summed in float64) and
written to CALIB in files of at most `PART_BYTES`. Memory: one expert's matrix (float64 and
its float32 copy); temporary disk: the layer's activations, tokens x top-k x W x 4 bytes
(0.8 GB at Qwen3-30B-A3B, 3.8 GB at Mixtral-8x7B, for 32,768 tokens), removed expert by expert.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from moe2gguf.calib import gram_part

F64 = torch.float64
# activations read back at once: at most CHUNK_BYTES; their products are summed in float32 over
# about CHUNK_ROWS rows (as one calibration batch of 8 x 512 tokens would be), those sums in float64
CHUNK_BYTES, CHUNK_ROWS = 64 << 20, 4096
# a gram/ file holds whole experts' matrices up to this many bytes (an expert larger than it
# gets a file of its own). safetensors' save_file copies what it writes, so a file costs twice
# this in memory while it is written: at 256 MB that was the peak of calibrate's layer steps
# at Qwen3-30B-A3B's layer size once the experts were read as they run.
PART_BYTES = 64 << 20


class GramSpill:
    """Per expert of one layer: `add` appends its weighted activations to its file in `folder`;
    after the pass `write` (or `matrices`) makes the Gram matrices, float32, expert by expert,
    deleting the files."""

    def __init__(self, folder: pathlib.Path, widths: list[int]):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.widths = folder, widths
        self.rows = [0] * len(widths)

    def _file(self, xid: int) -> pathlib.Path:
        return self.folder / f"expert-{xid}.f32"

    def add(self, xid: int, ph: torch.Tensor) -> None:
        """ph: [tokens, width] router weight x activation of the tokens routed to expert `xid`."""
        if not ph.numel():  # no token, or an expert of width 0
            return
        with open(self._file(xid), "ab") as f:
            ph.to("cpu", torch.float32).contiguous().numpy().tofile(f)
        self.rows[xid] += ph.shape[0]

    def matrices(self) -> Iterator[torch.Tensor]:
        for xid in range(len(self.widths)):
            yield self.matrix(xid)

    def matrix(self, xid: int) -> torch.Tensor:
        """Expert `xid`'s matrix, float32, from its file (then deleted). Rows are summed in
        float32 products of about CHUNK_ROWS rows, and those in float64: an expert that saw no
        more rows than that (Qwen3-30B-A3B's, at 32,768 tokens) never needs the float64 copy."""
        width, rows = self.widths[xid], self.rows[xid]
        if not rows:  # no token reached it (or it has no channel): no file
            return torch.zeros(width, width)
        step = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (4 * width)))
        total: torch.Tensor | None = None  # float64
        part: torch.Tensor | None = None  # float32, of `in_part` rows
        in_part = 0
        path = self._file(xid)
        with open(path, "rb") as f:
            for start in range(0, rows, step):
                n = min(step, rows - start)
                c = torch.from_numpy(np.fromfile(f, dtype=np.float32, count=n * width)).view(n, width)
                part = c.T @ c if part is None else part.addmm_(c.T, c)
                in_part += n
                if in_part >= CHUNK_ROWS and start + n < rows:
                    total = part.double() if total is None else _add(total, part)
                    part, in_part = None, 0
        path.unlink()
        if total is None:
            return part
        if part is not None:
            total = _add(total, part)
            del part  # before the float32 copy: the three at once were 3.3 GB at Mixtral-8x7B
        return total.float()

    def write(self, folder: pathlib.Path, bid: int) -> None:
        """Every expert's matrix into CALIB/gram/ (`write_grams`), each made as its file is written."""
        write_grams(folder, bid, self.widths, self.matrix)


def _add(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """total += part (float64 += float32) a block of rows at a time: a mixed-dtype add on the CPU
    first casts its whole float32 operand to float64 (1.6 GB at Mixtral-8x7B's width)."""
    step = max(1, CHUNK_BYTES // (8 * max(total.shape[1], 1)))
    for i in range(0, total.shape[0], step):
        total[i : i + step] += part[i : i + step]
    return total


def write_grams(folder: pathlib.Path, bid: int, widths: list[int], matrix: Callable[[int], torch.Tensor]) -> None:
    """Layer `bid`'s matrices (`matrix(xid)`, [width, width] float32), keyed by expert index,
    into CALIB/gram/ (`moe2gguf.calib.gram_part`): consecutive experts share a file up to
    `PART_BYTES`, and a file's matrices are made only when the previous file is written, so
    memory holds one file's. Parts of the layer beyond these (an earlier write) are removed."""
    parts: list[list[int]] = []
    size = 0
    for xid, w in enumerate(widths):
        if not parts or size + 4 * w * w > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(xid)
        size += 4 * w * w
    for k, xids in enumerate(parts):
        f = gram_part(folder, bid, k)
        f.parent.mkdir(exist_ok=True)
        save_file({str(x): matrix(x).contiguous() for x in xids}, f)
    for k in range(len(parts), len(widths)):  # of an earlier write in more parts (at most one per expert): readers take every part
        gram_part(folder, bid, k).unlink(missing_ok=True)
