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

EXIT_WORDS = {"/exit", "/quit"}
# For a GGUF without tokenizer.chat_template: a plain transcript the model can continue.
PLAIN_TEMPLATE = "{history}User: {message}\nAssistant:"


def open_gguf(path: str, n_ctx: int, seed: int):
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"{p} does not exist; pass a .gguf file written by `moe2gguf export`")
    from moe2gguf.llama_runtime import open_llama

    try:
        return open_llama(p, n_ctx=n_ctx, seed=seed, verbose=False)
    except ValueError as e:
        raise UserError(f"llama.cpp could not load {p} ({e}); is it a GGUF file?") from None


def reply_stream(llm, messages: list[dict], max_tokens: int, temperature: float) -> Iterator[str]:
    if "tokenizer.chat_template" in llm.metadata:
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True):
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


@click.command("chat")
@click.argument("gguf", type=click.Path(dir_okay=False, path_type=str))
@click.option("--system", default=None, help="System message put before the conversation.")
@click.option("--max-tokens", default=256, show_default=True, help="Longest reply, in tokens.")
@click.option("--temperature", default=0.7, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--ctx", "n_ctx", default=2048, show_default=True, help="Context length in tokens.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed, for repeatable replies.")
def chat_cmd(gguf: str, system: str | None, max_tokens: int, temperature: float, n_ctx: int, seed: int) -> None:
    """Chat with a GGUF using its own chat template (a plain User/Assistant transcript when
    it has none). Type a message and press Enter; `/exit` or end of input stops. Piped
    stdin works too: every line is one user turn."""
    llm = open_gguf(gguf, n_ctx, seed)
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in EXIT_WORDS:
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        for piece in reply_stream(llm, messages, max_tokens, temperature):
            reply.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})
