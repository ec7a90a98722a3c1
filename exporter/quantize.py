"""Quantization by llama.cpp's own quantizer (llama_model_quantize via llama-cpp-python).

No quantizer of our own: the F32 GGUF that gguf-py wrote is handed to llama.cpp with the
target ftype, the importance matrix (llama_model_imatrix_data, already divided by counts as
llama-quantize does) and per-tensor type overrides (llama_model_tensor_override).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re

import gguf
import llama_cpp
import numpy as np
from llama_cpp._utils import suppress_stdout_stderr

from moe2gguf.errors import UserError
from moe2gguf.options import QUANT_TYPES

# llama.cpp's number of each file type
FTYPES: dict[str, int] = {n: getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if n == 'F32' else 'MOSTLY'}_{n}") for n in QUANT_TYPES}


def ftype_of(name: str) -> int:
    key = name.upper()
    if key not in QUANT_TYPES:
        raise UserError(f"unknown --quant {name!r}; choose one of {', '.join(sorted(QUANT_TYPES))}")
    return FTYPES[key]


def ggml_type_of(name: str) -> int:
    """GGML tensor type by name (Q4_K, Q8_0, F16...) for per-tensor overrides."""
    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise UserError(f"unknown tensor type {name!r}; choose one of {', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None


def overrides_of(types: dict[str, str]) -> list[tuple[str, str]]:
    """llama_model_tensor_override entries that pin every tensor to its planned type."""
    return [(f"^{re.escape(n)}$", t) for n, t in sorted(types.items())]


def check_override(pattern: str, tname: str) -> None:
    """A per-tensor type override llama.cpp can apply: a regular expression that compiles (a
    bad one would abort inside llama.cpp's std::regex) and a ggml type it knows."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise UserError(f"tensor-type pattern {pattern!r} is not a valid regular expression ({e}); fix the pattern") from None
    ggml_type_of(tname)


def quantize(
    src: pathlib.Path,
    dst: pathlib.Path,
    quant: str,
    imatrix: dict[str, np.ndarray] | None = None,
    overrides: list[tuple[str, str]] | None = None,
    nthread: int | None = None,
    verbose: bool = False,
    dry_run: bool = False,
) -> None:
    """llama_model_quantize(src -> dst). `imatrix`: GGUF tensor name -> mean squared
    activations, flat float32 of n_mat * n_in. `overrides`: (regex, ggml type name)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = nthread or os.cpu_count() or 1
    params.dry_run = dry_run  # plan types and sizes only; nothing is written
    keep: list[object] = []  # ctypes buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            if not np.isfinite(arr).all():
                raise UserError(f"importance matrix entry {name} has non-finite values; recompute it with `moe2gguf calibrate`")
            bname = name.encode()
            keep += [arr, bname]
            entries[i].name = bname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # terminator
        keep.append(entries)
        params.imatrix = entries
    if overrides:
        tts = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, tname) in enumerate(overrides):
            b = pattern.encode()
            keep.append(b)
            tts[i].pattern = b
            tts[i].type = ggml_type_of(tname)
        tts[len(overrides)].pattern = None
        keep.append(tts)
        params.tt_overrides = tts
    llama_cpp.llama_backend_init()
    with suppress_stdout_stderr(disable=verbose):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp's quantizer failed on {src} -> {quant} (code {rc}); run with --verbose to see its log")
