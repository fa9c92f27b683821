"""Token sampling and the generation loop. Pure functions of logits, testable without a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from gpt_fpga.host.backends import Backend
from gpt_fpga.contract.errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """No sampling flag, or temperature 0 (the usual spelling of greedy)."""
        return self.temperature == 0 or (self.temperature is None and self.top_k is None and self.top_p is None)

    def validate(self):
        if self.temperature is not None and not self.temperature >= 0:
            raise InputError(f"--temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.seed is not None and self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_next(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:  # [v] -> id
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / (s.temperature or 1.0)
    if s.top_k is not None and s.top_k < z.size:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p is not None and s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < s.top_p  # always keeps the most likely token
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def check_context(backend: Backend, n_prompt: int, max_new: int):
    if n_prompt == 0:
        raise InputError("the prompt is empty: give at least one token")
    if max_new < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new}")
    n_ctx = backend.config.n_ctx
    if n_prompt + max_new > n_ctx:
        raise InputError(f"prompt ({n_prompt} tokens) + --max-new-tokens ({max_new}) = {n_prompt + max_new} "
                         f"exceeds the model's context of {n_ctx} tokens")


def generate(backend: Backend, prompt_ids: list[int], max_new: int, sampling: Sampling = Sampling(),
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Prefill the prompt in one pass, then decode one token at a time; stop at EOS."""
    sampling.validate()
    prompt_ids = backend.check_ids(prompt_ids)
    check_context(backend, len(prompt_ids), max_new)
    rng = np.random.default_rng(sampling.seed)
    backend.reset()
    logits = backend.forward(prompt_ids)[-1]
    out = []
    eos = backend.config.eos_token_id
    for step in range(max_new):
        tok = sample_next(logits, sampling, rng)
        out.append(tok)
        if on_token:
            on_token(tok)
        if tok == eos or step == max_new - 1:
            break
        logits = backend.forward([tok])[-1]
    return out
