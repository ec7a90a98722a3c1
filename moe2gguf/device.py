"""`--device`: where the layer being worked on and its inputs live.

Statistics are accumulated on the CPU in float64 whatever the device (each batch's tensors are
copied there as they are observed), so a CALIB does not depend on the device beyond the
forward pass's own rounding, and MPS, which has no float64, works the same way. One decoder
layer is resident on the device at a time; weights stream from the checkpoint on disk.
"""

from __future__ import annotations

from typing import Any

import torch

from moe2gguf.errors import UserError
from moe2gguf.options import DEVICES

CPU = torch.device("cpu")
INSTALL = "install torch's CUDA build into this environment (README: On a GPU) or pass --device cpu"


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve(name: str) -> torch.device:
    """--device NAME as a torch device; `auto` is CUDA where torch sees a GPU, else MPS, else CPU."""
    if name not in DEVICES:
        raise UserError(f"--device {name} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA GPU; {INSTALL}")
    if name == "mps" and not _mps():
        raise UserError(f"--device mps: torch {torch.__version__} sees no Apple GPU (MPS); pass --device cpu")
    return torch.device(name)


def moved(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (nested tuples, lists, dicts: a layer's keyword arguments,
    rotary tables among them) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(moved(o, device) for o in obj)
    if isinstance(obj, list):
        return [moved(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    return obj
