"""Recipes are plain data, validated on load; bad ones fail naming the key."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from moe2gguf.errors import UserError
from moe2gguf.recipe import load_recipe, parse_size

RECIPES = sorted((pathlib.Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.model.config["num_hidden_layers"] > 0


def _write(tmp_path: pathlib.Path, mutate) -> pathlib.Path:
    data = yaml.safe_load((RECIPES[0].parent / "reference-moe.yaml").read_text())
    mutate(data)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_misspelled_key_is_named(tmp_path):
    p = _write(tmp_path, lambda d: d["prune"].update(ratoi=0.3))
    with pytest.raises(UserError, match="unknown key 'prune.ratoi'"):
        load_recipe(p)


def test_ratio_out_of_range_is_named(tmp_path):
    p = _write(tmp_path, lambda d: d["prune"].update(ratio=1.2))
    with pytest.raises(UserError, match=r"prune\.ratio: .*less than 1"):
        load_recipe(p)


def test_unknown_architecture_is_refused(tmp_path):
    p = _write(tmp_path, lambda d: d["model"].update(architecture="FancyMoeForCausalLM"))
    with pytest.raises(UserError, match="model: unsupported architecture FancyMoeForCausalLM"):
        load_recipe(p)


def test_ratio_and_target_size_are_exclusive(tmp_path):
    p = _write(tmp_path, lambda d: d["prune"].update(target_size="10MB"))
    with pytest.raises(UserError, match="exactly one of prune.ratio and prune.target_size"):
        load_recipe(p)


@pytest.mark.parametrize("text, n", [("12GB", 12 * 10**9), ("11.5GiB", int(11.5 * 2**30)), ("123456", 123456), ("7 MiB", 7 * 2**20)])
def test_sizes_parse_like_users_write_them(text, n):
    assert parse_size(text) == n


def test_bad_size_is_an_error():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("twelve gigs")
