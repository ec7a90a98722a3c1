"""CALIB/, the folder `moe2gguf calibrate` writes and `prune` and `export --imatrix` read:
its file names and calib.json read back and checked.

  calib.json          what was measured (model shape, tokens, ctx, texts, peak layer memory)
  scores.safetensors  per MoE layer statistics for prune (prune/calibrate.py lists them)
  imatrix.gguf        llama.cpp's GGUF importance matrix (exporter/imatrix.py)
  gram/layer-N.safetensors, gram/layer-N-1.safetensors, ...
                      per MoE layer, each expert's Gram matrix of down_proj inputs for the
                      least-squares refit, keyed by expert index, whole experts per file
                      (written as each layer finishes: together they grow with the model,
                      14 GiB at Qwen3-30B-A3B, so none stays in RAM; prune/gram.py)
"""

from __future__ import annotations

import pathlib

from moe2gguf.errors import UserError
from moe2gguf.inputs import read_json_object, require_fields

CALIB_JSON = "calib.json"
SCORES = "scores.safetensors"
IMATRIX = "imatrix.gguf"
GRAM_DIR = "gram"


def gram_part(folder: pathlib.Path, bid: int, part: int) -> pathlib.Path:
    """File `part` of MoE layer `bid`'s Gram matrices (part 0 is the only one of older CALIBs)."""
    return folder / GRAM_DIR / (f"layer-{bid}.safetensors" if part == 0 else f"layer-{bid}-{part}.safetensors")


def gram_file(folder: pathlib.Path, bid: int) -> pathlib.Path:
    return gram_part(folder, bid, 0)


def gram_parts(folder: pathlib.Path, bid: int) -> list[pathlib.Path]:
    """Layer `bid`'s Gram files that exist, in order (none: this CALIB has no Gram matrices)."""
    out: list[pathlib.Path] = []
    while (f := gram_part(folder, bid, len(out))).is_file():
        out.append(f)
    return out

# calib.json fields later steps read, with their types
CALIB_FIELDS: dict[str, type] = {
    "architectures": list, "n_layers": int, "hidden_size": int, "n_experts": int, "expert_width": int, "tokens": int, "ctx": int, "texts": list,
}


def read_calib_json(path: pathlib.Path, required: tuple[str, ...] = tuple(CALIB_FIELDS)) -> dict:
    """calib.json, with the `required` fields present and every known field of its type and range."""
    fix = f"run `moe2gguf calibrate` again to rewrite {path.parent}"
    info = read_json_object(path, "calibration record", fix)
    require_fields(info, {k: t for k, t in CALIB_FIELDS.items() if k in required or k in info}, str(path), fix)
    if info.get("tokens", 1) < 1 or info.get("ctx", 2) < 2 or ("texts" in info and not (info["texts"] and all(isinstance(t, str) for t in info["texts"]))):
        raise UserError(f"{path}: tokens {info.get('tokens')}, ctx {info.get('ctx')} or texts {str(info.get('texts'))[:60]} are out of range; {fix}")
    return info
