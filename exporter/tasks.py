"""Multiple-choice tasks in llama-perplexity's three formats, scored as it scores them.

Pure parts only (no model, no torch): reading and validating the files, choosing the tasks
in llama-perplexity's order, what to tokenize, which log-probabilities to ask the model for,
and how they become a chosen answer and an accuracy. exporter/task_runner.py runs a model.

Formats (tools/perplexity/perplexity.cpp in the llama.cpp that llama-cpp-python 0.3.36 vendors):
- hellaswag (`--hellaswag`, read with -f): 6 lines per task: context, gold index (0-3),
  4 endings. Each choice is `context + " " + ending`; its score is the mean log-prob of the
  tokens after the tokens all 4 share. llama-perplexity reports that as `acc_norm`; `acc`
  here is the same choice by the sum of those log-probs (lm-evaluation-harness's `acc`).
- winogrande (`--winogrande`, read with -f): CSV rows `index,sentence with _,option1,option2,answer`.
  Each option fills the blank; the score is the mean log-prob of the tokens after the option
  (of the whole sentence when fewer than 4 tokens differ), leaving out the last token: `acc`.
- multiple-choice (`--multiple-choice`, read with -bf): llama.cpp's binary file (ARC, MMLU,
  TruthfulQA ...): scored as hellaswag with any number of answers; correct when the chosen
  answer's label is 1: `acc_norm`, with `acc` by the sum as for hellaswag.

Task order: llama-perplexity shuffles hellaswag tasks always (so the first N of a file are
not the N it scores), and picks N random winogrande/multiple-choice tasks when N < all, with
std::mt19937 seeded 1. `select` replays those draws (libstdc++'s uniform_int_distribution,
as in the GCC build llama-cpp-python compiles; single-precision arithmetic where
perplexity.cpp uses float), so `--tasks N` scores the same tasks in the same order.

Three quirks are kept because they change which tasks are scored or how: `-f` drops one
trailing newline and the CSV reader then drops the file's last row unless a blank line
follows it; winogrande scores the first token of option 2, when it has to score it, with the
logits at the end of sentence 1 (perplexity.cpp's "FIXME"). Where perplexity.cpp would read
past a vector's end (a choice with no token of its own), a choice scores at least its last
token instead.

Standard error: sqrt(p (1 - p) / (n - 1)), the formula llama-perplexity prints for
winogrande and multiple-choice (for hellaswag it prints a Wilson interval only).
"""

from __future__ import annotations

import math
import pathlib
import re
import struct
from dataclasses import dataclass

import numpy as np

from moe2gguf.errors import UserError
from moe2gguf.inputs import MAX_TEXT_BYTES, read_bytes
from moe2gguf.options import TASK_FORMATS

HELLASWAG_LINES = 6
MC_MAX_ANSWERS = 100  # perplexity.cpp rejects more answers than this per task
_WG_MIN_TRAILING = 3  # perplexity.cpp k_min_trailing_ctx
_CPP_SPACE = " \t\n\v\f\r"  # isspace in the C locale, what istream >> int skips


@dataclass(frozen=True)
class Task:
    """One task. `context` is hellaswag's context, the text before winogrande's blank, or
    the multiple-choice question; `after` is the text after winogrande's blank."""

    index: int  # 0-based position in the file
    context: str
    choices: tuple[str, ...]
    correct: tuple[bool, ...]
    after: str = ""

    def to_json(self) -> dict:
        return {"index": self.index, "context": self.context, "choices": list(self.choices), "correct": list(self.correct), "after": self.after}

    @classmethod
    def from_json(cls, d: dict) -> Task:
        return cls(d["index"], d["context"], tuple(d["choices"]), tuple(bool(c) for c in d["correct"]), d.get("after", ""))


# --- llama-perplexity's random draws -----------------------------------------------------


class MT19937:
    """std::mt19937: seeded by a 32-bit integer, 32-bit outputs (C++11 [rand.eng.mers])."""

    def __init__(self, seed: int):
        mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self._mt, self._i = mt, 624

    def __call__(self) -> int:
        mt = self._mt
        if self._i >= 624:
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self._i = 0
        y = mt[self._i]
        self._i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


def uniform_below(rng: MT19937, n: int) -> int:
    """std::uniform_int_distribution<size_t>(0, n - 1)(rng) as libstdc++ (GCC >= 11) draws it
    from a 32-bit engine: Lemire's multiply-and-reject."""
    product = rng() * n
    low = product & 0xFFFFFFFF
    if low < n:
        threshold = (0x100000000 - n) % n
        while low < threshold:
            product = rng() * n
            low = product & 0xFFFFFFFF
    return product >> 32


