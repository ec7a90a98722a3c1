"""Benchmark (not a test): upstream parity for every supported family: tensors, logits,
tokenizer and metadata.

    python tools/parity_families.py [--llama-cpp DIR] [--only NAME ...] [--details]

Runs llama.cpp's own convert_hf_to_gguf.py (from DIR, or from the llama-cpp-python 0.3.36
sdist, downloaded once into the tests' cache) and our `export --quant F32` on each family's
checkpoint, then compares the two GGUFs: tensors (names, types, shapes), F32 logits in
llama-cpp-python, and every metadata key (tokenizer.* included): keys only one side writes and
keys whose values differ, token by token for the vocabulary arrays.

Checkpoints:
- each family's tiny model as its test builds it (tests/test_families.py: the real transformers
  config class, sharp attention, the bundled reference tokenizer). Upstream identifies
  pre-tokenizers by a hash of known tokenizers and does not know the reference one, so its
  get_vocab_base_pre answers "qwen2" (the reference tokenizer's regex) there;
- the published checkpoints tests/test_tokenizer_real.py and tests/test_fp8.py build (published
  config.json shrunk, random weights): DeepSeek-V2-Lite and Qwen1.5-MoE with their real
  tokenizers (rebuilt from llama.cpp's own vocab files; Qwen's as vocab.json + merges.txt),
  and DeepSeek-V3 in block FP8 (a trained tokenizer with V3's pre-tokenizer); upstream is
  told their pre-tokenizer names (deepseek-llm, qwen2, deepseek-v3: its hash of a sample
  text's ids, BOS included, does not see through the rebuilt files, whose tokenization
  tests/test_tokenizer_real.py checks against llama.cpp's own vectors instead). Mixtral with
  a SentencePiece tokenizer.model (tests/test_tokenizer_spm.py).

The differences it reports (2026-11, llama-cpp-python 0.3.36's converter), all deliberate
(README, "Tokenizers"); everything else (every tensor, every other key, the whole vocabulary
with its types, scores and merges) is equal:
- DeepSeek's non-special added tokens `<｜...｜>` (V3: 14 of them): upstream types them CONTROL
  because they look special; ours USER_DEFINED, as HF treats them: matched in plain text. With
  control types llama.cpp does not match them unless told to parse special tokens.
- Block FP8 (DeepSeek-V3 as published): ours rounds each dequantized weight to bf16 once, the
  values DeepSeek's own FP8->bf16 cast gives and every verb (calibrate, prune) works on;
  upstream keeps the float32 product. F32 logits of the tiny model: 6.0e-3 apart.
- `expert_gating_func`: ours always writes it, from the architecture; upstream only when
  config.json has a `scoring_func` key (conversion/base.py). transformers' DeepseekV3Config does
  not save one, so upstream's GGUF of a V3 checkpoint saved by transformers gates with
  llama.cpp's default, softmax, instead of V3's sigmoid (row "deepseek3": logits 3.3e-3 apart,
  while ours matches transformers to 2.8e-7, tests/test_families.py). With the key, as
  DeepSeek's released config.json has it (row "deepseek3 (+scoring_func)"): identical. For V2
  llama.cpp's default is V2's own softmax, so the extra key changes nothing there.
- `attention.key_length` / `value_length` (Qwen2-MoE, OLMoE, Mixtral): ours states the head
  size llama.cpp otherwise derives as n_embd / n_head; the same number.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))

from parity_upstream import BOOT  # noqa: E402  (tools/ is on the path above)
SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def tiny_families() -> list[tuple[str, Callable[[pathlib.Path], tuple[pathlib.Path, str]]]]:
    """(name, build(dir) -> (checkpoint, pre-tokenizer to tell upstream)) for each family's
    test model."""
    from conftest import build_tiny
    from test_families import FAMILIES as F
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM

    def tiny(cls: type, cfg: object, scoring_func: bool = False) -> Callable[[pathlib.Path], tuple[pathlib.Path, str]]:
        def build(d: pathlib.Path) -> tuple[pathlib.Path, str]:
            folder = build_tiny(cls, cfg, d / "tiny", attn_std=0.15)
            if scoring_func:  # see the docstring: upstream defaults to softmax without it
                c = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**c, "scoring_func": "sigmoid"}, indent=2))
            return folder, "qwen2"

        return build

    return [
        ("qwen2moe", tiny(Qwen2MoeForCausalLM, F["qwen2moe"].config())),
        ("olmoe", tiny(OlmoeForCausalLM, F["olmoe"].config())),
        ("mixtral", tiny(MixtralForCausalLM, F["mixtral"].config())),
        # upstream writes no q_lora_rank when it is absent, and llama.cpp then refuses a
        # 2-layer deepseek2; the q_lora variant is the one both converters can express
        ("deepseek2 (q_lora)", tiny(DeepseekV2ForCausalLM, F["deepseek-v2"].config(q_lora_rank=32))),
        ("deepseek3", tiny(DeepseekV3ForCausalLM, F["deepseek-v3"].config())),
        ("deepseek3 (+scoring_func)", tiny(DeepseekV3ForCausalLM, F["deepseek-v3"].config(), scoring_func=True)),
    ]


def published_families() -> list[tuple[str, Callable[[pathlib.Path], tuple[pathlib.Path, str]]]]:
    """The published-config checkpoints of the real-tokenizer and FP8 tests."""
    import test_fp8
    import test_tokenizer_real as real

    def v2_lite(d: pathlib.Path) -> tuple[pathlib.Path, str]:
        folder = real.build_published("DeepSeek-V2-Lite", d / "DeepSeek-V2-Lite", q_lora_rank=32)  # see tiny_families
        real.save_tokenizer(folder, *real.published_tokenizer_json(real.llama_cpp_models() / "ggml-vocab-deepseek-llm.gguf", real.PUBLISHED["deepseek-v2"]))
        return folder, "deepseek-llm"

    def qwen(d: pathlib.Path) -> tuple[pathlib.Path, str]:
        folder = real.build_published("Qwen1.5-MoE-A2.7B", d / "Qwen1.5-MoE-A2.7B")
        real.save_vocab_merges(folder, real.published_tokenizer_json(real.llama_cpp_models() / "ggml-vocab-qwen2.gguf", real.PUBLISHED["qwen2"])[0])
        return folder, "qwen2"

    def v3_fp8(d: pathlib.Path) -> tuple[pathlib.Path, str]:
        return test_fp8.make_pair(d)[0], "deepseek-v3"

    def mixtral_spm(d: pathlib.Path) -> tuple[pathlib.Path, str]:
        import test_tokenizer_spm as tspm
        from conftest import REFERENCE, build_tiny
        from test_families import FAMILIES
        from transformers import MixtralForCausalLM

        text = d / "spm.txt"
        text.write_text((REFERENCE / "calib.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
        sp_dir = d / "spm"
        sp_dir.mkdir()
        n = tspm.save_spm_tokenizer(sp_dir, text)
        folder = build_tiny(MixtralForCausalLM, FAMILIES["mixtral"].config(vocab_size=n), d / "mixtral-spm", attn_std=0.15)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / f).unlink(missing_ok=True)
        for f in sp_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder, ""

    return [
        ("DeepSeek-V2-Lite (real tokenizer, q_lora)", v2_lite),
        ("Qwen1.5-MoE (vocab.json + merges.txt)", qwen),
        ("DeepSeek-V3 (block FP8)", v3_fp8),
        ("Mixtral (SentencePiece)", mixtral_spm),
    ]


def upstream_copy(folder: pathlib.Path, d: pathlib.Path) -> pathlib.Path:
    """The checkpoint as upstream is given it: without config.json's auto_map, which names
    remote-code files (configuration_deepseek.py, ...) that a published repo has and these
    checkpoints do not; under transformers 5 upstream's AutoTokenizer call fails on it."""
    cfg = json.loads((folder / "config.json").read_text())
    if "auto_map" not in cfg:
        return folder
    out = d / "upstream" / folder.name  # the same folder name: upstream derives general.name from it
    out.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "auto_map"}, indent=2))
    return out


