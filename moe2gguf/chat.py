"""`moe2gguf chat`: talk to a GGUF through llama-cpp-python, with the GGUF's chat template.

Each line read is one user turn; the reply streams as it is generated. Works the same with a
terminal and with piped stdin, so it can be scripted:  echo "def fib(n):" | moe2gguf chat m.gguf
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator

import click

from moe2gguf.errors import UserError
from moe2gguf.inputs import first_line, require_gguf
from moe2gguf.llama_runtime import open_llama

EXIT_WORDS = {"/exit", "/quit"}
# llama-cpp-python's ValueErrors when a conversation no longer fits: its own check of the
# prompt, and its n_ctx-long token buffer overflowing while a reply is generated
OUTGROWN = ("context window", "could not broadcast")
MAX_LINE_BYTES = 1 << 20  # one message; a longer "line" is a stream without newlines
# For a GGUF without tokenizer.chat_template: a plain transcript the model can continue.
PLAIN_TEMPLATE = "{history}User: {message}\nAssistant:"


def open_gguf(path: str, n_ctx: int, seed: int):
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"{p} does not exist; pass a .gguf file written by `moe2gguf export`")
    try:
        return open_llama(p, n_ctx=n_ctx, seed=seed, verbose=False)
    except ValueError as e:
        raise UserError(f"llama.cpp could not load {p} ({e}); is it a GGUF file?") from None


def reply_stream(llm, messages: list[dict], max_tokens: int, temperature: float) -> Iterator[str]:
    if "tokenizer.chat_template" in llm.metadata:
        try:  # the template is rendered here, the tokens come lazily
            stream = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True)
        except Exception as e:  # noqa: BLE001 - jinja2's errors, the template's own raise_exception (a ValueError), ...
            raise UserError(f"the GGUF's chat template fails on this conversation ({first_line(e)}); "
                            "export the model again with its original chat template, or leave out what it refuses (e.g. --system)") from None
        for chunk in stream:
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                yield delta
        return
    history = "".join(
        f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages[:-1] if m["role"] != "system"
    )
    prompt = PLAIN_TEMPLATE.format(history=history, message=messages[-1]["content"])
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, stop=["\nUser:"], stream=True):
        yield chunk["choices"][0]["text"]


def chat_main(gguf: str, system: str | None, max_tokens: int, temperature: float, n_ctx: int, seed: int) -> None:
    """The `chat` verb once moe2gguf/commands.py has parsed its options: one user turn per
    input line, the reply streamed as it is generated."""
    try:
        (system or "").encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes reach Python as lone surrogates
        raise UserError("--system is not UTF-8 text; give the system message in UTF-8") from None
    if max_tokens >= n_ctx:
        raise UserError(f"--max-tokens {max_tokens} leaves no room for the prompt in --ctx {n_ctx}; lower --max-tokens or raise --ctx")
    require_gguf(gguf)  # a damaged file is named here, before llama.cpp loads it
    llm = open_gguf(gguf, n_ctx, seed)
    interactive = sys.stdin.isatty()
    stdin = getattr(sys.stdin, "buffer", None)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    lineno = 0
    while True:
        if interactive:
            click.echo("> ", nl=False)
        lineno += 1
        try:
            line = read_line(stdin, lineno) if stdin is not None else sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if text in EXIT_WORDS:
                break
            if not text:
                continue
            check_fits(llm, text, lineno, max_tokens, n_ctx)
        except UserError as e:
            if not interactive:  # a script gets one line and exit code 2
                raise
            click.echo(f"note: {e.message}; the line was skipped", err=True)  # a person just retypes
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in reply_stream(llm, messages, max_tokens, temperature):
                reply.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except ValueError as e:
            if not any(m in str(e) for m in OUTGROWN):
                raise
            full = UserError(f"the conversation has outgrown --ctx {n_ctx} tokens at line {lineno}; raise --ctx or start a new chat")
            if not interactive:
                raise full from None
            click.echo(f"\nnote: {full.message}; earlier turns are forgotten", err=True)
            messages = [m for m in messages if m["role"] == "system"]
            continue
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})


def read_line(stdin, lineno: int) -> str:  # noqa: ANN001 - a binary stream
    """One input line as text ('' at the end), bounded and UTF-8: a stream without newlines
    (/dev/zero) or another encoding ends in one line naming it, never a hang or a traceback."""
    raw = stdin.readline(MAX_LINE_BYTES + 1)
    if len(raw) > MAX_LINE_BYTES:  # (a terminal's lines are far shorter: only a pipe or file gets here)
        raise UserError(f"input line {lineno} is longer than {MAX_LINE_BYTES:,} bytes; send shorter messages")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); send UTF-8 (e.g. through iconv -t UTF-8)") from None


def check_fits(llm, text: str, lineno: int, max_tokens: int, n_ctx: int) -> None:  # noqa: ANN001 - llama_cpp.Llama
    """A message must leave room for the reply inside the context window."""
    n = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    if n + max_tokens > n_ctx:
        raise UserError(
            f"input line {lineno} has {n:,} tokens; with --max-tokens {max_tokens} at most {n_ctx - max_tokens:,} fit in --ctx {n_ctx}; "
            "raise --ctx or send a shorter message"
        )
