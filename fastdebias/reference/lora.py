"""Reference multi-adapter LoRA linear: y = x·Wᵀ + s_a·((x·A_aᵀ)·B_aᵀ), a = the row's adapter (-1 = none)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    adapter_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply a base projection plus, per row, one of several unmerged LoRA adapters.

    Parameters
    ----------
    x : [M, K] float tensor.
    weight : [N, K] base weight, same dtype as ``x``.
    lora_a : [n_adapters, R, K] stacked A matrices; adapters of rank r < R are zero-padded.
    lora_b : [n_adapters, N, R] stacked B matrices, zero-padded like ``lora_a``.
    scale : [n_adapters] fp32 per-adapter scale (alpha/r, alpha/sqrt(r) for rslora, 0 where the
        adapter does not target this module).
    adapter_idx : [M] integer adapter index per row; -1 means no adapter.

    Returns
    -------
    [M, N] tensor in ``x.dtype``. Rows with index -1 are bit-identical to ``F.linear(x, weight)``.
    """
    y = F.linear(x, weight)
    if lora_a is None or adapter_idx is None:
        return y
    return torch.where(adapter_idx.view(-1, 1) >= 0, y + lora_delta(x, lora_a, lora_b, scale, adapter_idx), y)


def lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    adapter_idx: torch.Tensor,
    linear=F.linear,
) -> torch.Tensor:
    """The LoRA term alone, s_a·((x·A_aᵀ)·B_aᵀ) per row ([M, N], zero for rows with index -1).

    ``linear(x, w)`` computes x·wᵀ (``F.linear``, or the compiled CPU step's multiply-reduce)."""
    n, r, _ = lora_a.shape
    xa = lora_shrink(x, lora_a, scale, adapter_idx, linear).to(x.dtype)
    return linear(xa.view(x.shape[0], n * r), lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], n * r))


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, scale: torch.Tensor, adapter_idx: torch.Tensor, linear=F.linear
) -> torch.Tensor:
    """s_a·(x·A_aᵀ) in each row's own adapter block: fp32 [M, n_adapters, R], zero elsewhere (and on rows with -1).

    Every row goes through every adapter's shrink (n·R values, tiny), then a per-row mask keeps its own block: no
    gather of per-row A copies and no data-dependent branching, hence no host sync."""
    n, r, k = lora_a.shape
    m = x.shape[0]
    xa = linear(x, lora_a.reshape(n * r, k)).view(m, n, r)
    sel = (adapter_idx.view(m, 1) == torch.arange(n, device=x.device).view(1, n)).to(scale.dtype) * scale.view(1, n)
    return xa.float() * sel.view(m, n, 1)


def lora_linear_sliced(
    x: torch.Tensor,
    weight: torch.Tensor,
    slice_sizes: Sequence[int],
    loras: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None],
    adapter_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """A fused projection (q/k/v, gate/up) whose output slices each carry their own LoRA pair or none.

    Parameters
    ----------
    x : [M, K] float tensor.
    weight : [sum(slice_sizes), K] the slices' base weights concatenated along the output axis.
    slice_sizes : output features N_i of each slice.
    loras : per slice ``(lora_a [n_adapters, r_i, K], lora_b [n_adapters, N_i, r_i], scale [n_adapters] fp32)``,
        or None for a slice without LoRA.
    adapter_idx : [M] integer adapter index per row; -1 means no adapter.

    Returns
    -------
    [M, sum(slice_sizes)] tensor in ``x.dtype``: the per-slice :func:`lora_linear` outputs, concatenated.
    """
    outs = []
    for w, lora in zip(weight.split(list(slice_sizes)), loras):
        outs.append(lora_linear(x, w) if lora is None else lora_linear(x, w, *lora, adapter_idx))
    return torch.cat(outs, dim=-1)
