"""Sliding-window perplexity, as in the transformers perplexity guide."""

from __future__ import annotations

import math

import numpy as np

from gpt_fpga.host.backends import Backend
from gpt_fpga.contract.errors import InputError
from gpt_fpga.quantize.progress import progress as progress_bar


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [n, v] -> [n, v] float64
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def windows(n_tokens: int, ctx: int, stride: int):
    """Yield (begin, end, first_scored): each target position in 1..n-1 is scored exactly once."""
    scored_to = 1
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + ctx, n_tokens)
        yield begin, end, scored_to
        scored_to = end
        begin += stride
        if end == n_tokens:
            break


def perplexity(backend: Backend, ids: list[int], ctx: int | None = None, stride: int | None = None,
               progress: bool = True, on_window=None) -> dict:
    n_ctx = backend.config.n_ctx
    ctx = n_ctx if ctx is None else ctx
    if not 2 <= ctx <= n_ctx:
        raise InputError(f"--ctx must be between 2 and the model's context {n_ctx}, got {ctx}")
    stride = max(1, ctx // 2) if stride is None else stride
    if not 1 <= stride <= ctx - 1:
        raise InputError(f"--stride must be between 1 and ctx-1 ({ctx - 1}), got {stride}")
    ids = backend.check_ids(ids)
    if len(ids) < 2:
        raise InputError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    nll, count = 0.0, 0
    spans = list(windows(len(ids), ctx, stride))
    for begin, end, first in progress_bar(spans, desc=f"perplexity ({backend.name})", enabled=progress, unit="win"):
        backend.reset()
        logits = backend.forward(ids[begin:end - 1])  # row j predicts ids[begin + j + 1]
        logp = log_softmax(logits[first - begin - 1:])  # only the scored rows: row j predicts ids[first + j]
        targets = np.asarray(ids[first:end])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        if on_window:
            on_window(first, end, logp)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "ctx": ctx, "stride": stride, "backend": backend.name}
