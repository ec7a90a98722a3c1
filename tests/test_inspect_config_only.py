"""`inspect` on a folder holding config.json alone answers from the config (shapes from the
model built on the meta device, as `run --dry-run` plans), says that no weights were read,
and counts exactly what the same model's weights would."""

from __future__ import annotations

import json

from click.testing import CliRunner

from moe2gguf.cli import cli
from moe2gguf.inspect import inspect_model
from test_tokenizer_real import build_published, shrunk_config

COUNTS = ("params_total", "params_routed_experts", "params_shared_experts", "params_active_per_token", "experts_routed", "layers")


def test_config_only_folder_is_answered_from_the_config(tmp_path):
    full = build_published("DeepSeek-V2-Lite", tmp_path / "with-weights")
    bare = tmp_path / "config-only"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(shrunk_config("DeepSeek-V2-Lite")))
    got, want = inspect_model(str(bare)), inspect_model(str(full))
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    assert got["weights_read"] is False and got["file_bytes"] == 0 and want["weights_read"] is True
    res = CliRunner().invoke(cli, ["inspect", str(bare)])
    assert res.exit_code == 0, res.output
    assert "no weights were read" in res.output


def test_bin_weights_are_still_refused_with_the_conversion_hint(tmp_path):
    bare = tmp_path / "bin-only"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(shrunk_config("DeepSeek-V2-Lite")))
    (bare / "pytorch_model.bin").write_bytes(b"\0" * 16)
    res = CliRunner().invoke(cli, ["inspect", str(bare)])
    assert res.exit_code == 2 and ".bin" in res.output, res.output
