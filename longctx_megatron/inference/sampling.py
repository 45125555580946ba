"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded.

Sampling runs on the host with a ``torch.Generator`` seeded once per generation, so the same seed
gives the same tokens on every device and on every tensor-parallel rank (their logits are equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 keep every token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = no limit)")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) probabilities after temperature, top-k and top-p; the most likely token always stays."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, V): (B,) int64 on the host."""
    logits = logits.detach().float().cpu()
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(filtered_probabilities(logits, params), 1, generator=generator)[:, 0]
