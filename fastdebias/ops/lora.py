"""Host side of the Triton multi-adapter LoRA linear: validate → pack → allocate → pick meta-parameters → launch.

The kernels and the heuristic live in ``fastdebias.kernels.lora``; the PyTorch reference (the CPU path and the test
oracle) in ``fastdebias.reference.lora``. Nothing here reads a device tensor back to the host: the adapter index stays
on the device and the grid depends only on shapes, so a decode step using these ops can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch
import triton

from fastdebias.errors import AdapterError, BackendError, GenerationError
from fastdebias.kernels.lora import LoRAMeta, _lora_linear_kernel, _lora_shrink_kernel, lora_meta
from fastdebias.ops import device_limits as _device_limits

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SLICES = 3

LoRAPair = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SlicedLoRA(NamedTuple):
    """The LoRA pairs of several output slices of one fused projection, stacked for a single launch.

    Build it once per module with :func:`pack_sliced_lora` (at load time) and pass it to
    :func:`lora_linear_sliced` in place of the list of pairs, so the decode step does no packing.

    Attributes
    ----------
    lora_a : [n_adapters, n_slices · R, K]; slice i's A occupies rows [i·R, i·R + r_i), zeros elsewhere.
    lora_b : [n_adapters, sum(slice_sizes), R]; slice i's B occupies its output rows, ranks padded to R.
    scale : [n_slices, n_adapters] fp32; 0 for slices without LoRA.
    slice_sizes : output features of each slice.
    lora_slices : bitmask of the slices that carry a LoRA pair (bit i = slice i).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: torch.Tensor
    slice_sizes: tuple[int, ...]
    lora_slices: int


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    adapter_idx: torch.Tensor | None = None,
    *,
    meta: LoRAMeta | None = None,
) -> torch.Tensor:
    """Base projection plus, per row, one of several unmerged LoRA adapters, in one or two Triton launches.

    Same contract as ``fastdebias.reference.lora.lora_linear``.

    Parameters
    ----------
    x : [M, K] fp16, bf16 or fp32.
    weight : [N, K], same dtype and device as ``x``.
    lora_a : [n_adapters, R, K] stacked A matrices (ranks below R zero-padded), same dtype as ``x``; or None.
    lora_b : [n_adapters, N, R] stacked B matrices, same dtype as ``x``; or None.
    scale : [n_adapters] fp32 per-adapter scale (0 where the adapter does not target this module); or None.
    adapter_idx : [M] int32/int64 adapter of each row, -1 (or any index outside [0, n_adapters)) for none; or None.
    meta : meta-parameters overriding ``fastdebias.kernels.lora.lora_meta`` (benchmarks and tuning only).

    Returns
    -------
    [M, N] tensor in ``x.dtype``, accumulated in fp32. With ``lora_a`` or ``adapter_idx`` None it is the plain base
    projection; rows without an adapter are bit-identical to it.
    """
    _check_base(x, weight)
    packed = None
    if lora_a is not None or lora_b is not None or scale is not None:
        _check_pair(lora_a, lora_b, scale, x, weight.shape[0], "lora_a", "lora_b", "scale")
        packed = SlicedLoRA(lora_a, lora_b, scale.contiguous().view(1, -1), (weight.shape[0],), 1)
    return _launch(x, weight, packed, adapter_idx, meta)


def pack_sliced_lora(
    slice_sizes: Sequence[int],
    loras: Sequence[LoRAPair | None],
) -> SlicedLoRA | None:
    """Stack the LoRA pairs of up to three output slices (q/k/v, gate/up) for :func:`lora_linear_sliced`.

    Parameters
    ----------
    slice_sizes : output features N_i of each slice.
    loras : per slice, ``(lora_a [n_adapters, r_i, K], lora_b [n_adapters, N_i, r_i], scale [n_adapters] fp32)``
        or None for a slice without LoRA. Every pair must stack the same adapters (same n_adapters, dtype, device).

    Returns
    -------
    The stacked pairs, or None when no slice carries a LoRA pair.
    """
    sizes = _check_slices(slice_sizes, loras)
    pairs = [(i, p) for i, p in enumerate(loras) if p is not None]
    if not pairs:
        return None
    a0 = pairs[0][1][0]
    n_adapters, _, k = a0.shape
    for i, (a, b, s) in pairs:
        _check_pair(a, b, s, a0, sizes[i], f"loras[{i}][0]", f"loras[{i}][1]", f"loras[{i}][2]", k=k)
        if a.shape[0] != n_adapters:
            raise AdapterError(
                f"loras[{i}] stacks {a.shape[0]} adapters but loras[{pairs[0][0]}] stacks {n_adapters}: "
                "stack the same adapters for every slice (zero scale where one does not target it)"
            )
    r = max(a.shape[1] for _, (a, _, _) in pairs)
    n_slices = len(sizes)
    lora_a = a0.new_zeros(n_adapters, n_slices * r, k)
    lora_b = a0.new_zeros(n_adapters, sum(sizes), r)
    scale = torch.zeros(n_slices, n_adapters, dtype=torch.float32, device=a0.device)
    bits = 0
    for i, (a, b, s) in pairs:
        start = sum(sizes[:i])
        lora_a[:, i * r : i * r + a.shape[1]] = a
        lora_b[:, start : start + sizes[i], : b.shape[2]] = b
        scale[i] = s
        bits |= 1 << i
    return SlicedLoRA(lora_a, lora_b, scale, tuple(sizes), bits)


