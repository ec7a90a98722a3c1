"""Multiple-choice task accuracy (`check --task`): the three llama-perplexity formats read and
validated (bad files exit 2 with one line), tasks chosen in llama-perplexity's order, scores
equal to a direct PyTorch computation, the GGUF and PyTorch backends choosing the same
answers on the bundled task, and `--base` agreement."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moe2gguf.cli import cli
from moe2gguf.errors import UserError
from moe2gguf.exporter import tasks as T
from moe2gguf.exporter.check import check
from moe2gguf.exporter.export import export
from moe2gguf.exporter.task_runner import score_llama, score_torch

REF = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"
BUNDLED = REF / "task-line-ending.txt"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOE2GGUF_CACHE", str(d))
    yield d
    mp.undo()


def hs_file(path: pathlib.Path, tasks: list[tuple[str, int, list[str]]]) -> pathlib.Path:
    path.write_text("".join(f"{c}\n{g}\n" + "".join(e + "\n" for e in ends) for c, g, ends in tasks), encoding="utf-8")
    return path


HS = [
    ("def add(a, b):", 0, ["return a + b", "import os", "class Foo:", "while True:"]),
    ("for i in", 2, ["range(", "self.x", "items():", "pass"]),
    ("if name ==", 1, ["0", "'__main__':", "None:", "x"]),
]


# --- llama-perplexity's random draws ------------------------------------------------------


def test_mt19937_is_the_cpp_standard_engine():
    # C++11 [rand.predef]: the 10000th output of a default-constructed (seed 5489) mt19937
    rng = T.MT19937(5489)
    out = [rng() for _ in range(10000)]
    assert out[0] == 3499211612 and out[-1] == 4123659995


def test_task_selection_replays_libstdcxx_draws():
    # printed by g++ 12 (the compiler llama-cpp-python builds llama.cpp with) for mt19937(1):
    # uniform_int_distribution<size_t>(0, 49 - i)(rng) for i < 20 (hellaswag), and
    # aux[int(scale * rng() * aux.size())] with float scale = 1/(1.f + max()) (winogrande,
    # multiple-choice)
    dist = [20, 48, 34, 43, 0, 5, 13, 42, 6, 9, 3, 15, 7, 14, 12, 23, 13, 30, 17, 26]
    left = list(range(50))
    assert T.select("hellaswag", 50, 20) == [left.pop(k) for k in dist]
    assert T.select("winogrande", 50, 20) == [20, 48, 34, 43, 0, 5, 13, 42, 6, 9, 3, 15, 7, 14, 12, 23, 46, 30, 17, 26]
    assert T.select("multiple-choice", 50, 20) == T.select("winogrande", 50, 20)
    # all tasks: hellaswag is still shuffled (a permutation), the others keep file order
    perm = T.select("hellaswag", 50, None)
    assert sorted(perm) == list(range(50)) and perm != list(range(50))
    assert T.select("winogrande", 7, None) == list(range(7)) == T.select("multiple-choice", 7, 99)


# --- reading the three formats ------------------------------------------------------------


def test_hellaswag_file_is_read_in_llama_perplexity_order(tmp_path):
    fmt, tasks = T.read_tasks(hs_file(tmp_path / "hs.txt", HS))
    assert fmt == "hellaswag"
    assert [t.index for t in tasks] == T.select("hellaswag", 3, None)
    t = next(t for t in tasks if t.index == 1)
    assert t.context == "for i in" and t.choices[2] == "items():" and t.correct == (False, False, True, False)
    assert T.texts(fmt, t)[0] == "for i in range("


def test_winogrande_csv_quoting_header_and_dropped_last_row(tmp_path):
    f = tmp_path / "wg.csv"
    rows = ["index,sentence,option1,option2,answer", '0,"a, b _ c.",x,y,2', "1,The _ sat.,cat,dog,1", "2,Last _ row.,p,q,1"]
    f.write_text("\n".join(rows) + "\n")
    fmt, tasks = T.read_tasks(f)
    # the header is skipped; the last row is dropped, as llama-perplexity -f reads the file
    assert fmt == "winogrande" and len(tasks) == 2
    assert (tasks[0].context, tasks[0].after, tasks[0].choices, tasks[0].correct) == ("a, b ", " c.", ("x", "y"), (False, True))
    assert T.texts(fmt, tasks[1]) == ["The cat sat.", "The dog sat.", "The cat", "The dog"]
    f.write_text("\n".join(rows) + "\n\n")  # a blank line after the last row keeps it
    assert len(T.read_tasks(f)[1]) == 3


def test_multiple_choice_binary_round_trip_and_subset(tmp_path):
    spec = [(f"question {k}\nline two", [f"a{k}", f"b{k}", f"c{k}"], [int(j == k % 3) for j in range(3)]) for k in range(12)]
    f = tmp_path / "mc.bin"
    f.write_bytes(T.write_mc(spec))
    fmt, tasks = T.read_tasks(f)
    assert fmt == "multiple-choice" and [t.index for t in tasks] == list(range(12))
    assert tasks[4].context == "question 4\nline two" and tasks[4].choices == ("a4", "b4", "c4") and tasks[4].correct == (False, True, False)
    _, sub = T.read_tasks(f, n=5)  # read at the offsets of the tasks llama-perplexity draws
    assert [t.index for t in sub] == T.select("multiple-choice", 12, 5)
    assert all(t == tasks[t.index] for t in sub)


def _bad(tmp_path: pathlib.Path, case: str) -> tuple[pathlib.Path, list[str]]:
    f = tmp_path / f"{case}.task"
    fmt: list[str] = []
    lines = "".join(f"{c}\n{g}\n" + "".join(e + "\n" for e in ends) for c, g, ends in HS)
    if case == "line-count":
        f.write_text(lines + "one more\n")
    elif case == "gold":
        f.write_text(lines.replace("\n2\n", "\n7\n", 1))
    elif case == "utf8":
        f.write_bytes(lines.encode() + b"caf\xe9\n0\na\nb\nc\nd\n")
    elif case == "empty":
        f.write_text("\n\n")
    elif case == "csv-columns":
        f.write_text("0,The _ sat.,cat,1\n1,The _ ran.,cat,dog,1\n\n")
        fmt = ["--task-format", "winogrande"]
    elif case == "csv-answer":
        f.write_text("0,The _ sat.,cat,dog,3\n\n")
        fmt = ["--task-format", "winogrande"]
    elif case == "truncated":
        f.write_bytes(T.write_mc([("q", ["a", "b"], [1, 0]), ("q2", ["a", "b"], [0, 1])])[:-7])
    elif case == "labels":
        f.write_bytes(T.write_mc([("q", ["a", "b"], [0, 0])]))
    elif case == "missing":
        f = tmp_path / "nope.txt"
    return f, fmt


@pytest.mark.parametrize("case", ["line-count", "gold", "utf8", "empty", "csv-columns", "csv-answer", "truncated", "labels", "missing"])
def test_bad_task_file_exits_2_with_one_line(tmp_path, case):
    f, fmt = _bad(tmp_path, case)
    jf = tmp_path / "r.json"
    # the checkpoint is never loaded: the task file is read first
    res = CliRunner().invoke(cli, ["check", str(REF), "--task", str(f), *fmt, "--json", str(jf)])
    assert res.exit_code == 2, res.output
    out = res.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error:") and "Traceback" not in res.output
    assert str(f.name) in out[0] or case == "missing"
    assert not jf.exists()


def test_check_needs_text_or_task(tmp_path):
    res = CliRunner().invoke(cli, ["check", str(REF)])
    assert res.exit_code == 2 and "--task" in res.output and len(res.output.strip().splitlines()) == 1


def test_run_table_shows_task_accuracy_and_agreement():
    from moe2gguf.run import report_table

    base = {"ppl": 40.0, "file_bytes": 2**20, "peak_rss_bytes": 2**20, "prompt_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0}
    task = {"task": str(BUNDLED), "task_format": "hellaswag", "tasks": 300, "task_chance": 0.25, "acc": 0.42, "acc_se": 0.03}
    rows = [
        {**base, **task, "label": "unpruned F32", "acc_norm": 0.5067, "acc_norm_se": 0.0289, "agree": 1.0},
        {**base, **task, "label": "pruned Q4_K_M", "acc_norm": 0.4967, "acc_norm_se": 0.0289, "agree": 0.98},
    ]
    t = report_table(rows)
    assert "task acc %" in t and "50.7 ± 2.9" in t and "49.7 ± 2.9" in t and "98.0%" in t
    assert "300 hellaswag tasks, acc_norm" in t
    assert "task acc %" not in report_table([{**base, "label": "x"}])  # no task: no column


def test_task_only_report_is_replaced_by_the_next_check(tmp_path):
    from moe2gguf.errors import atomic_file

    out = tmp_path / "r.json"
    out.write_text(json.dumps({"backend": "llama.cpp", "model": "m.gguf", "task_format": "hellaswag", "acc": 0.5}))  # no ppl
    with atomic_file(out, "check") as tmp:
        tmp.write_text(json.dumps({"backend": "llama.cpp", "acc": 0.6}))
    assert json.loads(out.read_text())["acc"] == 0.6


# --- scoring ------------------------------------------------------------------------------


def test_winogrande_plan_keeps_llama_perplexity_first_logit_of_option_2():
    task = T.Task(0, "ab ", ("x", "y"), (True, False), "c")
    # 2 trailing tokens only, so the whole sentence after the shared prefix is scored
    toks = [[1, 2, 3, 4, 5], [1, 2, 3, 6, 5], [1, 2, 3, 4], [1, 2, 3, 6]]
    p = T.plan("winogrande", task, toks)
    assert p.prefix == 3
    first_2 = p.requests[p.groups[1][0]]
    assert first_2 == (0, 4, 6)  # sentence 1's last position, predicting option 2's token
    assert [p.requests[i] for i in p.groups[0]] == [(0, 2, 4)]  # last token left out


def test_pack_fills_batches_as_llama_perplexity():
    # 4-choice tasks of 10 + 4 x 5 = 30 tokens: 8 fit 32 sequences, 3 fit 100 tokens
    p = T.Plan([[1] * 15, [2] * 15, [3] * 15, [4] * 15], 10, [], [])
    assert p.tokens == 30
    assert [list(r) for r in T.pack("hellaswag", [p] * 10, 32, 10_000)] == [list(range(8)), [8, 9]]
    assert [len(r) for r in T.pack("hellaswag", [p] * 7, 32, 100)] == [3, 3, 1]
    with pytest.raises(UserError, match="needs 30 tokens"):
        T.pack("hellaswag", [p], 32, 20)


@torch.no_grad()
def _direct(model_dir: pathlib.Path, fmt: str, tasks: list[T.Task]) -> list[tuple[int, int]]:
    """(choice by summed log-prob, choice by mean log-prob) from one full forward pass per
    choice, for tasks whose choices all have more than 3 tokens of their own."""
    from transformers import AutoTokenizer

    from moe2gguf.modeling import load_model

    model, _, _ = load_model(str(model_dir), torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for t in tasks:
        seqs = [tok(s)["input_ids"] for s in T.texts(fmt, t)]
        n = len(t.choices)
        cp = 0
        while all(len(s) > cp for s in seqs[:n]) and len({s[cp] for s in seqs[:n]}) == 1:
            cp += 1
        sums, means = [], []
        for c in range(n):
            s = seqs[c]
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1)
            if fmt == "winogrande":  # tokens after the option, the last one left out
                first, last = len(seqs[n + c]), len(s) - 1
            else:
                first, last = cp, len(s)
            vals = [lp[j - 1, s[j]].item() for j in range(first, last)]
            sums.append(sum(vals))
            means.append(sum(vals) / len(vals))
        out.append((int(np.argmax(sums)), int(np.argmax(means))))
    return out


def test_scores_equal_a_direct_pytorch_computation(tiny_qwen3moe, tmp_path):
    _, hs = T.read_tasks(hs_file(tmp_path / "hs.txt", HS))
    # in this process (the child process itself is exercised on the bundled task below)
    got = [T.Scored(**d) for d in score_torch(str(tiny_qwen3moe), "hellaswag", hs, threads=1)]
    want = _direct(tiny_qwen3moe, "hellaswag", hs)
    assert [(s.chosen, s.chosen_norm) for s in got] == want
    assert [s.correct_norm for s in got] == [t.correct[w[1]] for t, w in zip(hs, want)]
    f = tmp_path / "wg.csv"
    f.write_text('0,"The _ sat on the mat near the door today.",black cat,old dog,1\n1,"We _ it in the big box by the window.",put,kept,2\n\n')
    _, wg = T.read_tasks(f)
    got = [T.Scored(**d) for d in score_torch(str(tiny_qwen3moe), "winogrande", wg, threads=1)]
    assert [s.chosen for s in got] == [w[1] for w in _direct(tiny_qwen3moe, "winogrande", wg)]


def test_summary_standard_error_is_llama_perplexity_formula():
    items = [T.Scored(i, 0, 0, i % 4 == 0, i % 2 == 0, 4) for i in range(40)]
    s = T.summary("hellaswag", items)
    assert s["tasks"] == 40 and s["acc"] == 0.25 and s["acc_norm"] == 0.5 and s["task_chance"] == 0.25
    assert math.isclose(s["acc_se"], math.sqrt(0.25 * 0.75 / 39)) and math.isclose(s["acc_norm_se"], math.sqrt(0.25 / 39))
    assert "acc_norm" not in T.summary("winogrande", items)


# --- both backends on the bundled task ----------------------------------------------------

N = 40


@pytest.fixture(scope="module")
def f32(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("gguf") / "ref-f32.gguf"
    export(str(REF), str(out), "F32", progress=False)
    return out


def test_bundled_task_backends_agree_and_base_agreement(f32, tmp_path, cache):
    from moe2gguf.exporter.check import base_task_results

    # through the CLI, against the PyTorch checkpoint as --base (its outcomes are cached)
    jf = tmp_path / "r.json"
    args = ["check", str(f32), "--task", str(BUNDLED), "--tasks", str(N), "--kv-type", "f32", "--threads", "1", "--base", str(REF), "--json", str(jf)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "acc_norm (llama-perplexity)" in res.output and "answers as --base" in res.output
    r = json.loads(jf.read_text())
    assert r["task_format"] == "hellaswag" and r["tasks"] == N and "ppl" not in r
    fmt, items = T.read_tasks(BUNDLED, n=N)
    g = [T.Scored(**d) for d in score_llama(str(f32), fmt, items, "f32", 1)]  # in this process
    assert len(list(cache.glob("base-tasks-*.npz"))) == 1
    t = base_task_results(str(REF), str(BUNDLED), fmt, items, "f32", 1)  # from the cache
    # the two backends choose the same answers (F32 weights, F32 KV cache)
    same = np.mean([a.chosen_norm == b.chosen_norm for a, b in zip(g, t)])
    assert same >= 0.95, same
    sg, st = T.summary(fmt, g), T.summary(fmt, t)
    assert abs(sg["acc_norm"] - st["acc_norm"]) <= 0.03
    assert sg["acc_norm"] > 0.35  # the unpruned model is well above chance (25%) on it
    # the report: llama.cpp's numbers, and --base agreement equal to the task-by-task share
    assert r["acc_norm"] == sg["acc_norm"] and r["acc"] == sg["acc"] and r["acc_se"] > 0
    assert r["agree"] == same
    # a model that is its own base (run's first row) agrees fully and leaves its outcomes
    # cached for the rows measured against it
    own = check(str(f32), None, base=str(f32), kv_type="f32", threads=1, task=str(BUNDLED), n_tasks=N)
    assert own["agree"] == 1.0 and own["acc_norm"] == sg["acc_norm"]
    assert len(list(cache.glob("base-tasks-*.npz"))) == 2
    assert base_task_results(str(f32), str(BUNDLED), fmt, items, "f32", 1) == g
