"""Triton kernels of the bias-aware logits step and the fused lm_head + sample, and their meta-parameter rules.

The step (semantics: ``fastdebias.reference.logits``) runs as a fixed sequence of launches whose grids depend on
shapes only, so it never syncs with the host and a CUDA graph can capture it:

* **tile pass** (``_logits_tile_kernel``, grid ``(B / BLOCK_M, V / BLOCK_N)``): loads one tile of logits, upcasts
  to fp32 and applies, in order, the lexicon's length-1 biases, the biased/banned tokens of the row's automaton
  state, the extra bans, the repetition penalty, vLLM's frequency and presence penalties (over ``output_counts``)
  and the temperature (``_tile_epilogue``), then reduces the tile to
  one candidate per row: the argmax (greedy) or the Gumbel-max ``argmax(z + G)`` (sampling), plus the argmax of
  the raw logits. The state's biased tokens are sorted (``PhraseMatcher``'s layout), so a tile finds the ones
  inside it with two binary searches and usually touches none.
* **fused lm_head** (``_lm_head_tile_kernel``): the same epilogue on an fp32 accumulator tile of ``h · Wᵀ``; the
  [B, V] logits are never written. Greedy and plain temperature sampling only.
* **threshold passes** (``_threshold_pass_kernel``, top-k / top-p, no sort): the tile pass writes the processed
  ``z = y / T`` and per-tile maxima; each pass then evaluates, over every row split into ``split`` chunks,
  ``NC`` candidate thresholds of an exact search over the fp32 values' order-preserving integer keys (count of
  ``z >= t`` for top-k, mass ``Σ exp(z - max)`` for top-p) together with the smallest and largest key present in
  each candidate interval. The next launch's programs reduce those partials (double-buffered by launch parity)
  and shrink the interval to the chosen candidate's present keys; a row whose interval holds one key is done and
  skips its remaining passes. ``NC``-way splitting needs at most ``ceil(32 / log2 NC)`` passes, usually fewer.
  The last launch samples Gumbel-max over ``z >= threshold``.
* **finalize** (``_finalize_kernel``): reduces the candidates to the token (``-1`` where the row is all banned),
  advances the automaton (binary search of ``trans_key``) and looks the token up (``out_key``, the tables).

Every kernel reads 64-bit row offsets: B × 128256 overflows int32.

Noise: ``_gumbel`` draws Philox4x32-10 (``tl.philox_impl``) on the counter (column, row id, step, 0), the same
numbers as ``fastdebias.reference.logits.gumbel_noise``. Values that change every decode step (the step counter,
the states, the counts) are read from device tensors; the seed and the sampling parameters are kernel arguments
that are not specialised on, so neither a new seed nor a new step recompiles anything.
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from fastdebias.kernels.lora import cast, dot_operand

# Globals read inside @triton.jit functions must be tl.constexpr (triton 3.6 refuses plain globals).
NEG_INF = tl.constexpr(float("-inf"))
# Order-preserving int32 keys of fp32 (``_ordered_key``): the key of -inf (keys of other floats are larger, NaNs
# aside), and sentinels above and below every key of a non-NaN float.
KEY_NEG_INF = tl.constexpr(-2139095041)  # 0xFF800000 ^ 0x7FFFFFFF as int32
KEY_BIG = tl.constexpr(2147483647)
KEY_SMALL = tl.constexpr(-2147483648)

MODE_GREEDY = 0
MODE_SAMPLE = 1
MODE_FILTER = 2  # store z = y / T and per-tile maxima for the threshold passes

PHASE_TOP_K = 0
PHASE_TOP_P = 1
PHASE_SAMPLE = 2
PHASE_NONE = -1

# Programs per SM wanted from the tile pass and the threshold passes: a decode step is memory- (or launch-)
# bound, and a single wave of one program per SM leaves bandwidth unused while programs start and drain.
PROGRAMS_PER_SM = 2
# Candidate thresholds per search pass (16: at most 8 passes for 32-bit keys; each costs NC compares per element).
N_CANDIDATES = 16


class LogitsMeta(NamedTuple):
    """Meta-parameters of one logits step (see :func:`logits_meta`)."""

    block_m: int  # rows per program of the tile pass
    block_n: int  # columns per tile of the tile pass
    split: int  # programs per row of the threshold passes
    pass_block_n: int  # columns per tile of the threshold passes
    n_cand: int  # candidate thresholds per pass (a power of two)
    n_pass: int  # launches per threshold search
    block_b: int  # rows per program of the finalize
    num_warps: int  # of the tile pass
    pass_num_warps: int = 4  # of the threshold passes


class LMHeadMeta(NamedTuple):
    """Meta-parameters of the fused lm_head + sample (see :func:`lm_head_meta`)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _passes(n_cand: int) -> int:
    """Passes that shrink any interval of 2**32 keys to one: each pass divides its width by n_cand (rounded up)."""
    return triton.cdiv(32, n_cand.bit_length() - 1)