def lora_linear_sliced(
    x: torch.Tensor,
    weight: torch.Tensor,
    slice_sizes: Sequence[int],
    loras: Sequence[LoRAPair | None] | SlicedLoRA | None,
    adapter_idx: torch.Tensor | None,
    *,
    meta: LoRAMeta | None = None,
) -> torch.Tensor:
    """Fused projection (q/k/v or gate/up) in one launch, each output slice with its own LoRA pair or none.

    Equals ``torch.cat([lora_linear(x, W_i, *loras[i], adapter_idx) for each slice i], dim=-1)``
    (reference: ``fastdebias.reference.lora.lora_linear_sliced``).

    Parameters
    ----------
    x : [M, K] fp16, bf16 or fp32.
    weight : [sum(slice_sizes), K] the slices' weights concatenated along the output axis, same dtype as ``x``.
    slice_sizes : output features N_i of each slice (1 to 3 slices).
    loras : per slice ``(lora_a [n_adapters, r_i, K], lora_b [n_adapters, N_i, r_i], scale [n_adapters] fp32)``
        or None; or the result of :func:`pack_sliced_lora` (no packing per call: use this in the decode loop).
    adapter_idx : [M] int32/int64 adapter of each row, -1 for none; or None (base projection only).
    meta : meta-parameters overriding ``fastdebias.kernels.lora.lora_meta`` (benchmarks and tuning only).

    Returns
    -------
    [M, sum(slice_sizes)] tensor in ``x.dtype``.
    """
    _check_base(x, weight)
    if sum(slice_sizes) != weight.shape[0]:
        raise GenerationError(
            f"slice_sizes sum to {sum(slice_sizes)} but weight has {weight.shape[0]} output rows: "
            "pass the sizes of the concatenated slices"
        )
    if isinstance(loras, SlicedLoRA):
        packed = loras
        if tuple(slice_sizes) != packed.slice_sizes:
            raise GenerationError(
                f"slice_sizes={list(slice_sizes)} differs from the packed loras' {list(packed.slice_sizes)}: "
                "pack with the same slice sizes"
            )
    else:
        packed = pack_sliced_lora(slice_sizes, loras if loras is not None else [None] * len(slice_sizes))
    if packed is not None:
        _check_same(packed.lora_a, x, "loras")
        if packed.lora_a.shape[2] != x.shape[1]:
            raise AdapterError(f"loras have K={packed.lora_a.shape[2]} but x has K={x.shape[1]}")
    return _launch(x, weight, packed, adapter_idx, meta)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: SlicedLoRA | None,
    adapter_idx: torch.Tensor | None,
    meta: LoRAMeta | None,
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    has_lora = packed is not None and adapter_idx is not None and packed.lora_slices != 0
    if has_lora:
        _check_idx(adapter_idx, x)
        adapter_idx = adapter_idx.contiguous()
        n_adapters, rt, _ = packed.lora_a.shape
        r = rt // len(packed.slice_sizes)
    else:
        n_adapters = rt = r = 0
    if meta is None:
        meta = lora_meta(m, n, k, rt, n_adapters, x.element_size(), *_device_limits(x.device))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sizes = packed.slice_sizes if has_lora else (n,)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))] + [n] * (MAX_SLICES - len(sizes))

    if has_lora:
        a, b, scale = packed.lora_a, packed.lora_b, packed.scale
        idx = adapter_idx
        fuse = meta.fuse_shrink and n_adapters == 1 and rt <= meta.block_r
        if fuse:
            xa, n_split = x, 0  # the shrink stays in registers
        else:
            n_split = meta.shrink_split_k
            # s·x·Aᵀ partial sums over K-splits: [n_split, M, RT] fp32; rows without adapter are never written nor read.
            xa = torch.empty(n_split, m, rt, dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(m, meta.shrink_block_m), triton.cdiv(rt, meta.shrink_block_r), n_split * n_adapters)
            _lora_shrink_kernel[grid](
                x, a, scale, idx, xa,
                m, k, r, rt, n_adapters, meta.shrink_k_per_split,
                x.stride(0), x.stride(1),
                a.stride(0), a.stride(1), a.stride(2),
                scale.stride(0),
                xa.stride(0), xa.stride(1),
                BLOCK_M=meta.shrink_block_m,
                BLOCK_R=meta.shrink_block_r,
                BLOCK_K=meta.shrink_block_k,
                DOT_PRECISION=precision,
                num_warps=4,
            )  # fmt: skip
        strides_a = (a.stride(1), a.stride(2))
        strides_b = (b.stride(0), b.stride(1), b.stride(2))
        strides_ws = (xa.stride(0), xa.stride(1))
        stride_ss = scale.stride(0)
        lora_slices = packed.lora_slices
    else:
        # Unused pointer arguments: any tensor will do, HAS_LORA=False compiles their uses away.
        a = b = scale = idx = xa = x
        fuse, n_split = False, 0
        strides_a, strides_b, strides_ws, stride_ss = (0, 0), (0, 0, 0), (0, 0), 0
        lora_slices = 0

    grid = (triton.cdiv(m, meta.block_m) * triton.cdiv(n, meta.block_n),)
    _lora_linear_kernel[grid](
        x, weight, y, idx, a, b, scale, xa,
        m, n, k, r, rt, n_adapters, ends[0], ends[1],
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        y.stride(0), y.stride(1),
        *strides_a, *strides_b, stride_ss, *strides_ws,
        HAS_LORA=has_lora,
        FUSE_SHRINK=fuse,
        LORA_SLICES=lora_slices,
        NUM_SPLITS=n_split,
        EXPAND_STAGES=meta.expand_stages,
        BLOCK_M=meta.block_m,
        BLOCK_N=meta.block_n,
        BLOCK_K=meta.block_k,
        BLOCK_R=meta.block_r,
        GROUP_M=meta.group_m,
        DOT_PRECISION=precision,
        num_warps=meta.num_warps,
        num_stages=meta.num_stages,
    )  # fmt: skip
    return y


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_base(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise GenerationError(f"x must be a [M, K] tensor, got {_describe(x)}: flatten the leading dimensions first")
    if x.dtype not in _DTYPES:
        raise GenerationError(f"x has dtype {x.dtype}; the Triton LoRA linear takes float16, bfloat16 or float32")
    if x.device.type != "cuda" and not _interpreting():
        raise BackendError(
            f"x is on {x.device}; the Triton LoRA linear runs on CUDA (or on CPU under TRITON_INTERPRET=1): "
            "move the tensors to the GPU or use backend='torch'"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise GenerationError(f"weight must be [N, K={x.shape[1]}] to match x, got {_describe(weight)}")
    _check_same(weight, x, "weight")


def _check_same(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if t.dtype != x.dtype:
        raise GenerationError(f"{name} has dtype {t.dtype} but x has {x.dtype}: cast {name} to {x.dtype}")
    if t.device != x.device:
        raise GenerationError(f"{name} is on {t.device} but x is on {x.device}: move {name} to {x.device}")


def _check_pair(
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    s: torch.Tensor | None,
    like: torch.Tensor,
    n: int,
    name_a: str,
    name_b: str,
    name_s: str,
    k: int | None = None,
) -> None:
    """Check one LoRA pair: A [n_adapters, r, K], B [n_adapters, n, r], scale [n_adapters] fp32."""
    if a is None or b is None or s is None:
        raise GenerationError(f"{name_a}, {name_b} and {name_s} must be given together (or all None for no LoRA)")
    k = like.shape[-1] if k is None else k
    if a.dim() != 3 or a.shape[2] != k or a.shape[0] < 1 or a.shape[1] < 1:
        raise AdapterError(f"{name_a} must be [n_adapters, R, K={k}], got {_describe(a)}")
    n_adapters, r = a.shape[0], a.shape[1]
    if b.dim() != 3 or tuple(b.shape) != (n_adapters, n, r):
        raise AdapterError(
            f"{name_b} must be [n_adapters={n_adapters}, N={n}, R={r}] to match {name_a}, got {_describe(b)}"
        )
    _check_same(a, like, name_a)
    _check_same(b, like, name_b)
    if s.dim() != 1 or s.shape[0] != n_adapters or s.dtype != torch.float32:
        raise AdapterError(f"{name_s} must be a float32 [n_adapters={n_adapters}] tensor, got {_describe(s)}")
    if s.device != like.device:
        raise GenerationError(f"{name_s} is on {s.device} but x is on {like.device}: move {name_s} to {like.device}")


def _check_idx(idx: torch.Tensor, x: torch.Tensor) -> None:
    if idx.dim() != 1 or idx.shape[0] != x.shape[0] or idx.dtype not in (torch.int32, torch.int64):
        raise GenerationError(
            f"adapter_idx must be an int32/int64 [M={x.shape[0]}] tensor (-1 = no adapter), got {_describe(idx)}"
        )
    if idx.device != x.device:
        raise GenerationError(f"adapter_idx is on {idx.device} but x is on {x.device}: keep it on {x.device}")


def _check_slices(slice_sizes: Sequence[int], loras: Sequence[LoRAPair | None]) -> list[int]:
    sizes = [int(s) for s in slice_sizes]
    if not 1 <= len(sizes) <= MAX_SLICES or any(s < 1 for s in sizes):
        raise GenerationError(f"slice_sizes={sizes} must hold 1 to {MAX_SLICES} positive sizes")
    if len(loras) != len(sizes):
        raise GenerationError(f"loras has {len(loras)} entries for {len(sizes)} slices: give one (or None) per slice")
    return sizes


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return type(t).__name__
