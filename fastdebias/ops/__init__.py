"""The one dispatch point: model code calls ``fastdebias.ops.<op>``; the backend is picked here.

Order of preference for ``backend="auto"``: CUDA extension → Triton → PyTorch reference. The reference is
always available and is the CPU path.
"""

from __future__ import annotations

import torch

from fastdebias.errors import BackendError, GenerationError
from fastdebias.reference import logits as _ref_logits
from fastdebias.reference import lora as _ref_lora

BACKENDS = ("auto", "torch", "triton", "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a user's backend choice into the concrete one used for ``device``, or raise BackendError."""
    if backend not in BACKENDS:
        raise BackendError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise BackendError("backend='triton' needs the triton package: pip install 'triton>=3.0'")
        if device.type != "cuda" and not _interpreting():
            raise BackendError(
                "backend='triton' runs on CUDA devices; on CPU set TRITON_INTERPRET=1 (slow, for tests) "
                "or use backend='torch'"
            )
        return "triton"
    if backend == "cuda":
        raise BackendError("backend='cuda' (csrc/ extension) is not built in this install; use 'triton' or 'torch'")
    return "torch"


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pack_lora(sizes: list[int], loras: list, backend: str = "torch"):
    """Pre-pack a fused projection's per-slice LoRA pairs for ``backend``, once, at load time.

    Returns None when no slice carries LoRA (the op then runs the base projection only)."""
    if all(lora is None for lora in loras):
        return None
    if backend == "triton":
        from fastdebias.ops import lora as _triton_lora

        return _triton_lora.pack_sliced_lora(sizes, loras)
    return tuple(i for i, lora in enumerate(loras) if lora is not None)


# Rows up to which a compiled CPU step computes the base projection as a multiply-reduce (see _base_linear).
# Measured on the 2-core CPU, SmolLM2 fp32, ms per decode step: batch 8: 80 (multiply-reduce) vs 86 (F.linear);
# batch 32: 327 vs 145, so larger batches keep F.linear (MKL's GEMM).
CPU_GEMV_MAX_ROWS = 8


def _base_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ. Inside ``torch.compile`` on CPU, a decode GEMV is written as a multiply-reduce: inductor turns it into
    one vectorised pass that streams W from memory at about twice the rate of MKL's sgemv (the 121 SmolLM2
    projections of one decode step, batch 1, fp32, from DRAM: 24 ms vs 48 ms on the 2-core CI machine; a decode
    step 25.6 vs 64 ms). Eagerly that form would materialise [M, N, K], so everywhere else it is ``F.linear``."""
    if x.device.type == "cpu" and x.shape[0] <= CPU_GEMV_MAX_ROWS and torch.compiler.is_compiling():
        # products and sum in fp32 (as F.linear accumulates), one rounding at the end; inductor fuses the casts
        return (x.unsqueeze(1).float() * weight.float()).sum(-1).to(x.dtype)
    return torch.nn.functional.linear(x, weight)


def lora_linear_sliced(
    x: torch.Tensor,
    weight: torch.Tensor,
    sizes: list[int],
    loras: list,
    packed,
    adapter_idx: torch.Tensor | None,
    backend: str = "torch",
) -> torch.Tensor:
    """A fused projection of output slices ``sizes`` (q/k/v, gate/up, or one slice), each with its own LoRA.

    x: [M, K], weight: [sum(sizes), K] → [M, sum(sizes)]. ``packed`` comes from ``pack_lora``; ``adapter_idx``
    [M] (-1 = none) or None for the base projection only. Rows with -1 are bit-identical to the base projection.
    """
    if backend == "triton":
        from fastdebias.ops import lora as _triton_lora

        if len(sizes) == 1:
            lora = loras[0] if packed is not None else (None, None, None)
            return _triton_lora.lora_linear(x, weight, *lora, adapter_idx if packed is not None else None)
        return _triton_lora.lora_linear_sliced(x, weight, sizes, packed, adapter_idx)
    y = _base_linear(x, weight)
    if packed is None or adapter_idx is None:
        return y
    keep = adapter_idx.view(-1, 1) >= 0
    for i in packed:
        lo = sum(sizes[:i])
        ys = y[:, lo:lo + sizes[i]]
        delta = _ref_lora.lora_delta(x, *loras[i], adapter_idx, linear=_base_linear)  # multiply-reduce if compiled
        y[:, lo:lo + sizes[i]] = torch.where(keep, ys + delta, ys)
    return y


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: torch.Tensor | None,
    adapter_idx: torch.Tensor | None,
    backend: str = "torch",
) -> torch.Tensor:
    """x: [M, K] → [M, N]; see ``fastdebias.reference.lora.lora_linear`` for the contract."""
    if backend == "triton":
        from fastdebias.ops import lora as _triton_lora

        return _triton_lora.lora_linear(x, weight, lora_a, lora_b, scale, adapter_idx)
    return _ref_lora.lora_linear(x, weight, lora_a, lora_b, scale, adapter_idx)


def logits_step(
    logits: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
    lm_head_lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    adapter_idx: torch.Tensor | None = None,
    matcher=None,
    states: torch.Tensor | None = None,
    mask_phrases: bool | torch.Tensor = True,
    banned_tokens: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int | torch.Tensor = 0,
    row_ids: torch.Tensor | None = None,
    backend: str = "torch",
) -> _ref_logits.LogitsStep:
    """One bias-aware decode step: [B, V] ``logits``, or ``hidden`` [B, K] and the ``lm_head`` [V, K] weight (fused).

    See ``fastdebias.reference.logits.logits_step`` for the contract and ``fastdebias.ops.logits`` for which
    Triton path each case takes. ``lm_head_lora`` / ``adapter_idx``: the lm_head's LoRA stack and the rows'
    adapters (fused path only). Returns a ``LogitsStep`` of [B] tensors (next_ids, states, all_banned, ...).
    """
    step_args = dict(
        matcher=matcher, states=states, mask_phrases=mask_phrases, banned_tokens=banned_tokens, counts=counts,
        repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        step=step, row_ids=row_ids,
    )  # fmt: skip
    fused = hidden is not None or lm_head is not None
    if fused == (logits is not None) or (fused and (hidden is None or lm_head is None)):
        raise GenerationError("logits_step: pass either logits, or hidden and lm_head (the fused lm_head + step)")
    if backend == "triton":
        from fastdebias.ops import logits as _triton_logits

        if fused:
            return _triton_logits.lm_head_step(hidden, lm_head, lora=lm_head_lora, adapter_idx=adapter_idx,
                                               **step_args)
        return _triton_logits.logits_step(logits, **step_args)
    if fused:
        return _ref_logits.lm_head_step(hidden, lm_head, lora=lm_head_lora, adapter_idx=adapter_idx, **step_args)
    return _ref_logits.logits_step(logits, **step_args)
