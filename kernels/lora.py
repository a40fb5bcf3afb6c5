"""Triton kernels for the multi-adapter LoRA linear, and the one heuristic that picks their meta-parameters.

    y[m, n] = x[m] · W[n] + s[slice(n), a_m] · Σ_r (x[m] · A[a_m, slice(n)·R + r]) · B[a_m, n, r]

``a_m`` is row m's adapter (outside [0, n_adapters) = no adapter). The output columns may be split into up to three
slices (q/k/v, or gate/up) that share one launch, each with its own LoRA pair or none: the A matrices of the slices are
stacked along the rank axis (``RT = n_slices · R`` rows per adapter), the B matrices along the output axis.

Two ways to get the shrink ``xa = x·Aᵀ`` ([M, RT], tiny):

* fused (``FUSE_SHRINK``, one launch): only when a single adapter is stacked, so every row of an M-block shares it. The
  shrink rides in the base K loop on the x tile already loaded; the expand and the scale are applied to the fp32
  accumulator before the one store, with B and the scale loaded before the loop so that their latency hides behind
  the W stream. Each N-block re-reads A from L2 (R/BLOCK_N of the W traffic), hence a cap on the rank.
* two-phase: ``_lora_shrink_kernel`` (one program per M-block, rank block, K-split and stacked adapter; programs whose
  adapter has no row in the block do nothing) writes fp32 partials of s·xa to a workspace, then the base kernel adds
  the expand in its epilogue, one pipelined step per (stacked adapter, rank chunk) with loads masked to that adapter's
  rows. The grid depends on the number of stacked adapters, never on the mix in the batch, and nothing is read back
  to the host, so a captured CUDA graph stays valid when the mix changes.

In both, rows without an adapter and columns of slices without LoRA take the base accumulator through ``tl.where``
untouched, so they are bit-identical to the same kernel launched with ``HAS_LORA=False``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import triton
import triton.language as tl

# Under the interpreter (TRITON_INTERPRET=1, read when this module is imported) bf16 is not what a GPU makes of it:
# ``tl.dot`` multiplies bf16 operands as their raw bits (numpy has no bf16) and returns garbage, and fp32 -> bf16
# casts truncate instead of rounding to nearest. There, and only there, ``dot_operand`` upcasts bf16 operands to
# fp32 (exact) and ``cast`` rounds to nearest even by hand. Compiled kernels never take those branches (a
# constexpr), so GPU code is unchanged.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# Largest M served by the decode shape class (one M-block: W is streamed from HBM exactly once).
DECODE_MAX_M = 64
# Largest padded stacked rank (n_slices · R, rounded up to a power of two) for which the fused path is picked: on an
# H100 at M = 1 and r = 64 it is still 10-21% faster than shrink + expand (bench/results/lora_sweep_*.json), but A's
# pipeline stages grow with the rank and squeeze out W's.
FUSE_MAX_RANK = 64
# Most K-splits of the shrink, as splits × BLOCK_M of the base kernel: the expand loads that many rows of fp32
# partials (unrolled) per adapter step, which must stay small next to its W tiles.
MAX_SPLIT_ROWS = 128


class LoRAMeta(NamedTuple):
    """Meta-parameters of one launch of the LoRA linear (see :func:`lora_meta`)."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int  # fused: the whole padded stacked rank; two-phase: the chunk the expand iterates over
    num_warps: int
    num_stages: int
    fuse_shrink: bool
    group_m: int
    expand_stages: int  # two-phase expand: pipeline depth of the (adapter, rank chunk) loop
    # two-phase shrink kernel
    shrink_block_m: int
    shrink_block_r: int
    shrink_block_k: int
    shrink_split_k: int
    shrink_k_per_split: int


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def lora_meta(
    m: int, n: int, k: int, rt: int, n_adapters: int, itemsize: int, num_sms: int, smem_bytes: int
) -> LoRAMeta:
    """Pick the meta-parameters for one shape: one rule per shape class, no autotuning.

    Decode (``m <= DECODE_MAX_M``): a GEMV-like pass, memory-bound on W. One M-block holds every row, so W is read
    once; ``tl.dot`` pads M to 16 rows (the tensor-core work is free here). The W tile is the narrowest of 32, 64 and
    128 rows whose N-blocks fit in one wave on the SMs, 512 bytes deep in K for 32 rows and 256 bytes otherwise;
    4 warps; as many pipeline stages (up to 4) as shared memory holds. On an H100 (bench/results/lora_sweep_*.json,
    M = 1 and 32, Llama-2-7B shapes) this picks 32×256 for N = 4096 and 128×128 for N = 11008, each the fastest or
    within 2% of it for the base pass and the fused r = 16 pass; at r = 64 the wide tile matters (A is re-read from
    L2 once per N-block: 48 µs instead of 59 µs for 4096→11008), and 4 stages beat 3 by 10%. 8 warps lose up to 60%
    once the shrink rides along.
    Prefill: the standard compute-bound tile (128×128×64 for 16-bit inputs) in grouped order for L2 reuse.

    Parameters
    ----------
    m, n, k : rows, output features and input features.
    rt : stacked rank (n_slices · R); 0 when no LoRA is applied.
    n_adapters : number of stacked adapters (not the number present in the batch, which stays on the device).
    itemsize : bytes per element of x (2 or 4).
    num_sms : streaming multiprocessors of the device.
    smem_bytes : shared memory one program may use (``shared_memory_per_block_optin``).
    """
    wide = itemsize == 4
    if m <= DECODE_MAX_M:
        block_m = _pow2(m)
        block_n = next((bn for bn in (32, 64) if triton.cdiv(n, bn) <= num_sms), 128)
        block_k = (512 if block_n == 32 else 256) // itemsize
        num_warps = 4
    else:
        block_m, block_n, block_k = (64, 64, 32) if wide else (128, 128, 64)
        num_warps = 4 if wide else 8
    block_rt = _pow2(rt) if rt else 16
    fuse = m <= DECODE_MAX_M and n_adapters == 1 and block_rt <= FUSE_MAX_RANK
    # Pipeline depth: x, W (and A when fused) tiles per stage; the epilogue reuses the pipeline's shared memory.
    per_stage = (block_m + block_n + (block_rt if fuse else 0)) * block_k * itemsize
    num_stages = max(2, min(4, smem_bytes // per_stage))

    # Shrink kernel: split K so that even a single decode row is spread over enough programs to stream A quickly.
    shrink_block_m = min(_pow2(m), 64)
    shrink_block_r = min(block_rt, 64)
    shrink_block_k = 64 if wide else 128
    tiles = triton.cdiv(m, shrink_block_m) * triton.cdiv(max(rt, 1), shrink_block_r)
    k_blocks = triton.cdiv(k, shrink_block_k)
    split = max(1, min(k_blocks, triton.cdiv(num_sms, tiles), MAX_SPLIT_ROWS // block_m))
    k_per_split = triton.cdiv(k_blocks, split) * shrink_block_k
    split = triton.cdiv(k, k_per_split) if k else 1
    return LoRAMeta(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        block_r=block_rt if fuse else min(block_rt, 64),
        num_warps=num_warps,
        num_stages=num_stages,
        fuse_shrink=fuse,
        group_m=8,
        expand_stages=2 if m <= DECODE_MAX_M else 1,
        shrink_block_m=shrink_block_m,
        shrink_block_r=shrink_block_r,
        shrink_block_k=shrink_block_k,
        shrink_split_k=split,
        shrink_k_per_split=k_per_split,
    )


@triton.jit
def dot_operand(t):
    """``t`` as ``tl.dot`` should take it: itself, or under the interpreter a bf16 tile upcast to fp32."""
    if INTERPRETED:
        if t.dtype == tl.bfloat16:
            t = t.to(tl.float32)
    return t


@triton.jit
def cast(t, dtype: tl.constexpr):
    """``t.to(dtype)``; under the interpreter an fp32 -> bf16 cast rounded to nearest even, as a GPU does."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = t.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            # exactly a bf16 value, so the cast below is exact; NaNs as the canonical NaN (the carry could zero a
            # NaN, and truncating a NaN whose payload is in the low bits would give inf)
            t = tl.where(t != t, float("nan"), (bits & 0xFFFF0000).to(tl.float32, bitcast=True))
    return t.to(dtype)


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    scale_ptr,
    idx_ptr,
    xa_ptr,
    M,
    K,
    R,
    RT,
    n_adapters,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_aa,
    stride_ar,
    stride_ak,
    stride_ss,
    stride_wss,
    stride_wsm,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """xa_ws[split, m, j] = s[j // R, a_m] · Σ_{k in split} x[m, k] · A[a_m, j, k] in fp32, for rows of adapter a."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    # One program per (K-split, stacked adapter): the adapters present in a block are served in parallel.
    pid_s = tl.program_id(2) // n_adapters
    adapter = tl.program_id(2) % n_adapters
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < RT
    idx = tl.load(idx_ptr + offs_m, mask=offs_m < M, other=-1).to(tl.int32)
    rows = idx == adapter
    # Programs whose adapter has no row here store nothing; workspace rows of other adapters (or of none) are left
    # to their own programs, and the expand reads a row's partials only under that row's adapter.
    if tl.sum(rows.to(tl.int32), axis=0) > 0:
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        a_rows = a_ptr + adapter.to(tl.int64) * stride_aa + offs_r.to(tl.int64)[:, None] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_hi
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=rows[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(dot_operand(x), tl.trans(dot_operand(a)), acc, input_precision=DOT_PRECISION)
        # scale: [n_slices, n_adapters] fp32; stacked-rank row j belongs to slice j // R
        s = tl.load(scale_ptr + (offs_r // R) * stride_ss + adapter, mask=mask_r, other=0.0)
        ws = xa_ptr + pid_s * stride_wss + offs_m.to(tl.int64)[:, None] * stride_wsm + offs_r[None, :]
        tl.store(ws, acc * s[None, :], mask=rows[:, None] & mask_r[None, :])


@triton.jit
def _lora_linear_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
    a_ptr,
    b_ptr,
    scale_ptr,
    xa_ptr,
    M,
    N,
    K,
    R,
    RT,
    n_adapters,
    slice_end0,
    slice_end1,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    stride_ar,
    stride_ak,
    stride_ba,
    stride_bn,
    stride_br,
    stride_ss,
    stride_wss,
    stride_wsm,
    HAS_LORA: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,
    LORA_SLICES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    EXPAND_STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y = x·Wᵀ (+ LoRA on rows with an adapter and columns of slices in the LORA_SLICES bitmask)."""
    # Grouped program order: GROUP_M consecutive M-blocks sweep the N-blocks together, so W tiles are reused from L2
    # (decode has a single M-block, so this is a plain walk over N).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Row offsets in int64: M·stride and N·stride overflow int32 for long prompts and large vocabularies.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn

    if HAS_LORA:
        idx = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1).to(tl.int32)
        valid = (idx >= 0) & (idx < n_adapters)
        offs_r = tl.arange(0, BLOCK_R)
        # Column n belongs to slice (n >= end0) + (n >= end1); stacked-rank row j to slice j // R.
        slice_n = (offs_n >= slice_end0).to(tl.int32) + (offs_n >= slice_end1).to(tl.int32)
        col_lora = ((LORA_SLICES >> slice_n) & 1) != 0
        b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    if HAS_LORA and FUSE_SHRINK:
        # The single adapter's A: [RT, K]; rows without adapter ride along and are masked at the end. The A loads must
        # not depend on the adapter index: a mask waiting for that load would stall the W pipeline's prologue.
        a_rows = a_ptr + offs_r.to(tl.int64)[:, None] * stride_ar
        mask_a = (offs_r < RT)[:, None]
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # Scale and B are loaded before the K loop: their latency hides behind the W stream instead of adding to the
        # tail of every program. B is gathered as [RT, BLOCK_N]: row j is slice j // R's rank j % R, zero outside
        # column n's slice.
        s = tl.load(scale_ptr + (offs_r // R) * stride_ss, mask=offs_r < RT, other=0.0)
        mask_b = (offs_r < RT)[:, None] & ((offs_r // R)[:, None] == slice_n[None, :]) & mask_n[None, :]
        b = tl.load(b_cols + (offs_r % R)[:, None] * stride_br, mask=mask_b, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = dot_operand(x)
        acc = tl.dot(x, tl.trans(dot_operand(w)), acc, input_precision=DOT_PRECISION)
        if HAS_LORA and FUSE_SHRINK:
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=mask_a & mask_k[None, :], other=0.0)
            xa = tl.dot(x, tl.trans(dot_operand(a)), xa, input_precision=DOT_PRECISION)

    if HAS_LORA:
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FUSE_SHRINK:
            # The expand runs in the input dtype on tensor cores, like the reference's second F.linear.
            xs = cast(xa * s[None, :], x_ptr.dtype.element_ty)
            delta = tl.dot(dot_operand(xs), dot_operand(b), delta, input_precision=DOT_PRECISION)
        else:
            ws_rows = xa_ptr + offs_m.to(tl.int64)[:, None] * stride_wsm
            n_chunks = tl.cdiv(RT, BLOCK_R)
            # One flat loop over (stacked adapter, rank chunk), loads masked to the adapter's rows (no traffic for an
            # adapter absent from the block) and no branch, so the pipeliner overlaps the steps' load latencies.
            for t in tl.range(0, n_adapters * n_chunks, num_stages=EXPAND_STAGES):
                j = t // n_chunks
                rr = (t % n_chunks) * BLOCK_R + offs_r
                rows_j = valid & (idx == j)
                mask_xs = rows_j[:, None] & (rr < RT)[None, :]
                xs = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for sp in tl.static_range(NUM_SPLITS):
                    xs += tl.load(ws_rows + sp * stride_wss + rr[None, :], mask=mask_xs, other=0.0)
                mask_b = (rr < RT)[:, None] & ((rr // R)[:, None] == slice_n[None, :]) & mask_n[None, :]
                mask_b = mask_b & (tl.sum(rows_j.to(tl.int32), axis=0) > 0)
                b = tl.load(
                    b_cols + tl.cast(j, tl.int64) * stride_ba + (rr % R)[:, None] * stride_br, mask=mask_b, other=0.0
                )
                xs = dot_operand(cast(xs, x_ptr.dtype.element_ty))
                delta = tl.dot(xs, dot_operand(b), delta, input_precision=DOT_PRECISION)
        acc = tl.where(valid[:, None] & col_lora[None, :], acc + delta, acc)

    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, cast(acc, y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
