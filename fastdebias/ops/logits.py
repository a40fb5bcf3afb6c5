"""Host side of the Triton logits step and fused lm_head + sample: validate → allocate → pick meta-parameters → launch.

The kernels and their meta-parameter rules live in ``fastdebias.kernels.logits``; the PyTorch reference (the CPU
path and the test oracle, same signatures) in ``fastdebias.reference.logits``.

Which path each case takes:

============================================  ===========================================================
case                                          launches
============================================  ===========================================================
``logits_step``, greedy or plain sampling     tile pass + finalize (2)
``logits_step`` with top-k, top-p or min-p    tile pass (writes z) + ``n_pass`` per threshold + sample + finalize
                                              (min-p alone: no threshold pass; the sample applies it)
``lm_head_step``, greedy or plain sampling    fused h·Wᵀ + epilogue (never writes [B, V]) + finalize (2)
  ... with an lm_head LoRA                    + the shrink ``[B, R]`` in torch; the expand inside the tiles (3)
``lm_head_step`` with top-k, top-p or min-p   ``F.linear`` (+ LoRA) then ``logits_step`` (unfused)
============================================  ===========================================================

In ``generate`` (``backend="triton"``): the first token after the prefill takes ``logits_step`` on the prefill's
logits; then batches of up to ``generate.FUSED_HEAD_MAX_ROWS`` (8) rows decoding greedily or with plain sampling
take ``lm_head_step`` (the decoder stops at the final norm), and larger batches or top-k/top-p/min-p the unfused
step (measured on the H100: the fused kernel wins at batch 1-8 and loses from 64).

Nothing here reads a device tensor back to the host and every grid depends on shapes only, so a decode step
built from these ops can be captured in a CUDA graph; pass ``step`` as a device tensor there (an int is baked into
the graph). The lexicon's fp32 bias tables are built and copied to the device on the first call with a matcher
(``PhraseMatcher._tables``): make that call before capturing.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton

from fastdebias.errors import BackendError
from fastdebias.kernels.logits import (
    MODE_FILTER,
    MODE_GREEDY,
    MODE_SAMPLE,
    PHASE_NONE,
    PHASE_SAMPLE,
    PHASE_TOP_K,
    PHASE_TOP_P,
    LMHeadMeta,
    LogitsMeta,
    _finalize_kernel,
    _lm_head_tile_kernel,
    _logits_tile_kernel,
    _threshold_pass_kernel,
    lm_head_meta,
    logits_meta,
)
from fastdebias.ops import device_limits as _device_limits
from fastdebias.reference.logits import LogitsStep, check_lm_head_args, check_step_args, lm_head_logits, split_seed
from fastdebias.reference.lora import lora_shrink
from fastdebias.reference.sampling import effective_temperature, log_min_p

__all__ = ["LogitsStep", "lm_head_step", "logits_step"]


def logits_step(
    logits: torch.Tensor,
    *,
    matcher=None,
    states: torch.Tensor | None = None,
    mask_phrases: bool | torch.Tensor = True,
    banned_tokens: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    step: int | torch.Tensor = 0,
    row_ids: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    meta: LogitsMeta | None = None,
) -> LogitsStep:
    """One bias-aware decode step on [B, V] logits in a few Triton launches, no host sync.

    Same contract as ``fastdebias.reference.logits.logits_step`` (parameters, order of the processing, noise);
    ``meta`` overrides ``fastdebias.kernels.logits.logits_meta`` (tests and tuning only).

    Returns
    -------
    LogitsStep of [B] tensors: next_ids (-1 on all-banned rows), states, all_banned, entry, ban_len, bias, top.
    Greedy tokens equal the reference's; sampled tokens equal it as long as no two candidates of a row are within
    an ulp (the kernels and torch may round ``log`` differently). The top-k and top-p thresholds are exact
    searches, so the kept sets are transformers' with one deliberate exception: tokens tied with the top-p
    boundary token are all kept (transformers keeps the ones its sort happens to put last); and a boundary whose
    cumulative mass lies within rounding of ``top_p`` may fall either way. min-p keeps exactly the reference's set
    (``z >= max(z) + log(min_p)``, the same fp32 operations); it runs as the sampling launch of the filtered path,
    with no search pass of its own.
    """
    check_step_args(
        logits, matcher=matcher, states=states, mask_phrases=mask_phrases, banned_tokens=banned_tokens,
        counts=counts, repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, step=step, row_ids=row_ids, min_p=min_p, output_counts=output_counts,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )  # fmt: skip
    _check_backend(logits.device)
    temperature = effective_temperature(temperature)
    b, v = logits.shape
    if meta is None:
        meta = logits_meta(b, v, _num_sms(logits.device), _interpreting())
    k = top_k if 0 < top_k < v else 0  # k >= V keeps every token
    filtered = temperature > 0 and (k > 0 or top_p < 1.0 or min_p > 0.0)
    mode = MODE_GREEDY if temperature == 0 else (MODE_FILTER if filtered else MODE_SAMPLE)
    common = _Common(logits, matcher, states, mask_phrases, banned_tokens, counts, repetition_penalty, temperature,
                     seed, step, row_ids, output_counts, presence_penalty, frequency_penalty)  # fmt: skip
    nt = triton.cdiv(v, meta.block_n)
    part_val = torch.empty(b, nt, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(b, nt, dtype=torch.int32, device=logits.device)
    top_val = torch.empty_like(part_val)
    top_idx = torch.empty_like(part_idx)
    # z = processed logits / T: [B, V] fp32, written only for the threshold search
    z = torch.empty(b, v, dtype=torch.float32, device=logits.device) if filtered else part_val
    _logits_tile_kernel[(triton.cdiv(b, meta.block_m), nt)](
        logits, logits.stride(0), logits.stride(1), b, v,
        *common.epilogue_args(),
        z, z.stride(0),
        part_val, part_idx, top_val, top_idx, part_val.stride(0),
        MODE=mode,
        **common.flags(),
        BLOCK_M=meta.block_m,
        BLOCK_N=meta.block_n,
        num_warps=meta.num_warps,
    )  # fmt: skip
    if filtered:
        part_val, part_idx = _threshold_search(z, part_val, k, top_p, min_p, common, meta)
    return _finalize(part_val, part_idx, top_val, top_idx, common, meta.block_b)


def lm_head_step(
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
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
    min_p: float = 0.0,
    seed: int = 0,
    step: int | torch.Tensor = 0,
    row_ids: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    meta: LMHeadMeta | None = None,
) -> LogitsStep:
    """The lm_head and the logits step fused: ``logits_step(F.linear(hidden, lm_head), ...)`` without the logits.

    Greedy and plain temperature sampling compute h·Wᵀ tile by tile and choose from the tiles' candidates; with
    top-k, top-p or min-p the logits are computed with ``F.linear`` and go through the unfused ``logits_step``.

    Parameters
    ----------
    hidden : [B, K] fp32/fp16/bf16 final hidden states of the last position.
    lm_head : [V, K] weight, same dtype and device.
    lora, adapter_idx : the lm_head's LoRA stack ``(lora_a [n, R, K], lora_b [n, V, R], scale [n] fp32)`` and each
        row's adapter ([B] int, -1 = none), as ``fastdebias.reference.lora.lora_linear`` takes them. The shrink
        (``[B, R]``, tiny) runs in torch; the expand is added to each tile inside the kernel.
    meta : overrides ``fastdebias.kernels.logits.lm_head_meta`` (tests and tuning only).
    Other parameters : as in :func:`logits_step`.

    Returns
    -------
    LogitsStep, as :func:`logits_step` on the logits ``F.linear(hidden, lm_head)`` would (up to the rounding of the
    matrix product: the kernel accumulates in fp32 and rounds once to the weights' dtype).
    """
    check_lm_head_args(hidden, lm_head, lora, adapter_idx)
    b, v = hidden.shape[0], lm_head.shape[0]
    step_args = dict(
        matcher=matcher, states=states, mask_phrases=mask_phrases, banned_tokens=banned_tokens, counts=counts,
        repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seed=seed, step=step, row_ids=row_ids, output_counts=output_counts, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )  # fmt: skip
    # a zero-stride stand-in with the logits' shape, dtype and device: validation without allocating [B, V]
    check_step_args(hidden.new_empty(()).expand(b, v), **step_args, name="lm_head output")
    _check_backend(hidden.device)
    temperature = step_args["temperature"] = effective_temperature(temperature)
    k = top_k if 0 < top_k < v else 0
    if temperature > 0 and (k > 0 or top_p < 1.0 or min_p > 0.0):
        return logits_step(lm_head_logits(hidden, lm_head, lora, adapter_idx), **step_args)
    if meta is None:
        meta = lm_head_meta(b, v, hidden.shape[1], hidden.element_size(), *_device_limits(hidden.device))
    like = hidden.new_empty(()).expand(b, v)
    common = _Common(like, matcher, states, mask_phrases, banned_tokens, counts, repetition_penalty, temperature,
                     seed, step, row_ids, output_counts, presence_penalty, frequency_penalty)  # fmt: skip
    nt = triton.cdiv(v, meta.block_n)
    part_val = torch.empty(b, nt, dtype=torch.float32, device=hidden.device)
    part_idx = torch.empty(b, nt, dtype=torch.int32, device=hidden.device)
    top_val = torch.empty_like(part_val)
    top_idx = torch.empty_like(part_idx)
    has_lora = lora is not None and adapter_idx is not None
    if has_lora:
        lora_a, lora_b, scale = lora
        n, r = lora_a.shape[0], lora_a.shape[1]
        # s_a · (h · A_aᵀ) per row, fp32 [B, R]: each row's own adapter block (zero on rows without an adapter)
        xs = lora_shrink(hidden, lora_a, scale, adapter_idx).sum(dim=1)
        lb, aidx = lora_b.contiguous(), adapter_idx.to(torch.int32).contiguous()
        lora_args = (xs, xs.stride(0), lb, lb.stride(0), lb.stride(1), aidx, r, n)
        block_r = max(16, triton.next_power_of_2(r))
    else:
        d = common.dummy
        lora_args = (d, 0, d, 0, 0, d, 0, 0)
        block_r = 16
    _lm_head_tile_kernel[(triton.cdiv(b, meta.block_m), nt)](
        hidden, hidden.stride(0), hidden.stride(1), lm_head, lm_head.stride(0), lm_head.stride(1),
        hidden.shape[1], b, v,
        *lora_args,
        *common.epilogue_args(),
        part_val, part_idx, top_val, top_idx, part_val.stride(0),
        MODE=MODE_GREEDY if temperature == 0 else MODE_SAMPLE,
        **common.flags(),
        ROUND_LOGITS=hidden.dtype != torch.float32,
        HAS_LORA=has_lora,
        BLOCK_M=meta.block_m,
        BLOCK_N=meta.block_n,
        BLOCK_K=meta.block_k,
        BLOCK_R=block_r,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=meta.num_warps,
        num_stages=meta.num_stages,
    )  # fmt: skip
    return _finalize(part_val, part_idx, top_val, top_idx, common, min(triton.next_power_of_2(b), 16))


# ------------------------------------------------------------------------------------------------ internals


class _Common:
    """Kernel arguments shared by the tile pass, the fused lm_head, the threshold passes and the finalize."""

    def __init__(self, like, matcher, states, mask_phrases, banned_tokens, counts, penalty, temperature, seed, step,
                 row_ids, output_counts=None, presence=0.0, frequency=0.0) -> None:  # fmt: skip
        b, v = like.shape
        self.b, self.v, self.device = b, v, like.device
        # Unused pointer arguments: any tensor will do, the constexpr flags compile their uses away.
        dummy = torch.empty(1, dtype=torch.int64, device=like.device)
        self.dummy = dummy
        self.matcher = matcher
        self.per_row_mask = isinstance(mask_phrases, torch.Tensor)
        if matcher is not None:
            l1, hf, soft = matcher._tables(torch.float32)
            # [B] vectors are indexed by row in the kernels (contiguous() is free when they already are)
            self.l1, self.states = l1, states.contiguous()
            self.bias_hf = hf if (self.per_row_mask or mask_phrases) else soft
            self.bias_soft = soft
            self.mask_rows = mask_phrases.contiguous() if self.per_row_mask else dummy
        else:
            self.l1 = self.states = self.bias_hf = self.bias_soft = self.mask_rows = dummy
        self.has_pairs = matcher is not None and matcher.max_out > 0
        self.has_bans = banned_tokens is not None and banned_tokens.shape[1] > 0
        self.bans = banned_tokens.contiguous() if self.has_bans else dummy
        self.has_penalty = counts is not None and penalty != 1.0
        self.counts = counts if self.has_penalty else dummy
        self.penalty = float(penalty)
        # x / p as torch computes it on CUDA: x · fl32(1 / fl32(p)); same for the temperature
        self.inv_penalty = _fp32_reciprocal(penalty)
        self.has_freq_pres = output_counts is not None and (presence != 0.0 or frequency != 0.0)
        self.ocounts = output_counts if self.has_freq_pres else dummy
        self.presence, self.frequency = float(presence), float(frequency)
        self.inv_temp = _fp32_reciprocal(temperature) if temperature > 0 else 1.0
        self.seed_lo, self.seed_hi = split_seed(seed)
        self.row_ids = row_ids.contiguous() if row_ids is not None else dummy
        self.step_is_tensor = isinstance(step, torch.Tensor)
        if self.step_is_tensor:
            self.step, self.step_val = step.reshape(-1), 0
            self.stride_step = 0 if self.step.numel() == 1 else self.step.stride(0)
        else:
            # the same 32 bits as a signed value, so that every int step is an int32 argument (no second compile)
            self.step, self.step_val, self.stride_step = dummy, step - (1 << 32) if step >= 1 << 31 else step, 0

    def epilogue_args(self) -> tuple:
        m = self.matcher
        return (
            self.l1, self.states if m is not None else self.dummy,
            m.out_start if m is not None else self.dummy,
            m.out_last if m is not None else self.dummy,
            m.out_token if m is not None else self.dummy,
            self.bias_hf, self.bias_soft, self.mask_rows,
            m.max_out.bit_length() if m is not None else 0,
            self.bans, self.bans.stride(0) if self.has_bans else 0, self.bans.shape[1] if self.has_bans else 0,
            self.counts, self.counts.stride(0) if self.has_penalty else 0,
            self.counts.stride(1) if self.has_penalty else 0,
            self.penalty, self.inv_penalty,
            self.ocounts, self.ocounts.stride(0) if self.has_freq_pres else 0,
            self.ocounts.stride(1) if self.has_freq_pres else 0, self.frequency, self.presence,
            self.inv_temp,
            self.seed_lo, self.seed_hi, self.row_ids, self.step, self.stride_step, self.step_val,
        )  # fmt: skip

    def flags(self) -> dict:
        return dict(
            HAS_LEXICON=self.matcher is not None,
            HAS_PAIRS=self.has_pairs,
            PER_ROW_MASK=self.per_row_mask,
            HAS_BANS=self.has_bans,
            HAS_PENALTY=self.has_penalty,
            HAS_FREQ_PRES=self.has_freq_pres,
            HAS_ROW_IDS=self.row_ids is not self.dummy,
            STEP_IS_TENSOR=self.step_is_tensor,
        )


def _threshold_search(
    z: torch.Tensor, tile_max: torch.Tensor, k: int, top_p: float, min_p: float, common: _Common, meta: LogitsMeta
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the top-k / top-p threshold passes and the final Gumbel-max (which applies min-p); returns its
    [B, split] candidates."""
    b, v = z.shape
    chunk = triton.cdiv(triton.cdiv(v, meta.split), meta.pass_block_n) * meta.pass_block_n
    n_split = triton.cdiv(v, chunk)
    nc = meta.n_cand
    dev = z.device
    # search interval [lo, hi] of int32 keys (kernels.logits._ordered_key) by launch parity
    iv = torch.empty(2, b, 2, dtype=torch.int32, device=dev)
    target = torch.empty(b, dtype=torch.float32, device=dev)
    fsum = torch.empty(2, b, n_split, nc, dtype=torch.float32, device=dev)
    fmin = torch.empty(2, b, n_split, nc, dtype=torch.int32, device=dev)
    fmax = torch.empty_like(fmin)
    out_val = torch.empty(b, n_split, dtype=torch.float32, device=dev)
    out_idx = torch.empty(b, n_split, dtype=torch.int32, device=dev)
    phases = ([PHASE_TOP_K] if k > 0 else []) + ([PHASE_TOP_P] if top_p < 1.0 else [])
    schedule = [(phase, it) for phase in phases for it in range(meta.n_pass)] + [(PHASE_SAMPLE, 0)]
    prev_phase = PHASE_NONE
    for launch, (phase, it) in enumerate(schedule):
        _threshold_pass_kernel[(b, n_split)](
            z, z.stride(0), v,
            tile_max, tile_max.stride(0), tile_max.shape[1],
            iv, target, fsum, fmin, fmax, b,
            out_val, out_idx,
            k, float(top_p), log_min_p(min_p), chunk, n_split,
            common.seed_lo, common.seed_hi, common.row_ids, common.step, common.stride_step, common.step_val,
            launch, phase, it, prev_phase,
            HAS_ROW_IDS=common.flags()["HAS_ROW_IDS"],
            STEP_IS_TENSOR=common.step_is_tensor,
            BLOCK_S=triton.next_power_of_2(n_split),
            NC=nc,
            BLOCK_T=triton.next_power_of_2(tile_max.shape[1]),
            BLOCK_N=meta.pass_block_n,
            num_warps=meta.pass_num_warps,
        )  # fmt: skip
        if it == meta.n_pass - 1:
            prev_phase = phase
    return out_val, out_idx


def _finalize(part_val, part_idx, top_val, top_idx, common: _Common, block_b: int) -> LogitsStep:
    b, v, dev = common.b, common.v, common.device
    next_ids = torch.empty(b, dtype=torch.int64, device=dev)
    dead = torch.empty(b, dtype=torch.bool, device=dev)
    entry = torch.empty(b, dtype=torch.int64, device=dev)
    ban_len = torch.empty(b, dtype=torch.int64, device=dev)
    bias = torch.empty(b, dtype=torch.float32, device=dev)
    top = torch.empty(b, dtype=torch.int64, device=dev)
    top_bias, top_ban_len, top_entry = torch.empty_like(bias), torch.empty_like(ban_len), torch.empty_like(entry)
    m = common.matcher
    new_states = torch.empty(b, dtype=torch.int64, device=dev) if m is not None else None
    d = common.dummy
    _finalize_kernel[(triton.cdiv(b, block_b),)](
        part_val, part_idx, part_val.stride(0), part_val.shape[1],
        top_val, top_idx, top_val.stride(0), top_val.shape[1],
        b, v,
        common.states, common.mask_rows,
        m.root_next if m is not None else d, m.trans_key if m is not None else d,
        m.trans_next if m is not None else d,
        m.trans_key.numel() if m is not None else 0, m.trans_key.numel().bit_length() if m is not None else 0,
        m.out_key if m is not None else d, m.out_ban_len if m is not None else d, m.out_entry if m is not None else d,
        common.bias_hf, common.bias_soft,
        m.out_key.numel() if m is not None else 0, m.out_key.numel().bit_length() if m is not None else 0,
        common.l1, m.l1_ban_len if m is not None else d, m.l1_entry if m is not None else d,
        next_ids, new_states if m is not None else d, dead, entry, ban_len, bias, top, top_bias, top_ban_len, top_entry,
        HAS_LEXICON=m is not None,
        PER_ROW_MASK=common.per_row_mask,
        BLOCK_B=block_b,
        BLOCK_P=triton.next_power_of_2(part_val.shape[1]),
        BLOCK_T=triton.next_power_of_2(top_val.shape[1]),
        num_warps=4,
    )  # fmt: skip
    return LogitsStep(next_ids, new_states, dead, entry, ban_len, bias, top, top_bias, top_ban_len, top_entry)


def _fp32_reciprocal(x: float) -> float:
    """1/x rounded as fp32 division rounds it (what the reference computes on device), on the host: no tensor."""
    return float(np.float32(1.0) / np.float32(x))


def _check_backend(device: torch.device) -> None:
    if device.type != "cuda" and not _interpreting():
        raise BackendError(
            f"the logits are on {device}; the Triton logits step runs on CUDA (or on CPU under TRITON_INTERPRET=1): "
            "move them to the GPU or use backend='torch'"
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device: torch.device) -> int:
    return _device_limits(device)[0]