def select(fmt: str, n_total: int, n: int | None) -> list[int]:
    """File positions of the tasks llama-perplexity scores for `--<fmt>-tasks n`, in its order
    (n None: all of them)."""
    n = n_total if n is None else min(n, n_total)
    rng = MT19937(1)
    if fmt == "hellaswag":  # always shuffled: draw one of those left, remove it
        left = list(range(n_total))
        return [left.pop(uniform_below(rng, len(left))) for _ in range(n)]
    if n >= n_total:
        return list(range(n_total))
    # float scale = 1/(1.f + (float)rng.max()); j = int(scale*rng()*aux.size()), in float
    scale = np.float32(1.0) / (np.float32(1.0) + np.float32(0xFFFFFFFF))
    aux = list(range(n_total))
    out = []
    for _ in range(n):
        j = int(np.float32(scale * np.float32(rng())) * np.float32(len(aux)))
        j = min(j, len(aux) - 1)  # rng() rounding up to 2**32 would index past the end in C++
        out.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return out


# --- reading the files --------------------------------------------------------------------


def _bytes(path: pathlib.Path) -> bytes:
    # a pipe or a device is named as what it is (it "did not exist" before), and never read without end
    data = read_bytes(path, "task file", "pass a task file in llama-perplexity's hellaswag, winogrande or multiple-choice format", MAX_TEXT_BYTES)
    if not data.strip():
        raise UserError(f"task file {path} is empty; pass a file with at least one task")
    return data


