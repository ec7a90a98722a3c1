"""Build a multiple-choice task from held-out Python source, in a llama-perplexity format.

    python tools/make_task.py                        # the bundled task (hellaswag format)
    python tools/make_task.py --format winogrande -n 200 -o /tmp/wg.csv
    python tools/make_task.py --format multiple-choice -n 200 -o /tmp/mc.bin

The text is the reference model's held-out eval.txt (Python standard-library files it never
trained on). Each task is one line of code cut at a space near its middle:

- hellaswag ("finish the line"): the context is the line's first part (a hellaswag context
  is one line), the 4 endings are its true rest and the rests of 3 other lines within
  WINDOW lines of it (so, mostly, of the same file); context + " " + ending is the line.
- multiple-choice: as hellaswag, with the PREVIOUS lines before the cut line in the question
  (the binary format holds newlines).
- winogrande: an identifier of the line is blanked (the first "_" of the sentence, as
  llama-perplexity reads it); the options are it and another identifier of nearby lines.

Deterministic: one seeded random.Random, lines taken in file order.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

REF = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"
BUNDLED = REF / "task-line-ending.txt"
WINDOW = 40  # distractors come from lines at most this far away
PREVIOUS = 4  # lines of context before the cut line (multiple-choice)
MIN_WORDS, MIN_LEN, MAX_LEN = 5, 32, 100
IDENT = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*\b")
KEYWORDS = set("and as assert break class continue def del elif else except False finally for from global if import in is lambda None nonlocal not or pass raise return True try while with yield self".split())


def usable(line: str) -> bool:
    """A line that reads the same to every parser: one physical line, printable, long enough."""
    body = line.strip()
    return (
        MIN_LEN <= len(body) <= MAX_LEN
        and len(body.split()) >= MIN_WORDS
        and not body.startswith("#")
        and len(line.splitlines()) == 1
        and line.isprintable()
    )


def cut(line: str) -> tuple[str, str] | None:
    """(first part, rest) at the single space nearest the middle of the line's text."""
    indent = len(line) - len(line.lstrip(" "))
    mid = indent + (len(line) - indent) // 2
    spaces = [i for i in range(indent + 1, len(line) - 1) if line[i] == " " and line[i - 1] != " " and line[i + 1] != " "]
    if not spaces:
        return None
    k = min(spaces, key=lambda i: (abs(i - mid), i))
    head, rest = line[:k], line[k + 1 :]
    return (head, rest) if len(rest) >= 8 and len(head.strip()) >= 8 else None


def line_tasks(lines: list[str], n: int, rng: random.Random, previous: int = 0) -> list[tuple[str, list[str], int]]:
    """(context, 4 endings, gold) for n cut lines spread over the text."""
    cuts = {i: c for i, ln in enumerate(lines) if usable(ln) and (c := cut(ln)) is not None}
    order = sorted(cuts)
    picked = sorted(rng.sample(order, min(len(order), 4 * n)))
    out = []
    for i in picked:
        head, rest = cuts[i]
        near = [cuts[j][1] for j in order if j != i and abs(j - i) <= WINDOW and cuts[j][1] != rest]
        near = sorted(set(near))
        if len(near) < 3:
            continue
        endings = rng.sample(near, 3)
        gold = rng.randrange(4)
        endings.insert(gold, rest)
        context = head
        if previous:
            context = "\n".join(lines[max(0, i - previous) : i] + [head])
        out.append((context, endings, gold))
    rng.shuffle(out)
    return out[:n]


def hellaswag(lines: list[str], n: int, rng: random.Random) -> str:
    rows = []
    for context, endings, gold in line_tasks(lines, n, rng):
        rows += [context, str(gold), *endings]
    return "\n".join(rows) + "\n"


def multiple_choice(lines: list[str], n: int, rng: random.Random) -> bytes:
    from moe2gguf.exporter.tasks import write_mc

    return write_mc([(q, e, [int(k == g) for k in range(4)]) for q, e, g in line_tasks(lines, n, rng, PREVIOUS)])


def winogrande(lines: list[str], n: int, rng: random.Random) -> str:
    """CSV rows index,"sentence with _",option1,option2,answer."""
    cands = []
    for i, ln in enumerate(lines):
        if not usable(ln) or '"' in ln or "\\" in ln or "0x" in ln:  # quotes break the CSV; skip codec tables
            continue
        first_us = ln.find("_")
        start = len(ln) - len(ln.lstrip()) + 8  # the blank needs text before it to be predicted from
        for m in IDENT.finditer(ln):
            if m.start() >= start and m.group() not in KEYWORDS and len(m.group()) >= 3 and (first_us < 0 or m.start() < first_us):
                cands.append((i, m))
                break  # one blank per line: the first identifier past the start and before any "_"
    picked = sorted(rng.sample(range(len(cands)), min(len(cands), 4 * n)))
    rows = []
    for k in picked:
        i, m = cands[k]
        ln = lines[i]
        names = {x.group() for j in range(max(0, i - WINDOW), min(len(lines), i + WINDOW + 1)) for x in IDENT.finditer(lines[j])}
        others = sorted(x for x in names if x != m.group() and x not in KEYWORDS and len(x) >= 3)
        if not others:
            continue
        wrong = rng.choice(others)
        answer = rng.randrange(1, 3)
        opts = (m.group(), wrong) if answer == 1 else (wrong, m.group())
        sentence = ln[: m.start()].lstrip() + "_" + ln[m.end() :]
        rows.append(f'"{sentence}",{opts[0]},{opts[1]},{answer}')
    rng.shuffle(rows)
    return "".join(f"{k},{r}\n" for k, r in enumerate(rows[:n]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=["hellaswag", "winogrande", "multiple-choice"], default="hellaswag")
    ap.add_argument("--text", type=pathlib.Path, default=REF / "eval.txt", help="held-out source text")
    ap.add_argument("-n", type=int, default=300, help="tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", type=pathlib.Path, help=f"default (hellaswag): {BUNDLED}")
    a = ap.parse_args(argv)
    out = a.output or (BUNDLED if a.format == "hellaswag" else None)
    if out is None:
        ap.error("give -o for a winogrande or multiple-choice file")
    lines = a.text.read_text(encoding="utf-8").split("\n")
    rng = random.Random(a.seed)
    if a.format == "multiple-choice":
        out.write_bytes(multiple_choice(lines, a.n, rng))
    else:
        body = hellaswag(lines, a.n, rng) if a.format == "hellaswag" else winogrande(lines, a.n, rng)
        out.write_text(body, encoding="utf-8")
    print(f"{out}: {a.format}, {a.n} tasks from {a.text.name}")


if __name__ == "__main__":
    main()