def metadata(path: pathlib.Path) -> dict[str, object]:
    import gguf

    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k not in SKIP_KEYS}


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def metadata_diff(up: dict[str, object], ours: dict[str, object]) -> list[str]:
    """One line per key that only one side writes or whose values differ (arrays element by
    element: how many differ and the first few)."""
    out = []
    for k in sorted(set(up) | set(ours)):
        if k not in ours:
            out.append(f"only upstream: {k} = {_short(up[k])}")
        elif k not in up:
            out.append(f"only ours: {k} = {_short(ours[k])}")
        elif isinstance(up[k], list) and isinstance(ours[k], list):
            a, b = up[k], ours[k]
            diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
            if diff or len(a) != len(b):
                first = ", ".join(f"[{i}] {_short(a[i])} vs {_short(b[i])}" for i in diff[:3])
                out.append(f"differs: {k}: {len(diff)} of {len(a)} entries (lengths {len(a)}/{len(b)}) {first}")
        elif up[k] != ours[k]:
            out.append(f"differs: {k}: upstream {_short(up[k])}, ours {_short(ours[k])}")
    return out


def compare(root: pathlib.Path, name: str, folder: pathlib.Path, pre: str, tmp: pathlib.Path) -> tuple[list[str], list[str]]:
    """(row cells, metadata differences) for one checkpoint."""
    from parity_upstream import logits, tensors
    from transformers import AutoTokenizer

    from moe2gguf.exporter.export import export

    up, ours = tmp / f"{folder.name}-upstream.gguf", tmp / f"{folder.name}-ours.gguf"
    export(str(folder), str(ours), "F32", progress=False)
    r = subprocess.run([sys.executable, "-c", BOOT, str(root), str(upstream_copy(folder, tmp)), str(up), pre, "f32"], capture_output=True, text=True)
    if r.returncode or not up.is_file():
        from moe2gguf.subproc import failure

        return [name, "-", "-", "-", "upstream failed: " + failure(r)[:120]], []
    tu, to = tensors(up), tensors(ours)
    only = sorted(set(tu) ^ set(to))
    differ = sorted(n for n in set(tu) & set(to) if tu[n] != to[n])
    tcell = f"{len(tu)} / {len(to)}; only one: {len(only)}; type/shape differ: {len(differ)}"
    ids = AutoTokenizer.from_pretrained(folder)("def main(argv):\n    return 0  # The quick brown fox 1234. " * 4)["input_ids"][:64]
    lu, lo = logits(up, ids), logits(ours, ids)
    diff = float(np.abs(lu - lo).max())
    meta = metadata_diff(metadata(up), metadata(ours))
    tok = [m for m in meta if "tokenizer." in m]
    verdict = "PARITY" if not only and not differ and diff == 0 and not meta else "differs"
    return [name, tcell, f"{diff:.2e}", f"{len(meta)} keys ({len(tok)} tokenizer)", verdict], meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=pathlib.Path, help="unpacked llama.cpp source (default: the llama-cpp-python sdist)")
    ap.add_argument("--only", nargs="*", help="run only the checkpoints whose name contains one of these")
    ap.add_argument("--details", action="store_true", help="list every differing metadata key")
    a = ap.parse_args(argv)
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="parity-families-") as d:
        tmp = pathlib.Path(d)
        if a.llama_cpp:
            root = a.llama_cpp
        else:
            import test_tokenizer_real

            root = test_tokenizer_real.llama_cpp_source()
        for i, (name, build) in enumerate(tiny_families() + published_families()):
            if a.only and not any(s in name for s in a.only):
                continue
            (tmp / str(i)).mkdir()
            folder, pre = build(tmp / str(i))
            row, meta = compare(root, name, folder, pre, tmp / str(i))
            rows.append(row)
            details[name] = meta
            print(" | ".join(row), flush=True, file=sys.stderr)
    print("| checkpoint | tensors upstream / ours | logits max abs diff | metadata keys differing | verdict |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for name, meta in details.items():
        if meta and (a.details or len(meta) <= 12):
            print(f"\n{name}:")
            for m in meta:
                print(f"  {m}")
        elif meta:
            print(f"\n{name}: {len(meta)} differing keys (--details lists them)")


if __name__ == "__main__":
    main()