def logits_meta(b: int, v: int, num_sms: int, interpret: bool = False) -> LogitsMeta:
    """Pick the meta-parameters of the unfused step for ``b`` rows of ``v`` logits: one rule, no autotuning.

    GPU: the tile pass takes one row per program and the widest tile of 4096, 2048, 1024 or 512 columns that still
    gives ``PROGRAMS_PER_SM`` programs per SM (B = 1, V = 128256: 512 columns, 251 programs; B = 64: 4096). The
    threshold passes split each row into as many chunks as give the same occupancy, in tiles of 128 columns: their
    three [NC, 128] accumulators (48 registers a thread with 4 warps) live across the chunk's loop. Pending
    measurements on a GPU (``bench/bench_logits.py``).

    Interpreter (``interpret=True``): each program costs milliseconds, so the fewest programs: up to 64 rows and
    the whole (power-of-two padded, at most 2048) vocabulary per tile, one chunk per row.
    """
    if interpret:
        block_n = min(triton.next_power_of_2(v), 2048)
        return LogitsMeta(
            block_m=min(triton.next_power_of_2(b), 64),
            block_n=block_n,
            split=1,
            pass_block_n=block_n,
            n_cand=N_CANDIDATES,
            n_pass=_passes(N_CANDIDATES),
            block_b=min(triton.next_power_of_2(b), 64),
            num_warps=4,
        )
    want = PROGRAMS_PER_SM * num_sms
    block_n = next((bn for bn in (4096, 2048, 1024) if b * triton.cdiv(v, bn) >= want), 512)
    pass_block_n = 128
    split = max(1, min(triton.cdiv(want, b), triton.cdiv(v, pass_block_n)))
    return LogitsMeta(
        block_m=1,
        block_n=block_n,
        split=split,
        pass_block_n=pass_block_n,
        n_cand=N_CANDIDATES,
        n_pass=_passes(N_CANDIDATES),
        block_b=16,
        num_warps=8 if block_n >= 2048 else 4,
    )


