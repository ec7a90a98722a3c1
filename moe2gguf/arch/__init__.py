"""Architecture registry: one short file per MoE family, looked up by the HF class name.

Modules are imported eagerly (no lazy map that could disagree with the decorators).
"""

from __future__ import annotations

from moe2gguf.arch.base import EXPERT_PARTS, MoEArch, ParamCounts
from moe2gguf.errors import UserError

_REGISTRY: dict[str, type[MoEArch]] = {}
_BY_MODEL_TYPE: dict[str, type[MoEArch]] = {}


def register(cls: type[MoEArch]) -> type[MoEArch]:
    for name in cls.hf_architectures:
        if name in _REGISTRY:
            raise TypeError(f"{name} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        _REGISTRY[name] = cls
    _BY_MODEL_TYPE[cls.model_type] = cls
    return cls


def supported() -> list[str]:
    return sorted(_REGISTRY)


def arch_for_config(config: dict) -> MoEArch:
    """The registered architecture of a config.json; UserError naming what is supported."""
    if not isinstance(config, dict):
        raise UserError(f"config is a {type(config).__name__}, not a mapping of keys to values; restore the original config.json")
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(config.get("model_type", ""), str):
        raise UserError("config keys architectures (a list of class names) or model_type (a name) have the wrong type; restore the original config.json")
    cls = next((_REGISTRY[n] for n in names if n in _REGISTRY), None)
    if cls is None:
        cls = _BY_MODEL_TYPE.get(config.get("model_type", ""))
    if cls is None:
        what = ", ".join(names) or f"model_type {config.get('model_type')!r}"
        raise UserError(f"unsupported architecture {what}; moe2gguf supports {', '.join(supported())}")
    arch = cls(config)
    if not arch.n_experts or not arch.moe_layers:
        raise UserError(
            f"{names[0] if names else arch.model_type} checkpoint has no routed experts (a dense model); "
            "moe2gguf prunes Mixture-of-Experts models only"
        )
    return arch


from moe2gguf.arch import deepseek, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: E402,F401  (register themselves)

__all__ = ["EXPERT_PARTS", "MoEArch", "ParamCounts", "arch_for_config", "register", "supported"]
