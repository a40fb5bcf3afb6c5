"""Reference logits processing and token choice (the oracle for the fused Triton logits step).

Semantics follow transformers' processors, in transformers' order: repetition penalty → (vLLM's presence and
frequency penalties) → temperature → top-k → top-p → min-p → sample. Sampling is an exponential race (argmax of
p / Exp(1), equivalent to Gumbel-max), which needs no host sync, unlike rejection loops.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# Temperatures below this sample greedily (argmax), as in vLLM: 1/T overflows fp32 from about 1e-38 (z = y / T
# would hold infinities, and softmax NaNs), and long before that the distribution is all but the argmax's.
GREEDY_BELOW = 1e-5


def effective_temperature(temperature: float) -> float:
    """``temperature``, or 0.0 (greedy) below ``GREEDY_BELOW``."""
    return 0.0 if temperature < GREEDY_BELOW else temperature


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule on every token already in the context: divide positive logits, multiply negative ones.

    logits: [B, V] fp32; seen: [B, V] bool presence mask of the row's context (prompt and generated, no padding).
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, output_counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:  # fmt: skip
    """vLLM's (and OpenAI's) penalties over the tokens generated so far (not the prompt): subtract ``frequency``
    times each token's count, then ``presence`` from each token generated at least once.

    logits: [B, V] fp32; output_counts: [B, V] integer counts of the row's generated tokens. Two fp32 subtractions in
    that order, as vLLM computes them (and the Triton step, bit for bit)."""
    c = output_counts.float()
    return logits - frequency * c - presence * (c > 0).float()


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Set filtered logits to -inf: top-k, then top-p, then min-p. ``top_k=0``, ``top_p=1.0`` and ``min_p=0.0`` are
    off. Same tie rules as transformers.

    min-p (transformers' ``MinPLogitsWarper``) keeps the tokens whose probability is at least ``min_p`` times the
    most likely one's, that is ``z >= max(z) + log(min_p)``; that form (``log(min_p)`` rounded to fp32, one fp32
    addition) is what the Triton step computes, so the two keep the same set. transformers compares probabilities
    instead, which may round a token within an ulp of the boundary the other way."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    if min_p > 0.0:
        floor = logits.amax(dim=-1, keepdim=True) + log_min_p(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def log_min_p(min_p: float) -> float:
    """``log(min_p)`` rounded to fp32 (-inf for 0: off), the one value the reference and the kernels add."""
    return float(np.float32(math.log(min_p))) if min_p > 0.0 else float("-inf")


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick the next token per row: argmax when ``temperature`` is 0 (or below ``GREEDY_BELOW``), else a sample.
    logits: [B, V] fp32 → [B] int64. ``generator``: one for the batch, or one per row (each row's draws then depend
    on its own generator only, not on the batch it is in; None in the list: that row draws nothing, its generator
    kept for its next draw, and its token is the argmax, for a caller that discards it)."""
    temperature = effective_temperature(temperature)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p, min_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs)
    if isinstance(generator, Sequence):  # each row's draws from its own generator, in place
        for row, g in zip(race, generator):
            if g is None:
                row.fill_(1.0)
            else:
                row.exponential_(1.0, generator=g)
    else:
        race.exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
