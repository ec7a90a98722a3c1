"""A Hugging Face checkpoint on local disk, read lazily.

Only config.json and the safetensors headers are read up front, so `inspect` answers at
once on a 60 GB checkpoint; tensors are loaded one at a time on request (memory-mapped).
"""

from __future__ import annotations

import pathlib
from functools import cached_property

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moe2gguf.errors import UserError
from moe2gguf.fp8 import SCALE_SUFFIX, dequantize_block_fp8, hide_scales
from moe2gguf.inputs import read_json_object, regular_file

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# moe2gguf's own keys in a pruned checkpoint's config.json (everything else is stock HF).
EXPERT_WIDTHS_KEY = "moe2gguf_expert_widths"
# safetensors dtypes of weights we read (integer ones are quantized, or not weights at all)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# A shard is memory-mapped, and the pages reads touch stay in the process's RSS for as long as
# the mapping is open: kept open, streaming a model layer by layer would end with the whole
# model resident (3.5 GB of file pages at two Qwen3-30B-A3B layers). A handle is dropped after
# this many bytes read through it (reopening costs a header parse), and when reads move on to
# another shard, so the file pages held are this much plus the tensors still alive, whatever
# the model's size or its number of shards. Experts read as they run (`load_weights`'
# stream_experts) pass 1.2 GB through it per batch at Qwen3-30B-A3B: at 256 MB the pages still
# mapped were a sawtooth of up to 0.3 GB in calibrate's RSS, at 64 MB 0.17, in the same time.
MAP_WINDOW = 64 << 20


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: its minimum and maximum are finite (both carry a NaN through). On
    bf16 that costs a fifteenth of a float32 sum and a thirtieth of `isfinite(t).all()`, which
    was a fifth of prune's time at 30B layer size."""
    if not t.numel():
        return True
    x = t if t.element_size() > 1 else t.float()  # float8 has no reductions
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class Checkpoint:
    """config.json + safetensors of one model folder."""

    # False for a checkpoint known by shapes only (sizing plans made from public numbers)
    has_files = True
    # block-FP8 weights (moe2gguf/fp8.py): block size and {scale_inv name: file}
    _fp8_block: tuple[int, ...] | None = None
    _fp8_scales: dict[str, str] = {}

    def __init__(self, path: str | pathlib.Path):
        from moe2gguf.arch import arch_for_config  # arch imports this module

        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a folder; pass a Hugging Face model folder (config.json + *.safetensors)")
        cfg = self.path / CONFIG
        if not cfg.exists():
            raise UserError(f"{self.path} has no config.json; pass the folder of a Hugging Face checkpoint")
        self.config: dict = read_json_object(cfg, "config", "restore the original config.json of the checkpoint")
        # the one place a checkpoint's config is validated (types, ranges, sizes that fit:
        # MoEArch.__init__), before any tensor is read or anything allocated
        arch = arch_for_config(self.config)
        self._files = self._index()
        self._handles: dict[str, object] = {}
        self._mapped: dict[str, int] = {}  # bytes read through each open handle (MAP_WINDOW)
        self._finite: set[str] = set()  # tensors found free of NaN/Inf
        self._headers()
        self._check_experts(arch)

    def _index(self) -> dict[str, str]:
        """tensor name -> safetensors file name."""
        index = self.path / INDEX
        if index.exists():
            fix = "restore the original model.safetensors.index.json (or delete it if the weights are one model.safetensors)"
            weight_map = read_json_object(index, "shard index", fix).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"shard index {index} has no weight_map object; {fix}")
            for name, fname in weight_map.items():
                # shard names are plain file names inside the model folder, nothing else
                if not isinstance(fname, str) or not fname.endswith(".safetensors") or fname != pathlib.PurePath(fname).name or fname.startswith("."):
                    raise UserError(f"shard index {index} maps {name} to {fname!r}, not a .safetensors file name in the folder; {fix}")
            for fname in sorted(set(weight_map.values())):
                if not (self.path / fname).is_file():
                    raise UserError(f"shard index {index} names {fname}, which is missing from {self.path}; copy every shard of the checkpoint")
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return {}  # filled from the header in _headers
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path} has no *.safetensors weights; convert .bin weights with transformers' save_pretrained first")
        return {"": ""}  # marker: several files without an index

    def _open(self, fname: str):
        if fname not in self._handles:
            # a FIFO would block safe_open forever, a device be read as weights
            regular_file(self.path / fname, "weight file", "copy the checkpoint's .safetensors files again")
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
                if key in files:
                    # which copy a loader would take is arbitrary: a real checkpoint stores each tensor once
                    raise UserError(f"{self.path}: tensor {key} is stored in both {files[key]} and {fname}; the shards do not belong "
                                    "together, copy the checkpoint again")
                files[key] = fname
                sl = h.get_slice(key)
                self._shapes[key] = tuple(sl.get_shape())
                self._dtypes[key] = sl.get_dtype()
        self._files = files
        self._fp8_block, self._fp8_scales = hide_scales(self.config, self._files, self._shapes, self._dtypes)

    def _check_experts(self, arch) -> None:  # noqa: ANN001 - MoEArch (import cycle)
        """Every routed-expert tensor the config implies is stored, as floats. Counted first, so
        a config claiming more experts than the files hold is refused before any name is made."""
        from moe2gguf.arch.base import EXPERT_PARTS  # arch imports this module

        implied = 3 * sum(len(w) for w in arch.expert_widths())
        if implied > len(self._files):
            raise UserError(
                f"{self.path / CONFIG} implies {implied:,} routed-expert tensors, the safetensors hold {len(self._files):,} "
                "tensors in all; the config does not belong to these weights, restore the original config.json"
            )
        for bid, widths in enumerate(arch.expert_widths()):
            for xid, width in enumerate(widths):
                for part in EXPERT_PARTS:
                    name = arch.expert_name(bid, xid, part)
                    if name not in self._files:
                        raise UserError(f"{self.path} lacks tensor {name}; the checkpoint's tensors disagree with its config.json")
                    if self._dtypes[name] not in FLOAT_DTYPES:
                        raise UserError(
                            f"{self.path}: expert tensor {name} is stored as {self._dtypes[name]}, not as floats; moe2gguf reads "
                            "F32/F16/BF16 (or block-FP8) weights: dequantize the checkpoint first"
                        )
                    # from the header, so inspect and prune refuse it too, not only the verbs that build a model
                    want = (arch.hidden_size, width) if part == "down" else (width, arch.hidden_size)
                    if self._shapes[name] != want:
                        raise UserError(f"{self.path}: tensor {name} has shape {self._shapes[name]}, config implies {want}; "
                                        "the checkpoint's tensors disagree with its config.json")

    @property
    def tensor_names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def dequantizes(self, name: str) -> bool:
        """Whether reading `name` makes a new tensor (a block-FP8 weight, dequantized to bf16),
        rather than a view of the file's pages."""
        return name + SCALE_SUFFIX in self._fp8_scales

    def numel(self, name: str) -> int:
        n = 1
        for d in self._shapes[name]:
            n *= d
        return n

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise UserError(f"{self.path} lacks tensor {name}; the checkpoint does not match its config.json")
        try:
            t = self._open(self._files[name]).get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{self.path / self._files[name]}: tensor {name} is unreadable ({e}); the file is corrupt, copy it again") from None
        self._release(self._files[name], t.numel() * t.element_size())
        if (scale := name + SCALE_SUFFIX) in self._fp8_scales:
            t = dequantize_block_fp8(t, self._open(self._fp8_scales[scale]).get_tensor(scale), self._fp8_block)
        # checked as they stream by: NaN/Inf weights would otherwise flow silently through
        # calibration and pruning into the GGUF
        if not t.is_floating_point():
            raise UserError(f"{self.path}: tensor {name} is stored as {self._dtypes[name]}, not as floats; dequantize the checkpoint first")
        # once a tensor: a streamed expert is read again for every batch
        if name not in self._finite and not all_finite(t):
            raise UserError(f"{self.path}: tensor {name} holds NaN or Inf values; the weights are damaged, restore the original checkpoint")
        self._finite.add(name)
        return t

    def _release(self, fname: str, nbytes: int) -> None:
        """Drop `fname`'s handle once MAP_WINDOW bytes were read through it, and every other
        shard's that was read from: a mapping, and its file pages in the RSS, go when the
        tensors read from it do."""
        for other in [f for f in self._mapped if f != fname]:
            del self._handles[other], self._mapped[other]
        self._mapped[fname] = self._mapped.get(fname, 0) + nbytes
        if self._mapped[fname] >= MAP_WINDOW:
            del self._handles[fname], self._mapped[fname]

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
    t: dict[str, torch.Tensor] = {}
    for bid, (experts, channels) in kept.items():
        t[f"layers.{bid}.experts"] = torch.tensor(experts, dtype=torch.int64)
        for k, ch in enumerate(channels):
            t[f"layers.{bid}.experts.{k}.channels"] = torch.tensor(ch, dtype=torch.int64)
    save_file(t, pathlib.Path(folder) / PRUNE_MAP)
