"""A Hugging Face checkpoint on local disk, read lazily.

Only config.json and the safetensors headers are read up front, so `inspect` answers at
once on a 60 GB checkpoint; tensors are loaded one at a time on request (memory-mapped).
"""

from __future__ import annotations

import json
import pathlib
from functools import cached_property

import torch
from safetensors import SafetensorError, safe_open

from moe2gguf.errors import UserError
from moe2gguf.fp8 import SCALE_SUFFIX, dequantize_block_fp8, hide_scales

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# moe2gguf's own keys in a pruned checkpoint's config.json (everything else is stock HF).
EXPERT_WIDTHS_KEY = "moe2gguf_expert_widths"


class Checkpoint:
    """config.json + safetensors of one model folder."""

    # False for a checkpoint known by shapes only (sizing plans made from public numbers)
    has_files = True
    # block-FP8 weights (moe2gguf/fp8.py): block size and {scale_inv name: file}
    _fp8_block: tuple[int, ...] | None = None
    _fp8_scales: dict[str, str] = {}

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a folder; pass a Hugging Face model folder (config.json + *.safetensors)")
        cfg = self.path / CONFIG
        if not cfg.is_file():
            raise UserError(f"{self.path} has no config.json; pass the folder of a Hugging Face checkpoint")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno}); restore the original file") from None
        self._files = self._index()
        self._handles: dict[str, object] = {}
        self._headers()

    def _index(self) -> dict[str, str]:
        """tensor name -> safetensors file name."""
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return {}  # filled from the header in _headers
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path} has no *.safetensors weights; convert .bin weights with transformers' save_pretrained first")
        return {"": ""}  # marker: several files without an index

    def _open(self, fname: str):
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(self.path / fname, framework="pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{self.path / fname} is unreadable ({e}); the file is truncated or corrupt, copy it again") from None
        return self._handles[fname]

    def _headers(self) -> None:
        if not self._files:
            names = [SINGLE]
        elif "" in self._files:
            names = [p.name for p in sorted(self.path.glob("*.safetensors"))]
        else:
            names = sorted(set(self._files.values()))
        files: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for fname in names:
            h = self._open(fname)
            for key in h.keys():
                files[key] = fname
                sl = h.get_slice(key)
                self._shapes[key] = tuple(sl.get_shape())
                self._dtypes[key] = sl.get_dtype()
        self._files = files
        self._fp8_block, self._fp8_scales = hide_scales(self.config, self._files, self._shapes, self._dtypes)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def numel(self, name: str) -> int:
        n = 1
        for d in self._shapes[name]:
            n *= d
        return n

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise UserError(f"{self.path} lacks tensor {name}; the checkpoint does not match its config.json")
        t = self._open(self._files[name]).get_tensor(name)
        if (scale := name + SCALE_SUFFIX) in self._fp8_scales:
            t = dequantize_block_fp8(t, self._open(self._fp8_scales[scale]).get_tensor(scale), self._fp8_block)
        return t

    @cached_property
    def weight_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self._files.values()))

    @property
    def expert_widths(self) -> list[list[int]] | None:
        """Per-layer, per-stored-expert widths recorded by `prune` (None for an unpruned model)."""
        return self.config.get(EXPERT_WIDTHS_KEY)


# A pruned checkpoint records where every kept expert and channel came from, so the
# unpruned model's importance matrix can be carried over to it:
#   layers.{bid}.experts            int64 [n_kept]  original expert id of each stored expert
#   layers.{bid}.experts.{k}.channels  int64 [width] original channel ids of stored expert k
PRUNE_MAP = "prune_map.safetensors"


def read_prune_map(path: str | pathlib.Path) -> dict[int, tuple[list[int], list[list[int]]]] | None:
    """{layer: (original expert ids, per stored expert its original channel ids)}, or None."""
    f = pathlib.Path(path) / PRUNE_MAP
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    t = load_file(f)
    out: dict[int, tuple[list[int], list[list[int]]]] = {}
    for key, v in t.items():
        parts = key.split(".")
        if len(parts) == 3:
            bid = int(parts[1])
            experts = v.tolist()
            channels = [t[f"{key}.{k}.channels"].tolist() for k in range(len(experts))]
            out[bid] = (experts, channels)
    return dict(sorted(out.items()))


def write_prune_map(folder: str | pathlib.Path, kept: dict[int, tuple[list[int], list[list[int]]]]) -> None:
    from safetensors.torch import save_file

    t: dict[str, torch.Tensor] = {}
    for bid, (experts, channels) in kept.items():
        t[f"layers.{bid}.experts"] = torch.tensor(experts, dtype=torch.int64)
        for k, ch in enumerate(channels):
            t[f"layers.{bid}.experts.{k}.channels"] = torch.tensor(ch, dtype=torch.int64)
    save_file(t, pathlib.Path(folder) / PRUNE_MAP)