def lm_head_meta(b: int, v: int, k: int, itemsize: int, num_sms: int, smem_bytes: int) -> LMHeadMeta:
    """Pick the meta-parameters of the fused lm_head + sample.

    A decode GEMV: every row of a batch of up to 64 shares one M-block, so W streams from memory once
    (``tl.dot`` pads M to 16). The widest W tile of 128 or 64 rows that still fills the SMs, 256 bytes deep in K;
    4 warps; as many pipeline stages (2 to 4) as shared memory holds. Larger batches take several M-blocks, which
    re-read W from L2. Pending measurements on a GPU.
    """
    block_m = max(16, min(triton.next_power_of_2(b), 64))
    block_n = 128 if triton.cdiv(v, 128) >= num_sms else 64
    block_k = 256 // itemsize
    per_stage = (block_m + block_n) * block_k * itemsize
    num_stages = max(2, min(4, smem_bytes // per_stage))
    return LMHeadMeta(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _lower_bound(ptr, lo, n, target, n_iter):
    """First index i in [lo, lo + n) with ptr[i] >= target (lo + n if none); ptr[lo:lo + n] ascending.

    Branch-free and vectorised over lo/n/target; ``n_iter`` must be at least the bit length of the largest n.
    """
    for _ in range(n_iter):
        half = n // 2
        mid = lo + half
        v = tl.load(ptr + mid, mask=n > 0, other=0)
        go = (n > 0) & (v < target)
        lo = tl.where(go, mid + 1, lo)
        n = tl.where(go, n - half - 1, half)
    return lo


@triton.jit
def _ordered_key(z):
    """int32 key with key(a) < key(b) iff a < b for non-NaN fp32 (-0.0 first folded into +0.0): a non-negative
    float's bits as they are; a negative one's magnitude bits flipped. int32, not int64: the threshold passes
    compare every element with every candidate, and 64-bit integer ops cost several instructions on a GPU."""
    bits = (z + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _row_noise_ids(rows, row_mask, row_ids_ptr, step_ptr, stride_step, step_val, HAS_ROW_IDS, STEP_IS_TENSOR):
    """The noise counter's row id and step of each row (int64 [BM])."""
    if HAS_ROW_IDS:
        row_key = tl.load(row_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        row_key = rows
    if STEP_IS_TENSOR:
        step = tl.load(step_ptr + rows * stride_step, mask=row_mask, other=0).to(tl.int64)
    else:
        step = rows * 0 + step_val
    return row_key, step


@triton.jit
def _gumbel(seed_lo, seed_hi, row_key, step, cols):
    """[BM, BN] Gumbel(0, 1) noise: Philox4x32-10 on (column, row id's low word, step, row id's high word) → U in
    (0, 1) → -log(-log U). (Row ids below 2**32 leave the last word 0; ``generate``'s per-prompt seeds use all 62
    bits.)"""
    zero = (row_key[:, None] * 0 + cols[None, :] * 0).to(tl.uint32)
    c0 = zero + cols[None, :].to(tl.uint32)
    c1 = zero + (row_key[:, None] & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + step[:, None].to(tl.uint32)
    c3 = zero + (row_key[:, None] >> 32).to(tl.uint32)
    # (triton 3.6 has no tl.to_tensor: broadcast the scalar seeds through an int64 zero instead)
    k0 = (zero.to(tl.int64) + seed_lo).to(tl.uint32)
    k1 = (zero.to(tl.int64) + seed_hi).to(tl.uint32)
    r, _, _, _ = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    # 23 random bits as an odd multiple of 2**-24: exact in fp32, never 0 or 1 (so G is finite).
    u = (((r >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08
    return -tl.log(-tl.log(u))


@triton.jit
def _tile_epilogue(
    raw,
    rows,
    row_mask,
    cols,
    col_mask,
    pid_n,
    l1_ptr,
    states_ptr,
    out_start_ptr,
    out_last_ptr,
    out_token_ptr,
    bias_hf_ptr,
    bias_soft_ptr,
    mask_rows_ptr,
    log_out,
    bans_ptr,
    stride_bans,
    n_bans,
    counts_ptr,
    stride_cm,
    stride_cn,
    penalty,
    inv_penalty,
    ocounts_ptr,
    stride_om,
    stride_on,
    frequency,
    presence,
    inv_temp,
    seed_lo,
    seed_hi,
    row_ids_ptr,
    step_ptr,
    stride_step,
    step_val,
    z_ptr,
    stride_zm,
    part_val_ptr,
    part_idx_ptr,
    top_val_ptr,
    top_idx_ptr,
    stride_pm,
    MODE: tl.constexpr,
    HAS_LEXICON: tl.constexpr,
    HAS_PAIRS: tl.constexpr,
    PER_ROW_MASK: tl.constexpr,
    HAS_BANS: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    HAS_FREQ_PRES: tl.constexpr,
    HAS_ROW_IDS: tl.constexpr,
    STEP_IS_TENSOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Process one [BM, BN] tile of fp32 raw logits (-inf outside the rows/columns) and store its candidates."""
    col_lo = pid_n * BLOCK_N
    valid = row_mask[:, None] & col_mask[None, :]
    part = rows * stride_pm + pid_n
    # the model's own first choice, before the lexicon touches anything
    tl.store(top_val_ptr + part, tl.max(raw, axis=1), mask=row_mask)
    tl.store(top_idx_ptr + part, tl.argmax(raw, axis=1, tie_break_left=True) + col_lo, mask=row_mask)

    y = raw
    if HAS_LEXICON:
        l1 = tl.load(l1_ptr + cols, mask=col_mask, other=0.0)
        y = raw + l1[None, :]
        if HAS_PAIRS:
            # The state's (token, bias) pairs replace the length-1 bias (their bias includes it); they are sorted by
            # token, so the ones in this tile are [p_lo, p_hi) and most tiles have none.
            st = tl.load(states_ptr + rows, mask=row_mask, other=0)
            start = tl.load(out_start_ptr + st, mask=row_mask, other=0)
            cnt = tl.load(out_last_ptr + st, mask=row_mask, other=-1) + 1
            p_lo = _lower_bound(out_token_ptr, start, cnt, col_lo, log_out)
            p_hi = _lower_bound(out_token_ptr, start, cnt, col_lo + BLOCK_N, log_out)
            if PER_ROW_MASK:
                hf_row = tl.load(mask_rows_ptr + rows, mask=row_mask, other=0) != 0
            n_max = tl.max(p_hi - p_lo, axis=0)
            for j in range(n_max):
                p = p_lo + j
                has = p < p_hi
                tok = tl.load(out_token_ptr + p, mask=has, other=-1)
                bias = tl.load(bias_hf_ptr + p, mask=has, other=0.0)
                if PER_ROW_MASK:
                    bias = tl.where(hf_row, bias, tl.load(bias_soft_ptr + p, mask=has, other=0.0))
                y = tl.where(cols[None, :] == tok[:, None], raw + bias[:, None], y)
    if HAS_BANS:
        for j in range(n_bans):
            tok = tl.load(bans_ptr + rows * stride_bans + j, mask=row_mask, other=-1)
            y = tl.where(cols[None, :] == tok[:, None], NEG_INF, y)
    if HAS_PENALTY:
        seen = tl.load(counts_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=valid, other=0)
        # transformers' rule; x · (1/p) is what torch computes for x / p on CUDA, so both agree bit for bit there
        y = tl.where(seen.to(tl.int32) > 0, tl.where(y < 0, y * penalty, y * inv_penalty), y)
    if HAS_FREQ_PRES:
        # vLLM's frequency then presence penalty over the row's generated tokens: two fp32 subtractions, as torch
        c = tl.load(ocounts_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, mask=valid, other=0)
        c = c.to(tl.float32)
        y = y - frequency * c
        y = y - presence * tl.where(c > 0, 1.0, 0.0)

    if MODE == 0:
        score = y
    else:
        z = y * inv_temp
        if MODE == 1:
            row_key, step = _row_noise_ids(
                rows, row_mask, row_ids_ptr, step_ptr, stride_step, step_val, HAS_ROW_IDS, STEP_IS_TENSOR
            )
            score = z + _gumbel(seed_lo, seed_hi, row_key, step, cols)
        else:
            tl.store(z_ptr + rows[:, None] * stride_zm + cols[None, :], z, mask=valid)
            score = z
    score = tl.where(valid, score, NEG_INF)
    tl.store(part_val_ptr + part, tl.max(score, axis=1), mask=row_mask)
    tl.store(part_idx_ptr + part, tl.argmax(score, axis=1, tie_break_left=True) + col_lo, mask=row_mask)


# -------------------------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_val", "n_bans", "log_out"])
def _logits_tile_kernel(
    logits_ptr,
    stride_lm,
    stride_ln,
    B,
    V,
    l1_ptr,
    states_ptr,
    out_start_ptr,
    out_last_ptr,
    out_token_ptr,
    bias_hf_ptr,
    bias_soft_ptr,
    mask_rows_ptr,
    log_out,
    bans_ptr,
    stride_bans,
    n_bans,
    counts_ptr,
    stride_cm,
    stride_cn,
    penalty,
    inv_penalty,
    ocounts_ptr,
    stride_om,
    stride_on,
    frequency,
    presence,
    inv_temp,
    seed_lo,
    seed_hi,
    row_ids_ptr,
    step_ptr,
    stride_step,
    step_val,
    z_ptr,
    stride_zm,
    part_val_ptr,
    part_idx_ptr,
    top_val_ptr,
    top_idx_ptr,
    stride_pm,
    MODE: tl.constexpr,
    HAS_LEXICON: tl.constexpr,
    HAS_PAIRS: tl.constexpr,
    PER_ROW_MASK: tl.constexpr,
    HAS_BANS: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    HAS_FREQ_PRES: tl.constexpr,
    HAS_ROW_IDS: tl.constexpr,
    STEP_IS_TENSOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of [B, V] logits → per-row candidates of the tile (see ``_tile_epilogue``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < V
    ptrs = logits_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_ln
    raw = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=NEG_INF).to(tl.float32)
    _tile_epilogue(
        raw, rows, row_mask, cols, col_mask, pid_n,
        l1_ptr, states_ptr, out_start_ptr, out_last_ptr, out_token_ptr, bias_hf_ptr, bias_soft_ptr, mask_rows_ptr,
        log_out, bans_ptr, stride_bans, n_bans, counts_ptr, stride_cm, stride_cn, penalty, inv_penalty,
        ocounts_ptr, stride_om, stride_on, frequency, presence, inv_temp,
        seed_lo, seed_hi, row_ids_ptr, step_ptr, stride_step, step_val, z_ptr, stride_zm,
        part_val_ptr, part_idx_ptr, top_val_ptr, top_idx_ptr, stride_pm,
        MODE, HAS_LEXICON, HAS_PAIRS, PER_ROW_MASK, HAS_BANS, HAS_PENALTY, HAS_FREQ_PRES, HAS_ROW_IDS, STEP_IS_TENSOR,
        BLOCK_N,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_val", "n_bans", "log_out"])
def _lm_head_tile_kernel(
    h_ptr,
    stride_hm,
    stride_hk,
    w_ptr,
    stride_wn,
    stride_wk,
    K,
    B,
    V,
    xs_ptr,
    stride_xs,
    lb_ptr,
    stride_lba,
    stride_lbn,
    aidx_ptr,
    R,
    n_adapters,
    l1_ptr,
    states_ptr,
    out_start_ptr,
    out_last_ptr,
    out_token_ptr,
    bias_hf_ptr,
    bias_soft_ptr,
    mask_rows_ptr,
    log_out,
    bans_ptr,
    stride_bans,
    n_bans,
    counts_ptr,
    stride_cm,
    stride_cn,
    penalty,
    inv_penalty,
    ocounts_ptr,
    stride_om,
    stride_on,
    frequency,
    presence,
    inv_temp,
    seed_lo,
    seed_hi,
    row_ids_ptr,
    step_ptr,
    stride_step,
    step_val,
    part_val_ptr,
    part_idx_ptr,
    top_val_ptr,
    top_idx_ptr,
    stride_pm,
    MODE: tl.constexpr,
    HAS_LEXICON: tl.constexpr,
    HAS_PAIRS: tl.constexpr,
    PER_ROW_MASK: tl.constexpr,
    HAS_BANS: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    HAS_FREQ_PRES: tl.constexpr,
    HAS_ROW_IDS: tl.constexpr,
    STEP_IS_TENSOR: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Tile of h · Wᵀ in fp32 (plus the rows' lm_head LoRA), then the step's epilogue on it: the logits never leave
    registers (greedy/sample).

    LoRA (``HAS_LORA``): ``xs`` [B, R] fp32 is the shrink already scaled, s_a · (h · A_aᵀ), zero on rows without
    an adapter; for each adapter the tile adds ``xs_a · B_aᵀ`` with one ``tl.dot`` ([BM, BLOCK_R] x [BLOCK_R, BN],
    ``xs`` zeroed on the other adapters' rows): one B tile load per adapter, no per-row gathers, and rows of every
    adapter share the W tile. ``BLOCK_R`` is the rank padded to a power of two (at least 16, for ``tl.dot``)."""
    # program_id(0) walks the M-blocks of one W tile first, so a batch larger than BLOCK_M re-reads W from L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows[:, None] * stride_hm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(h_rows + kk[None, :] * stride_hk, mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :] * stride_wk, mask=col_mask[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dot_operand(x), tl.trans(dot_operand(w)), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:
        a = tl.load(aidx_ptr + rows, mask=row_mask, other=-1)
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        xs = tl.load(xs_ptr + rows[:, None] * stride_xs + rr[None, :], mask=row_mask[:, None] & mask_r[None, :],
                     other=0.0)  # fmt: skip
        b_cols = lb_ptr + cols.to(tl.int64)[:, None] * stride_lbn + rr[None, :]
        for j in range(n_adapters):
            bt = tl.load(b_cols + j * stride_lba, mask=col_mask[:, None] & mask_r[None, :], other=0.0)  # [BN, BR]
            xs_j = tl.where((a == j)[:, None], xs, 0.0)
            acc = tl.dot(xs_j, tl.trans(bt.to(tl.float32)), acc, input_precision=DOT_PRECISION)
    if ROUND_LOGITS:
        # the unfused path stores the lm_head output in the weights' dtype before the step upcasts it
        acc = cast(acc, h_ptr.dtype.element_ty).to(tl.float32)
    raw = tl.where(row_mask[:, None] & col_mask[None, :], acc, NEG_INF)
    _tile_epilogue(
        raw, rows, row_mask, cols, col_mask, pid_n,
        l1_ptr, states_ptr, out_start_ptr, out_last_ptr, out_token_ptr, bias_hf_ptr, bias_soft_ptr, mask_rows_ptr,
        log_out, bans_ptr, stride_bans, n_bans, counts_ptr, stride_cm, stride_cn, penalty, inv_penalty,
        ocounts_ptr, stride_om, stride_on, frequency, presence, inv_temp,
        seed_lo, seed_hi, row_ids_ptr, step_ptr, stride_step, step_val, h_ptr, 0,
        part_val_ptr, part_idx_ptr, top_val_ptr, top_idx_ptr, stride_pm,
        MODE, HAS_LEXICON, HAS_PAIRS, PER_ROW_MASK, HAS_BANS, HAS_PENALTY, HAS_FREQ_PRES, HAS_ROW_IDS, STEP_IS_TENSOR,
        BLOCK_N,
    )  # fmt: skip


@triton.jit
def _refine(iv_ptr, fsum_ptr, fmin_ptr, fmax_ptr, par, row, B, target, n_split, BLOCK_S: tl.constexpr,
            NC: tl.constexpr):  # fmt: skip
    """Shrink a row's search interval [lo, hi] with the partials of the pass that evaluated it (buffer ``par``).

    Invariant: F(lo) >= target > F(hi + 1), F(t) = Σ_{key >= t} w, so the answer (the largest t with
    F(t) >= target) lies in [lo, hi] and is a present key of positive weight. The new interval is the present keys
    of the last candidate sub-interval whose F reaches the target.
    """
    iv = iv_ptr + (par * B + row) * 2
    lo = tl.load(iv)
    hi = tl.load(iv + 1)
    j = tl.arange(0, NC)
    s = tl.arange(0, BLOCK_S)
    offs = ((par * B + row) * n_split + s[:, None]) * NC + j[None, :]
    in_split = (s < n_split)[:, None]
    f = tl.sum(tl.load(fsum_ptr + offs, mask=in_split, other=0.0), axis=0)
    mn = tl.min(tl.load(fmin_ptr + offs, mask=in_split, other=KEY_BIG), axis=0)
    mx = tl.max(tl.load(fmax_ptr + offs, mask=in_split, other=KEY_SMALL), axis=0)
    # int32 keys, but an interval may span 2**32 of them: its arithmetic is int64 (scalars, cheap)
    width = (hi.to(tl.int64) - lo + NC) // NC
    ok = (lo.to(tl.int64) + j * width <= hi) & (f >= target)
    best = tl.max(tl.where(ok, j, 0), axis=0)
    busy = lo < hi  # a converged interval was not evaluated: its partials are stale
    new_lo = tl.where(busy, tl.sum(tl.where(j == best, mn, 0), axis=0), lo)
    new_hi = tl.where(busy, tl.sum(tl.where(j == best, mx, 0), axis=0), hi)
    return new_lo, new_hi


@triton.jit(
    do_not_specialize=[
        "seed_lo", "seed_hi", "step_val", "top_k", "log_min_p", "chunk", "n_split", "launch", "phase", "it",
        "prev_phase",
    ]
)  # fmt: skip
def _threshold_pass_kernel(
    z_ptr,
    stride_zm,
    V,
    tmax_ptr,
    stride_pm,
    n_tiles,
    iv_ptr,
    target_ptr,
    fsum_ptr,
    fmin_ptr,
    fmax_ptr,
    B,
    out_val_ptr,
    out_idx_ptr,
    top_k,
    top_p,
    log_min_p,
    chunk,
    n_split,
    seed_lo,
    seed_hi,
    row_ids_ptr,
    step_ptr,
    stride_step,
    step_val,
    launch,
    phase,
    it,
    prev_phase,
    HAS_ROW_IDS: tl.constexpr,
    STEP_IS_TENSOR: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One launch of the top-k / top-p threshold search, or the final Gumbel-max over the kept tokens.

    ``phase``: 0 searches the k-th largest key (weights 1), 1 the top-p key (weights exp(z - max), target
    top_p · the mass kept by top-k), 2 samples, among the kept keys (>= the threshold found) whose z is at least
    max + ``log_min_p`` (min-p; -inf when off). ``it``: the pass within the phase. The first pass of a phase
    finishes the previous phase from its last partials.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cur = launch % 2
    prev = 1 - cur
    t = tl.arange(0, BLOCK_T)
    m = tl.max(tl.load(tmax_ptr + row * stride_pm + t, mask=t < n_tiles, other=NEG_INF), axis=0)
    s_idx = tl.arange(0, BLOCK_S)
    kf = top_k.to(tl.float32)
    # top-p's target is fixed by its first pass (F at its lowest candidate = the mass kept by top-k). Read the
    # partials only then: at the first launch the other half of the (uninitialised) workspace holds garbage, which a
    # select would discard but the sum still reads (under the interpreter: an intermittent numpy "invalid value")
    if it == 1:
        s_mask = s_idx < n_split
        target_p = top_p * tl.sum(tl.load(fsum_ptr + ((prev * B + row) * n_split + s_idx) * NC, mask=s_mask, other=0.0))
    else:
        target_p = tl.load(target_ptr + row)
    if it == 0:
        lo = tl.full((), KEY_NEG_INF, tl.int32)
        if prev_phase >= 0:
            prev_target = tl.where(prev_phase == 0, kf, target_p)
            lo, _ = _refine(iv_ptr, fsum_ptr, fmin_ptr, fmax_ptr, prev, row, B, prev_target, n_split, BLOCK_S, NC)
        hi = _ordered_key(m)
    else:
        lo, hi = _refine(
            iv_ptr, fsum_ptr, fmin_ptr, fmax_ptr, prev, row, B, tl.where(phase == 0, kf, target_p), n_split, BLOCK_S, NC
        )

    z_row = z_ptr + row * stride_zm
    c_lo = split * chunk
    c_hi = tl.minimum(c_lo + chunk, V)
    offs = tl.arange(0, BLOCK_N)
    if phase == 2:
        rows = tl.zeros((1,), tl.int64) + row
        row_key, step = _row_noise_ids(
            rows, rows >= 0, row_ids_ptr, step_ptr, stride_step, step_val, HAS_ROW_IDS, STEP_IS_TENSOR
        )
        # per-column running best over the chunk's tiles (elementwise), one reduction after the loop
        best_val = tl.full((1, BLOCK_N), NEG_INF, tl.float32)
        best_idx = tl.zeros((1, BLOCK_N), tl.int32)
        for c0 in range(c_lo, c_hi, BLOCK_N):
            cols = c0 + offs
            cm = cols < c_hi
            z = tl.load(z_row + cols[None, :], mask=cm[None, :], other=NEG_INF)
            score = z + _gumbel(seed_lo, seed_hi, row_key, step, cols)
            score = tl.where(cm[None, :] & (_ordered_key(z) >= lo) & (z >= m + log_min_p), score, NEG_INF)
            better = score > best_val  # strictly: a column's earlier tile wins ties
            best_idx = tl.where(better, cols[None, :], best_idx)
            best_val = tl.where(better, score, best_val)
        top = tl.max(best_val, axis=1)
        # the smallest index among the columns holding the maximum: argmax's leftmost tie-break over the chunk
        # (a chunk with every score -inf keeps index 0; the finalize never picks it over a finite candidate)
        best_idx = tl.min(tl.where(best_val == top[:, None], best_idx, c_hi), axis=1)
        best_val = top
        out = row * n_split + split + tl.arange(0, 1)
        tl.store(out_val_ptr + out, best_val)
        tl.store(out_idx_ptr + out, best_idx)
    else:
        j = tl.arange(0, NC)
        width = (hi.to(tl.int64) - lo + NC) // NC
        cand64 = lo.to(tl.int64) + j * width
        # candidates past hi count nothing inside the interval; clamped to KEY_BIG they still count no key (no
        # non-NaN float has that key), and every per-element compare below is int32
        cand = tl.minimum(cand64, KEY_BIG).to(tl.int32)
        upper = tl.minimum(cand64 + width - 1, hi).to(tl.int32)
        # [NC, BLOCK_N] accumulators updated elementwise across the chunk's tiles, reduced once after the loop: a
        # reduction per tile would cross warps (shared memory, barriers) three times per BLOCK_N elements
        acc_f2 = tl.zeros((NC, BLOCK_N), tl.float32)
        acc_mn2 = tl.full((NC, BLOCK_N), KEY_BIG, tl.int32)
        acc_mx2 = tl.full((NC, BLOCK_N), KEY_SMALL, tl.int32)
        if lo < hi:
            for c0 in range(c_lo, c_hi, BLOCK_N):
                cols = c0 + offs
                cm = cols < c_hi
                z = tl.load(z_row + cols, mask=cm, other=NEG_INF)
                key = _ordered_key(z)
                if phase == 0:
                    w = cm.to(tl.float32)
                else:
                    w = tl.exp(z - m)
                ge = key[None, :] >= cand[:, None]
                acc_f2 += tl.where(ge, w[None, :], 0.0)
                inside = ge & (key[None, :] <= upper[:, None]) & (w > 0)[None, :]
                acc_mn2 = tl.minimum(acc_mn2, tl.where(inside, key[None, :], KEY_BIG))
                acc_mx2 = tl.maximum(acc_mx2, tl.where(inside, key[None, :], KEY_SMALL))
        acc_f = tl.sum(acc_f2, axis=1)
        acc_mn = tl.min(acc_mn2, axis=1)
        acc_mx = tl.max(acc_mx2, axis=1)
        part = ((cur * B + row) * n_split + split) * NC + j
        tl.store(fsum_ptr + part, acc_f)
        tl.store(fmin_ptr + part, acc_mn)
        tl.store(fmax_ptr + part, acc_mx)
        if split == 0:
            iv = iv_ptr + (cur * B + row) * 2
            tl.store(iv, lo)
            tl.store(iv + 1, hi)
            if (phase == 1) & (it == 1):
                tl.store(target_ptr + row, target_p)


@triton.jit(do_not_specialize=["log_trans", "log_pairs"])
def _finalize_kernel(
    part_val_ptr,
    part_idx_ptr,
    stride_pm,
    n_parts,
    top_val_ptr,
    top_idx_ptr,
    stride_tm,
    n_top,
    B,
    V,
    states_ptr,
    mask_rows_ptr,
    root_next_ptr,
    trans_key_ptr,
    trans_next_ptr,
    n_trans,
    log_trans,
    out_key_ptr,
    out_ban_len_ptr,
    out_entry_ptr,
    bias_hf_ptr,
    bias_soft_ptr,
    n_pairs,
    log_pairs,
    l1_ptr,
    l1_ban_len_ptr,
    l1_entry_ptr,
    next_ptr,
    new_states_ptr,
    dead_ptr,
    entry_ptr,
    ban_len_ptr,
    bias_ptr,
    top_ptr,
    top_bias_ptr,
    top_ban_len_ptr,
    top_entry_ptr,
    HAS_LEXICON: tl.constexpr,
    PER_ROW_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per row: the best candidate → token (-1 if all banned), state advance and lexicon lookup of the token."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    p = tl.arange(0, BLOCK_P)
    pm = rm[:, None] & (p < n_parts)[None, :]
    vals = tl.load(part_val_ptr + rows[:, None] * stride_pm + p[None, :], mask=pm, other=NEG_INF)
    best = tl.argmax(vals, axis=1, tie_break_left=True)
    # NaN-free by construction (never -inf - -inf); a row whose best candidate is -inf has every token banned
    dead = tl.max(vals, axis=1) == NEG_INF
    idx = tl.load(part_idx_ptr + rows * stride_pm + best, mask=rm, other=0).to(tl.int64)
    tok = tl.where(dead, -1, idx)
    t = tl.arange(0, BLOCK_T)
    tvals = tl.load(top_val_ptr + rows[:, None] * stride_tm + t[None, :], mask=rm[:, None] & (t < n_top)[None, :],
                    other=NEG_INF)  # fmt: skip
    top = tl.load(top_idx_ptr + rows * stride_tm + tl.argmax(tvals, axis=1, tie_break_left=True), mask=rm, other=0)
    tl.store(next_ptr + rows, tok, mask=rm)
    tl.store(dead_ptr + rows, dead, mask=rm)
    tl.store(top_ptr + rows, top.to(tl.int64), mask=rm)
    if HAS_LEXICON:
        st = tl.load(states_ptr + rows, mask=rm, other=0)
        tt = tl.where((tok >= 0) & (tok < V), tok, V)  # ids outside [0, V) match nothing and lead to the root
        key = st * (V + 1) + tt
        zero = rows * 0
        pos = _lower_bound(trans_key_ptr, zero, zero + n_trans, key, log_trans)  # the sentinel keeps pos in range
        hit = tl.load(trans_key_ptr + pos, mask=rm, other=-1) == key
        nxt = tl.where(hit, tl.load(trans_next_ptr + pos, mask=rm, other=0), tl.load(root_next_ptr + tt, mask=rm))
        tl.store(new_states_ptr + rows, tl.where(dead, st, nxt), mask=rm)
        # what the lexicon does to the chosen token, and to the model's own first choice (the interventions log)
        if PER_ROW_MASK:
            hf_row = tl.load(mask_rows_ptr + rows, mask=rm, other=0) != 0
        for which in tl.static_range(2):
            t = tt if which == 0 else tl.where((top >= 0) & (top < V), top, V).to(tl.int64)
            k = st * (V + 1) + t
            pos = _lower_bound(out_key_ptr, zero, zero + n_pairs, k, log_pairs)
            hit = tl.load(out_key_ptr + pos, mask=rm, other=-1) == k
            pair_bias = tl.load(bias_hf_ptr + pos, mask=rm, other=0.0)
            if PER_ROW_MASK:
                pair_bias = tl.where(hf_row, pair_bias, tl.load(bias_soft_ptr + pos, mask=rm, other=0.0))
            inside = t < V
            tc = tl.minimum(t, V - 1)
            l1 = tl.where(inside, tl.load(l1_ptr + tc, mask=rm, other=0.0), 0.0)
            l1_len = tl.where(inside, tl.load(l1_ban_len_ptr + tc, mask=rm, other=0), 0)
            l1_entry = tl.where(inside, tl.load(l1_entry_ptr + tc, mask=rm, other=-1), -1)
            bias = tl.where(hit, pair_bias, l1)
            ban_len = tl.where(hit, tl.load(out_ban_len_ptr + pos, mask=rm, other=0), l1_len)
            entry = tl.where(hit, tl.load(out_entry_ptr + pos, mask=rm, other=-1), l1_entry)
            if which == 0:
                tl.store(bias_ptr + rows, bias, mask=rm)
                tl.store(ban_len_ptr + rows, ban_len, mask=rm)
                tl.store(entry_ptr + rows, entry, mask=rm)
            else:
                tl.store(top_bias_ptr + rows, bias, mask=rm)
                tl.store(top_ban_len_ptr + rows, ban_len, mask=rm)
                tl.store(top_entry_ptr + rows, entry, mask=rm)
    else:
        tl.store(bias_ptr + rows, tl.zeros((BLOCK_B,), tl.float32), mask=rm)
        tl.store(ban_len_ptr + rows, tl.zeros((BLOCK_B,), tl.int64), mask=rm)
        tl.store(entry_ptr + rows, tl.full((BLOCK_B,), -1, tl.int64), mask=rm)
        tl.store(top_bias_ptr + rows, tl.zeros((BLOCK_B,), tl.float32), mask=rm)
        tl.store(top_ban_len_ptr + rows, tl.zeros((BLOCK_B,), tl.int64), mask=rm)
        tl.store(top_entry_ptr + rows, tl.full((BLOCK_B,), -1, tl.int64), mask=rm)
