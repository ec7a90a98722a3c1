"""The command line answers at once and the packages stay layered.

`--help` must not load torch, transformers, safetensors or llama.cpp (seconds each), the
group help must list every verb, a verb must still reach its implementation, and
`moe2gguf.exporter` must never import `moe2gguf.prune` (prune uses the exporter's sizing,
so the reverse would be a cycle).
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from moe2gguf.commands import VERBS
from moe2gguf.options import QUANT_TYPES

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = ROOT / "moe2gguf" / "data" / "reference-moe"
HEAVY = ("torch", "transformers", "safetensors", "llama_cpp")
VERB_NAMES = ["inspect", "calibrate", "prune", "export", "check", "run", "chat", "demo"]


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: sys.modules starts empty, as for a user's command."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def _loaded_after(code: str) -> list[str]:
    """The top-level packages loaded once `code` has run in a fresh interpreter."""
    r = _python(code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_help_loads_no_heavy_library():
    helps = [["--help"]] + [[v, "--help"] for v in VERB_NAMES]
    code = (
        "from moe2gguf.cli import main\n"
        f"for argv in {helps!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (argv, e.code)\n"
    )
    loaded = _loaded_after(code)
    assert [m for m in HEAVY if m in loaded] == []


def test_group_help_lists_every_verb_with_its_summary():
    r = subprocess.run([sys.executable, "-m", "moe2gguf.cli", "--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(c.name for c in VERBS) == sorted(VERB_NAMES)
    listed = {line.split()[0]: line for line in r.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert sorted(listed) == sorted(VERB_NAMES)
    for cmd in VERBS:
        summary = cmd.get_short_help_str(limit=45).removesuffix("...")
        assert summary and summary in listed[cmd.name], (cmd.name, listed[cmd.name])


def test_verb_runs_its_implementation_when_called():
    r = subprocess.run([sys.executable, "-m", "moe2gguf.cli", "inspect", str(REF), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "Qwen3MoeForCausalLM" and info["experts_routed"] > 0


def test_verb_usage_error_is_one_line_without_loading_the_implementation():
    code = (
        "from moe2gguf.cli import main\n"
        "try:\n"
        "    main(['prune', 'M', '--calib', 'C', '--ratio', '2', '-o', 'O'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
    )
    assert [m for m in HEAVY if m in _loaded_after(code)] == []


def test_quant_types_are_llama_cpps():
    llama_cpp = pytest.importorskip("llama_cpp")
    theirs = {
        n.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_ALL_")
        for n in dir(llama_cpp)
        if n.startswith("LLAMA_FTYPE_") and n != "LLAMA_FTYPE_GUESSED"
    }
    assert sorted(QUANT_TYPES) == sorted(theirs)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_exporter_never_imports_prune():
    offenders = {
        f.name: sorted(m for m in _imports(f) if m == "moe2gguf.prune" or m.startswith("moe2gguf.prune."))
        for f in sorted((ROOT / "exporter").glob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _loaded_under(modules: list[str], package: str) -> list[str]:
    """Modules of `package` that importing `modules` (in a fresh interpreter) loads."""
    r = _python(f"import json, sys\nfor m in {modules!r}: __import__(m)\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith({package!r}))))")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pure_prune_modules_load_no_exporter():
    assert _loaded_under(["moe2gguf.prune.allocate", "moe2gguf.prune.scores"], "moe2gguf.exporter") == []


def test_exporter_loads_no_prune():
    exporter = [f"moe2gguf.exporter.{f.stem}" for f in sorted((ROOT / "exporter").glob("*.py")) if f.stem != "__init__"]
    assert _loaded_under(exporter, "moe2gguf.prune") == []
