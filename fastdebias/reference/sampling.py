"""Reference logits processing and token choice (the oracle for the fused Triton logits step).

Semantics follow transformers' processors, in transformers' order: repetition penalty → temperature → top-k →
top-p → sample. Sampling is an exponential race (argmax of p / Exp(1), equivalent to Gumbel-max), which needs no
host sync, unlike rejection loops.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule on every token already in the context: divide positive logits, multiply negative ones.

    logits: [B, V] fp32; seen: [B, V] bool presence mask of the row's context (prompt and generated, no padding).
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set filtered logits to -inf. ``top_k=0`` and ``top_p=1.0`` are off. Same tie rules as transformers."""
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
    return logits


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row: argmax when ``temperature == 0``, else a sample. logits: [B, V] fp32 → [B] int64."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = top_k_top_p_filter(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
