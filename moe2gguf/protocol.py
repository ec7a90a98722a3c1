"""The perplexity protocol shared by both backends (it matches llama-perplexity).

Tokenize the whole text once; cut non-overlapping windows of `ctx` tokens; keep the first
`chunks`; score only the second half of each window (tokens ctx/2 .. ctx-1, each predicted
from its prefix inside the window). KL-divergence and top-1 agreement use the same positions.

numpy at module level: a GGUF check cuts windows here without loading torch (3 s); the
PyTorch helpers below import it when called, and their callers have it loaded already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moe2gguf.errors import UserError
from moe2gguf.inputs import read_text  # noqa: F401 - texts are read here by both backends' callers
from moe2gguf.logprobs import Scores

if TYPE_CHECKING:
    import torch


def windows(ids: list[int] | np.ndarray, ctx: int, chunks: int | None) -> np.ndarray:
    """[n, ctx] token windows; UserError when the text is shorter than one window."""
    if ctx < 4 or ctx % 2:
        raise UserError(f"--ctx {ctx} must be an even number of at least 4 tokens")
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // ctx
    if chunks is not None:
        if chunks < 1:
            raise UserError(f"--chunks {chunks} must be at least 1")
        if n < chunks:
            raise UserError(f"the text has {len(ids)} tokens, too few for {chunks} chunks of {ctx}; use fewer --chunks or a longer text")
        n = chunks
    if n == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}; use a longer text or a smaller --ctx")
    return ids[: n * ctx].reshape(n, ctx)


def scored(ctx: int) -> slice:
    """Positions whose logits are scored: they predict tokens ctx/2 .. ctx-1."""
    return slice(ctx // 2 - 1, ctx - 1)


def score_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, base_logprobs: torch.Tensor | None = None) -> Scores:
    """logprobs [n, V] (float32/64, log-softmaxed) of the scored positions; targets [n]."""
    nll = -logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if base_logprobs is None:
        return Scores(nll.double().numpy())
    kld = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1)
    top1 = (base_logprobs.argmax(-1) == logprobs.argmax(-1)).double()
    return Scores(nll.double().numpy(), kld.double().numpy(), top1.numpy())


def torch_logprobs(model: torch.nn.Module, wins: np.ndarray) -> torch.Tensor:
    """Log-probabilities at the scored positions of every window, [n_windows * ctx/2, V]."""
    import torch

    ctx = wins.shape[1]
    out = []
    with torch.no_grad():
        for w in wins:
            logits = model(torch.from_numpy(w)[None]).logits[0, scored(ctx)].float()
            out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def targets_of(wins: np.ndarray) -> torch.Tensor:
    import torch

    ctx = wins.shape[1]
    return torch.from_numpy(wins[:, ctx // 2 :].reshape(-1))
