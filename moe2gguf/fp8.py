"""Block-FP8 checkpoints (DeepSeek-V3/R1, Qwen3-FP8 as published), dequantized as they are read.

Such a checkpoint says so in config.json: `quantization_config` = {quant_method: "fp8",
weight_block_size: [R, C], ...}. Each quantized weight `W` is stored as `float8_e4m3fn`
next to a float32 `W_scale_inv` of shape ceil(rows/R) x ceil(cols/C): block (i, j) of the
real weight is `W[iR:(i+1)R, jC:(j+1)C] * scale_inv[i, j]` (the name is historical: it is
the factor that undoes the quantization). The product is rounded to bf16 once, so every verb
sees the values DeepSeek's own FP8->bf16 cast gives, one tensor at a time (never the whole
model), and a pruned checkpoint is an ordinary bf16 one.
"""

from __future__ import annotations

import math

import torch

from moe2gguf.errors import UserError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the float8 dtypes
OUT_DTYPE = torch.bfloat16


def block_size(config: dict) -> tuple[int, ...] | None:
    """The (rows, cols) block of a block-FP8 config.json, None when the weights are not
    quantized; UserError for a quantization that is not block FP8 (nothing reads it)."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    block = q.get("weight_block_size")
    if method != "fp8" or not block or any(not isinstance(b, int) or b < 1 for b in block):
        raise UserError(
            f"config.json has quantization_config with quant_method={method!r}, weight_block_size={block!r}; "
            "moe2gguf reads bf16/f16/f32 checkpoints and block-FP8 ones (quant_method 'fp8' with weight_block_size): "
            "dequantize this checkpoint first"
        )
    return tuple(block)


def is_block_fp8(quantization_config: dict | None) -> bool:
    """Whether a quantization_config is one `dequantize_block_fp8` reads."""
    try:
        return block_size({"quantization_config": quantization_config}) is not None
    except UserError:
        return False


def scale_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scale_inv tensor that goes with a weight of `shape`."""
    return tuple(math.ceil(n / b) for n, b in zip(shape, block))


def dequantize_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """`w` (float8) times its per-block factors, in float32, rounded to bf16 once."""
    if w.dim() != len(block) or tuple(scale_inv.shape) != scale_shape(tuple(w.shape), block):
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a weight {tuple(w.shape)} in blocks {block}")
    if w.dim() == 2:
        # each factor broadcast over its block, not expanded to the weight's size first: 59 ms
        # rather than 118 for one of DeepSeek-V3's 2048 x 7168 expert weights on 2 cores, the same values
        (rows, cols), (br, bc), (gr, gc) = w.shape, block, scale_inv.shape
        x = w.float()
        if rows % br or cols % bc:  # the last blocks of a dimension are partial: padded to whole ones
            x = torch.nn.functional.pad(x, (0, gc * bc - cols, 0, gr * br - rows))
        x = x.view(gr, br, gc, bc).mul_(scale_inv.float()[:, None, :, None]).view(gr * br, gc * bc)
        return x[:rows, :cols].to(OUT_DTYPE)
    s = scale_inv.float()
    for dim, size in enumerate(block):
        s = s.repeat_interleave(size, dim)
    # the last blocks of a dimension that is not a multiple of the block are partial
    s = s[tuple(slice(0, n) for n in w.shape)]
    return (w.float() * s).to(OUT_DTYPE)


def hide_scales(config: dict, files: dict[str, str], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> tuple[tuple[int, ...] | None, dict[str, str]]:
    """For a block-FP8 checkpoint: take the `_scale_inv` companions out of its tensor listing
    (they are not parameters of the model), record their weights as bf16 (what reading them
    gives) and drop quantization_config from `config`, so the checkpoint reads as the bf16
    model it encodes. Returns (block, {scale name: file}); (None, {}) for any other checkpoint."""
    block = block_size(config)
    if block is None:
        return None, {}
    scales = {n: files[n] for n in list(files) if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in files}
    unscaled = sorted(n for n, d in dtypes.items() if d in FP8_DTYPES and n + SCALE_SUFFIX not in scales)
    if unscaled:
        raise UserError(f"tensor {unscaled[0]} is float8 but the checkpoint has no {unscaled[0]}{SCALE_SUFFIX}; the checkpoint is incomplete: copy it again")
    for n in scales:
        del files[n], shapes[n], dtypes[n]
        weight = n[: -len(SCALE_SUFFIX)]
        if dtypes[weight] in FP8_DTYPES:
            dtypes[weight] = "BF16"
    del config["quantization_config"]
    return block, scales
