"""Recipes: a reproducible run as plain YAML, validated on load.

Unknown keys and bad values are errors that name the key. A recipe carries the model's
public architecture numbers (as the HF config.json spells them) so that a plan and a
predicted GGUF size can be made without the weights.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe2gguf.errors import UserError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'12GB' -> 12e9, '11.5GiB' -> 11.5 * 2**30, '123456' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 12GB, 11.5GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str
    architecture: str = Field(description="HF class name, as in config.json 'architectures'")
    path: str | None = Field(None, description="default local checkpoint folder (relative to the recipe)")
    config: dict[str, Any] = Field(description="public architecture numbers, HF config.json keys")

    @model_validator(mode="after")
    def _known_architecture(self) -> ModelSpec:
        from moe2gguf.arch import arch_for_config

        try:
            arch_for_config({**self.config, "architectures": [self.architecture]})
        except UserError as e:
            raise ValueError(str(e.message)) from None
        return self


class CalibrationSpec(_Strict):
    texts: list[str] = Field(min_length=1)
    tokens: int = Field(65536, gt=0)
    ctx: int = Field(512, ge=16)


class PruneSpec(_Strict):
    method: Literal["coverage", "uniform", "magnitude", "expert-drop"] = "coverage"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of routed-expert parameters removed")
    target_size: str | None = Field(None, description="GGUF size to land at or under, e.g. 12GB")
    layout: Literal["ragged", "llama.cpp"] = "llama.cpp"

    @field_validator("target_size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> PruneSpec:
        if (self.ratio is None) == (self.target_size is None):
            raise ValueError("give exactly one of prune.ratio and prune.target_size")
        return self


class ExportSpec(_Strict):
    quant: str = "Q4_K_M"
    imatrix: bool = True
    overrides: dict[str, str] = Field(default_factory=dict, description="tensor-name regex -> ggml type")


class CheckSpec(_Strict):
    text: str | None = None
    ctx: int = Field(256, ge=4)
    chunks: int | None = Field(None, gt=0)


class Recipe(_Strict):
    model: ModelSpec
    calibration: CalibrationSpec
    prune: PruneSpec
    export: ExportSpec = ExportSpec()
    check: CheckSpec = CheckSpec()
    reported: dict[str, float | str] = Field(default_factory=dict, description="published numbers to print next to ours")
    source: pathlib.Path | None = Field(None, exclude=True)

    def resolve(self, relpath: str | None) -> pathlib.Path | None:
        """Paths in a recipe are relative to the recipe file (symlinks resolved)."""
        if relpath is None:
            return None
        p = pathlib.Path(relpath)
        return p if p.is_absolute() or self.source is None else (self.source.parent / p).resolve()


def _where(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "recipe"


def load_recipe(path: str | pathlib.Path) -> Recipe:
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"recipe {p} does not exist; see recipes/*.yaml for examples")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a YAML mapping with model, calibration, prune, export, check")
    try:
        return Recipe(**data, source=p.resolve())
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            raise UserError(f"recipe {p}: unknown key '{_where(err)}'; check its spelling against recipes/reference-moe.yaml") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"recipe {p}: {_where(err)}: {msg}") from None
