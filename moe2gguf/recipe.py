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

from moe2gguf.arch import arch_for_config
from moe2gguf.errors import UserError
from moe2gguf.exporter.quantize import check_override, ftype_of
from moe2gguf.inputs import decode_utf8, first_line, read_bytes, regular_file
from moe2gguf.options import MAX_CTX, RENAMED

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
MAX_SIZE = 10**15
# Aliases a recipe may use: a few anchors that reference each other expand exponentially
# (a "billion laughs" document), and no real recipe needs more than a handful.
MAX_ALIASES = 32
MAX_RECIPE_BYTES = 1 << 20
# run folders are runs/<model.name>: a plain folder name, never a path
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'12GB' -> 12e9, '11.5GiB' -> 11.5 * 2**30, '123456' -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"{text!r} is not a size; write e.g. 12GB, 11.5GiB or a number of bytes")
        n = float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]
    if not 0 < n <= MAX_SIZE:
        raise ValueError(f"{text!r} is not a size between 1 byte and 1 PB; write e.g. 12GB, 11.5GiB or a number of bytes")
    return int(n)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "0.5" or true is not a number in a recipe


class ModelSpec(_Strict):
    name: str = Field(description="names the run folder runs/<name>: letters, digits, . _ + -")
    architecture: str = Field(description="HF class name, as in config.json 'architectures'")
    path: str | None = Field(None, description="default local checkpoint folder (relative to the recipe)")
    config: dict[str, Any] = Field(description="public architecture numbers, HF config.json keys")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a plain folder name (letters, digits, . _ + -, no path separators, not starting with a dot); the run folder is runs/<name>")
        return v

    @model_validator(mode="after")
    def _known_architecture(self) -> ModelSpec:
        try:
            arch_for_config({**self.config, "architectures": [self.architecture]})
        except UserError as e:
            raise ValueError(str(e.message)) from None
        return self


class CalibrationSpec(_Strict):
    texts: list[str] = Field(min_length=1)
    tokens: int = Field(65536, gt=0)
    ctx: int = Field(512, ge=16, le=MAX_CTX)
    gram: bool = Field(True, description="keep the refit's Gram matrices (false: calibrate --no-gram, and prune skips the refit)")


class PruneSpec(_Strict):
    method: Literal["coverage", "uniform", "magnitude", "reap", "frequency"] = "coverage"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of routed-expert parameters removed")
    target_size: str | None = Field(None, description="GGUF size to land at or under, e.g. 12GB")
    layout: Literal["ragged", "llama.cpp"] = "llama.cpp"

    @field_validator("method", mode="before")
    @classmethod
    def _renamed_method(cls, v: object) -> object:
        if isinstance(v, str) and v in RENAMED:
            raise ValueError(RENAMED[v])
        return v

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

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        try:
            ftype_of(v)
        except UserError as e:
            raise ValueError(str(e.message).replace("--quant ", "")) from None
        return v

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, v: dict[str, str]) -> dict[str, str]:
        for pattern, typ in v.items():
            try:
                check_override(pattern, typ)
            except UserError as e:
                raise ValueError(f"{pattern!r}: {e.message}") from None
        return v


class CheckSpec(_Strict):
    text: str | None = None
    ctx: int = Field(256, ge=4, le=MAX_CTX, multiple_of=2)  # the bounds of `check --ctx`, before any step runs
    chunks: int | None = Field(None, gt=0)
    task: str | None = Field(None, description="multiple-choice task file in a llama-perplexity format")
    tasks: int | None = Field(None, gt=0, description="score this many of its tasks (default: all)")


class Recipe(_Strict):
    model: ModelSpec
    calibration: CalibrationSpec
    prune: PruneSpec
    export: ExportSpec = ExportSpec()
    check: CheckSpec = CheckSpec()
    reported: dict[str, float | str] = Field(default_factory=dict, description="published numbers to print next to ours")
    source: pathlib.Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _exportable(self) -> Recipe:
        # every run exports the pruned checkpoint; ragged widths would be zero-padded to the
        # widest, which is exact but saves nothing
        p = self.prune
        if p.method == "coverage" and p.layout == "ragged" and p.target_size is None:
            raise ValueError("prune.layout ragged gives every expert its own width, which llama.cpp stores zero-padded (nothing saved); use layout: llama.cpp")
        return self

    def check_files(self) -> None:
        """The texts the run will read exist as regular files, checked before any step runs."""
        fix = f"fix the path in recipe {self.source} (relative paths are relative to the recipe)"
        for t in self.calibration.texts:
            regular_file(self.resolve(t), "calibration text", fix)
        if self.check.text is None:
            raise UserError(f"recipe {self.source} has no check.text; add the evaluation text the run is measured on")
        regular_file(self.resolve(self.check.text), "check.text", fix)
        if self.check.task is not None:
            regular_file(self.resolve(self.check.task), "check.task", fix)

    def resolve(self, relpath: str | None) -> pathlib.Path | None:
        """Paths in a recipe are relative to the recipe file (symlinks resolved)."""
        if relpath is None:
            return None
        p = pathlib.Path(relpath)
        return p if p.is_absolute() or self.source is None else (self.source.parent / p).resolve()


class _Loader(yaml.SafeLoader):
    """yaml's SafeLoader (no tags that build objects) refusing more than MAX_ALIASES aliases."""

    def compose_node(self, parent, index):  # noqa: ANN001,ANN201 - yaml's signature
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name): expand them; a recipe needs none")
        return super().compose_node(parent, index)


def _where(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "recipe"


def load_recipe(path: str | pathlib.Path) -> Recipe:
    p = pathlib.Path(path)
    fix = "see recipes/*.yaml for examples"
    text = decode_utf8(read_bytes(p, "recipe", fix, MAX_RECIPE_BYTES), "recipe", p, fix)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader, with aliases bounded
    except yaml.YAMLError as e:
        raise UserError(f"recipe {p} is not valid YAML ({first_line(e)})") from None
    except RecursionError:
        raise UserError(f"recipe {p} is nested too deeply; {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a YAML mapping with model, calibration, prune, export, check")
    odd = next((k for k in data if not isinstance(k, str) or k == "source"), None)
    if odd is not None:  # `source` is where the recipe was read from, never a key of its own
        raise UserError(f"recipe {p}: unknown key '{odd}'; check its spelling against recipes/reference-moe.yaml")
    try:
        return Recipe.model_validate({**data, "source": p.resolve()})
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            raise UserError(f"recipe {p}: unknown key '{_where(err)}'; check its spelling against recipes/reference-moe.yaml") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"recipe {p}: {_where(err)}: {msg}") from None
