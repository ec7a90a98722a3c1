"""`chat` answers piped prompts with the bundled model's GGUF and stops at /exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from moe2gguf import chat as chat_mod
from moe2gguf.commands import chat_cmd


@pytest.fixture(scope="module")
def reference_gguf(tmp_path_factory, reference_model):
    from moe2gguf.exporter.export import export

    out = tmp_path_factory.mktemp("chat") / "ref-q8_0.gguf"
    export(str(reference_model), str(out), "Q8_0", progress=False)
    return out


def test_chat_answers_a_piped_prompt_and_exits_cleanly(reference_gguf):
    r = subprocess.run(
        [sys.executable, "-m", "moe2gguf.cli", "chat", str(reference_gguf), "--max-tokens", "24", "--temperature", "0"],
        input="def read_config(path):\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the model said nothing"
    assert "Traceback" not in r.stderr


def test_each_line_is_one_turn_and_exit_stops(monkeypatch, tmp_path):
    turns: list[list[dict]] = []

    class FakeLlama:
        metadata = {"tokenizer.chat_template": "x"}

        def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
            return list(text)  # a message must fit the context: one token per byte here

    def fake_stream(llm, messages, max_tokens, temperature):
        turns.append([dict(m) for m in messages])
        yield f"reply {len(turns)}"

    monkeypatch.setattr(chat_mod, "open_gguf", lambda *a: FakeLlama())
    monkeypatch.setattr(chat_mod, "require_gguf", lambda p: p)  # the file below is a stand-in
    monkeypatch.setattr(chat_mod, "reply_stream", fake_stream)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    res = CliRunner().invoke(chat_cmd, [str(gguf)], input="first\n\nsecond\n/exit\nnever\n")
    assert res.exit_code == 0, res.output
    assert [t[-1]["content"] for t in turns] == ["first", "second"]
    assert turns[1][1] == {"role": "assistant", "content": "reply 1"}  # history carries the earlier reply
    assert "reply 2" in res.output


def test_chat_on_a_missing_file_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moe2gguf.cli", "chat", str(tmp_path / "nope.gguf")], input="", capture_output=True, text=True)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