def _utf8(path: pathlib.Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"task file {path} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None


def _lines_f(text: str) -> list[str]:
    """The lines getline() yields from a file read with `-f` (one trailing newline dropped)."""
    text = text[:-1] if text.endswith("\n") else text
    if not text:
        return []
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _mc_header(data: bytes) -> tuple[int, list[int]] | None:
    """(n_task, task positions) when `data` starts like a multiple-choice file."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack_from("<I", data, 0)
    if n == 0 or 4 + 4 * n > len(data):
        return None
    pos = list(struct.unpack_from(f"<{n}I", data, 4))
    return (n, pos) if pos[0] == 4 + 4 * n else None


_WG_ROW = re.compile(r"^[^,]*,.*_.*,.*,.*,[ \t\r]*[12][ \t\r]*$")


def detect_format(path: pathlib.Path, data: bytes) -> str:
    if _mc_header(data) is not None:
        return "multiple-choice"
    if path.suffix.lower() == ".csv":
        return "winogrande"
    if path.suffix.lower() == ".bin":
        return "multiple-choice"
    head = data[:4096].decode("utf-8", errors="replace").split("\n")
    if any(_WG_ROW.match(ln) for ln in head[:2]):
        return "winogrande"
    return "hellaswag"


def read_tasks(path: str | pathlib.Path, fmt: str | None = None, n: int | None = None) -> tuple[str, list[Task]]:
    """(format, the tasks llama-perplexity scores for `--<fmt>-tasks n`, in its order).
    Every malformed task is a UserError naming where it is."""
    p = pathlib.Path(path)
    if fmt is not None and fmt not in TASK_FORMATS:
        raise UserError(f"--task-format {fmt} is not one of {', '.join(TASK_FORMATS)}")
    if n is not None and n < 1:
        raise UserError(f"--tasks {n} must be at least 1")
    data = _bytes(p)
    fmt = fmt or detect_format(p, data)
    if fmt == "multiple-choice":
        return fmt, _read_mc(p, data, n)
    text = _utf8(p, data)
    tasks = _read_hellaswag(p, text) if fmt == "hellaswag" else _read_winogrande(p, text)
    return fmt, [tasks[i] for i in select(fmt, len(tasks), n)]


def _read_hellaswag(p: pathlib.Path, text: str) -> list[Task]:
    lines = _lines_f(text)
    if len(lines) % HELLASWAG_LINES:
        raise UserError(
            f"task file {p} has {len(lines)} lines, not a multiple of 6; the hellaswag format is 6 lines per task "
            "(context, gold index 0-3, 4 endings) — or pass --task-format for another format"
        )
    tasks = []
    for t in range(len(lines) // HELLASWAG_LINES):
        ctx, gold, *endings = lines[t * 6 : t * 6 + 6]
        g = gold.strip(_CPP_SPACE)
        if not g.isdigit() or int(g) > 3:
            raise UserError(f"task file {p}, line {t * 6 + 2} (task {t + 1}): gold index {gold.strip()!r} is not 0, 1, 2 or 3")
        tasks.append(Task(t, ctx, tuple(endings), tuple(i == int(g) for i in range(4))))
    return tasks


def _wg_fields(line: str) -> list[int]:
    """Positions of the first 4 commas outside double quotes (perplexity.cpp's scan)."""
    commas: list[int] = []
    quoted = False
    for i, ch in enumerate(line):
        if quoted:
            quoted = ch != '"'
        elif ch == ",":
            commas.append(i)
            if len(commas) == 4:
                break
        elif ch == '"':
            quoted = True
    return commas


def _wg_answer(field: str) -> int | None:
    m = re.match(rf"[{_CPP_SPACE}]*([+-]?\d+)", field)  # istream >> int: leading number only
    return int(m.group(1)) if m else None


def _read_winogrande(p: pathlib.Path, text: str) -> list[Task]:
    src = text[:-1] if text.endswith("\n") else text
    rows = src.split("\n")[:-1]  # getline sets eof on the last row (no newline after it): dropped
    tasks = []
    for ln, line in enumerate(rows, start=1):
        c = _wg_fields(line)
        where = f"task file {p}, line {ln}"
        if len(c) != 4:
            raise UserError(f"{where}: {len(c) + 1} comma-separated fields; winogrande rows are index,sentence,option1,option2,answer (quote a sentence holding commas)")
        sentence = line[c[0] + 2 : c[1] - 1] if line[c[0] + 1] == '"' else line[c[0] + 1 : c[1]]
        answer = _wg_answer(line[c[3] + 1 :])
        if ln == 1 and answer is None and _wg_answer(line[: c[0]]) is None:
            continue  # a header row (perplexity.cpp logs it as unparsable and goes on)
        if "_" not in sentence:
            raise UserError(f"{where}: the sentence has no _ to fill; mark the blank with _")
        if answer not in (1, 2):
            raise UserError(f"{where}: answer {line[c[3] + 1:].strip()!r} is not 1 or 2")
        at = sentence.index("_")
        choices = (line[c[1] + 1 : c[2]], line[c[2] + 1 : c[3]])
        tasks.append(Task(len(tasks), sentence[:at], choices, (answer == 1, answer == 2), sentence[at + 1 :]))
    if not tasks:
        raise UserError(f"task file {p} has no winogrande row that llama-perplexity reads (it drops the last row unless a newline ends it and another follows); add rows")
    return tasks


class _Truncated(Exception):
    pass


def _mc_string(data: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(data):
        raise _Truncated
    (size,) = struct.unpack_from("<I", data, at)
    if at + 4 + size > len(data):
        raise _Truncated
    return data[at + 4 : at + 4 + size], at + 4 + size


def _mc_answers(data: bytes, at: int) -> tuple[list[bytes], list[int], int]:
    if at + 4 > len(data):
        raise _Truncated
    (n,) = struct.unpack_from("<I", data, at)
    if n > MC_MAX_ANSWERS:
        raise ValueError(f"{n} answers, more than llama-perplexity's {MC_MAX_ANSWERS}")
    at += 4
    answers = []
    for _ in range(n):
        s, at = _mc_string(data, at)
        answers.append(s)
    if at + 4 * n > len(data):
        raise _Truncated
    labels = list(struct.unpack_from(f"<{n}i", data, at))
    return answers, labels, at + 4 * n


def _mc_task(p: pathlib.Path, data: bytes, at: int, k: int) -> tuple[Task, int]:
    where = f"task file {p}, task {k + 1} (byte {at})"
    try:
        q, at = _mc_string(data, at)
        answers, labels, at = _mc_answers(data, at)
        _, _, at = _mc_answers(data, at)  # mc2 (several correct answers): read, not scored
    except _Truncated:
        raise UserError(f"{where}: the file ends inside the task; it is truncated, write it again") from None
    except ValueError as e:
        raise UserError(f"{where}: {e}; this is not a llama-perplexity multiple-choice file") from None
    if not q or not answers or any(not a for a in answers):
        raise UserError(f"{where}: empty question or answer; every task needs a question and non-empty answers")
    if any(lab not in (0, 1) for lab in labels) or 1 not in labels:
        raise UserError(f"{where}: labels {labels} must be 0 or 1 with at least one 1 (the correct answer)")
    try:
        question, texts = q.decode("utf-8"), tuple(a.decode("utf-8") for a in answers)
    except UnicodeDecodeError:
        raise UserError(f"{where}: a string is not UTF-8; write the file with UTF-8 strings") from None
    return Task(k, question, texts, tuple(lab == 1 for lab in labels)), at


def _read_mc(p: pathlib.Path, data: bytes, n: int | None) -> list[Task]:
    head = _mc_header(data)
    if head is None:
        raise UserError(
            f"task file {p} is not a llama-perplexity multiple-choice file (a uint32 task count, then the tasks' byte "
            "offsets, the first just after them); pass --task-format for a text format"
        )
    n_task, pos = head
    bad = [i for i, x in enumerate(pos) if x >= len(data)]
    if bad:
        raise UserError(f"task file {p}: task {bad[0] + 1} starts at byte {pos[bad[0]]}, past the end ({len(data)} bytes); the file is truncated")
    if n is None or n >= n_task:  # perplexity.cpp reads them one after the other
        tasks, at = [], 4 + 4 * n_task
        for k in range(n_task):
            t, at = _mc_task(p, data, at, k)
            tasks.append(t)
        return tasks
    return [_mc_task(p, data, pos[k], k)[0] for k in select("multiple-choice", n_task, n)]


def write_mc(tasks: list[tuple[str, list[str], list[int]]]) -> bytes:
    """A multiple-choice file (question, answers, labels per task; no mc2 answers), laid out
    as perplexity.cpp reads it."""

    def s(b: str) -> bytes:
        e = b.encode("utf-8")
        return struct.pack("<I", len(e)) + e

    bodies = []
    for q, answers, labels in tasks:
        mc1 = struct.pack("<I", len(answers)) + b"".join(s(a) for a in answers) + struct.pack(f"<{len(labels)}i", *labels)
        bodies.append(s(q) + mc1 + struct.pack("<I", 0))
    pos, at = [], 4 + 4 * len(tasks)
    for b in bodies:
        pos.append(at)
        at += len(b)
    return struct.pack(f"<I{len(tasks)}I", len(tasks), *pos) + b"".join(bodies)


# --- scoring ------------------------------------------------------------------------------


def texts(fmt: str, task: Task) -> list[str]:
    """The strings to tokenize (with the model's special tokens, as common_tokenize does)."""
    if fmt == "winogrande":
        full = [task.context + c + task.after for c in task.choices]
        return full + [task.context + c for c in task.choices]
    return [task.context + " " + c for c in task.choices]


@dataclass(frozen=True)
class Plan:
    """What to evaluate for one task: the choices' token sequences, sharing `prefix` leading
    tokens; `requests[i] = (s, pos, tok)`: log p(tok | sequence s up to and with pos).
    Positions below `prefix` are the shared prefix (any s). `groups[c]`: the requests whose
    log-probs make choice c's score."""

    seqs: list[list[int]]
    prefix: int
    requests: list[tuple[int, int, int]]
    groups: list[list[int]]

    @property
    def tokens(self) -> int:
        """Tokens in its batch: the shared prefix once, then each choice's own tokens."""
        return self.prefix + sum(len(q) - self.prefix for q in self.seqs)


def pack(fmt: str, plans: list[Plan], n_seq_max: int, n_ctx: int) -> list[range]:
    """Consecutive tasks sharing one batch, as llama-perplexity packs them for `-np n_seq_max`
    (its context then holds n_ctx = n_seq_max x 512 tokens): as many as fit both the tokens
    and the sequences (one per choice; at most 4 x 32 per batch, 2 x 128 for winogrande)."""
    max_seq = min(2 * 128 if fmt == "winogrande" else 4 * 32, n_seq_max)
    out, i0 = [], 0
    while i0 < len(plans):
        n_cur = s0 = 0
        i1 = i0
        while i1 < len(plans) and n_cur + plans[i1].tokens <= n_ctx and s0 + len(plans[i1].seqs) <= max_seq:
            n_cur, s0, i1 = n_cur + plans[i1].tokens, s0 + len(plans[i1].seqs), i1 + 1
        if i1 == i0:
            raise UserError(
                f"a task needs {plans[i0].tokens} tokens and {len(plans[i0].seqs)} sequences in one batch, more than "
                f"{n_ctx} and {max_seq}; shorten its context or choices"
            )
        out.append(range(i0, i1))
        i0 = i1
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    for col in zip(*seqs):
        if any(t != col[0] for t in col):
            break
        n += 1
    return n


def plan(fmt: str, task: Task, toks: list[list[int]], where: str = "") -> Plan:
    n = len(task.choices)
    seqs = [list(t) for t in toks[:n]]
    cp = _common_prefix(seqs)
    if fmt != "winogrande":
        cp = min(cp, min(len(s) for s in seqs) - 1)  # every choice scores at least one token
    if cp < 1:
        raise UserError(f"task {task.index + 1}{where}: its choices differ from the first token, leaving nothing to predict them from; give the task a context")
    requests: list[tuple[int, int, int]] = []
    groups: list[list[int]] = []
    if fmt != "winogrande":
        for s, seq in enumerate(seqs):
            # the first token from the logits at the end of the shared prefix, then the rest
            idx = [len(requests)]
            requests.append((s, cp - 1, seq[cp]))
            for j in range(cp, len(seq) - 1):
                idx.append(len(requests))
                requests.append((s, j, seq[j + 1]))
            groups.append(idx)
        return Plan(seqs, cp, requests, groups)
    # winogrande: the batch outputs of perplexity.cpp are, in order, the end of the shared
    # prefix (k = 0), sentence 1's tokens after it, then sentence 2's; it indexes them
    # with k = (tokens of sentence 1 after the prefix) + j - prefix + 1 for sentence 2
    n0 = len(seqs[0])
    skip = all(len(s) - cp > _WG_MIN_TRAILING for s in seqs)

    def output(k: int, s: int, j: int) -> tuple[int, int]:
        if k < 0:  # perplexity.cpp reads before the batch here; use the true position
            return s, j
        if k == 0:
            return 0, cp - 1
        if k <= n0 - cp:
            return 0, cp + k - 1
        return 1, cp + k - (n0 - cp) - 1

    for s, seq in enumerate(seqs):
        base = len(toks[2 + s]) if skip else cp
        last = 1 if len(seq) - base > 1 else 0
        idx = []
        for j in range(base - 1, len(seq) - 1 - last):
            k = (j - cp + 1) + (n0 - cp if s == 1 else 0)
            idx.append(len(requests))
            requests.append((*output(k, s, j), seq[j + 1]))
        groups.append(idx)
    return Plan(seqs, cp, requests, groups)


@dataclass(frozen=True)
class Scored:
    """One task's outcome: the choice by sum of log-probs (`chosen`), by llama-perplexity's
    score (`chosen_norm`; the same for winogrande), and whether each is correct."""

    index: int
    chosen: int
    chosen_norm: int
    correct: bool
    correct_norm: bool
    n_choices: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _first_max(xs: list[float]) -> int:
    best = 0
    for i in range(1, len(xs)):
        if xs[i] > xs[best]:  # strict: the first of equal scores wins, as in perplexity.cpp
            best = i
    return best


def choose(fmt: str, task: Task, p: Plan, logprobs: list[float]) -> Scored:
    """Choices from the requested log-probs, accumulated in perplexity.cpp's precision
    (double for hellaswag, float for the others)."""
    acc_t = np.float64 if fmt == "hellaswag" else np.float32
    sums = [acc_t(0.0) for _ in p.groups]
    for c, idx in enumerate(p.groups):
        for i in idx:
            sums[c] = acc_t(sums[c] + acc_t(logprobs[i]))
    if fmt == "winogrande":
        means = []
        for c, idx in enumerate(p.groups):
            means.append(float(sums[c] / np.float32(len(idx))) if idx else math.nan)
        chosen = 0 if means[0] > means[1] else 1  # NaN and ties go to option 2, as in perplexity.cpp
        ok = task.correct[chosen]
        return Scored(task.index, chosen, chosen, ok, ok, 2)
    means = [float(sums[c] / acc_t(len(idx))) for c, idx in enumerate(p.groups)]
    by_sum, by_mean = _first_max([float(x) for x in sums]), _first_max(means)
    return Scored(task.index, by_sum, by_mean, task.correct[by_sum], task.correct[by_mean], len(p.groups))


def proportion_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def has_norm(fmt: str) -> bool:
    """Whether llama-perplexity reports the format's score as acc_norm (then `acc` is ours)."""
    return fmt != "winogrande"


def summary(fmt: str, items: list[Scored]) -> dict:
    """Report keys: tasks, acc, acc_se, acc_norm, acc_norm_se (hellaswag, multiple-choice),
    task_chance (the accuracy of picking at random)."""
    n = len(items)
    out: dict = {"tasks": n}
    acc = sum(s.correct for s in items) / n
    out["acc"], out["acc_se"] = acc, proportion_se(acc, n)
    if has_norm(fmt):
        norm = sum(s.correct_norm for s in items) / n
        out["acc_norm"], out["acc_norm_se"] = norm, proportion_se(norm, n)
    out["task_chance"] = n / sum(s.n_choices for s in items)
    return out


def agreement(items: list[Scored], base: list[Scored]) -> float:
    """Fraction of tasks where both models choose the same answer by llama-perplexity's score."""
    b = {s.index: s.chosen_norm for s in base}
    same = [s.chosen_norm == b[s.index] for s in items if s.index in b]
    if len(same) != len(items):
        raise UserError("the model and --base were scored on different tasks; score both on the same task file and --tasks")
    return sum(same) / len(same)
