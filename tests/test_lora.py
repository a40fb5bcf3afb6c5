"""Triton multi-adapter LoRA linear (fastdebias.ops.lora) against the PyTorch reference (fastdebias.reference.lora).

On a CPU-only machine the kernels run under the Triton interpreter (fp32, fp16 and bf16, small shapes: the kernels
upcast bf16 ``tl.dot`` operands and round bf16 casts by hand there, ``fastdebias.kernels.lora.dot_operand`` and
``cast``); Llama-size shapes, CUDA-graph replay and the no-host-sync check carry the ``gpu`` marker and skip without
CUDA.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before fastdebias.kernels is imported: triton.jit reads it when the kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastdebias.errors import AdapterError, BackendError, FastDebiasError, GenerationError  # noqa: E402
from fastdebias.ops import lora as tl_lora  # noqa: E402
from fastdebias.reference import lora as ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# dtype → (rtol, atol). Outputs reach |y| ~ 10. The reference rounds x·Aᵀ, the LoRA delta and the sum to the input
# dtype while the kernel rounds once, so 16-bit results differ by up to ~2 ulp of the larger of base and delta (the
# worst seen under the interpreter is 0.75 of this budget). A wrong adapter, rank or scale moves outputs by O(1).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 4e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def make_weight(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)


def make_lora(
    n_adapters: int, n: int, k: int, r: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked A [n_adapters, r, K], B [n_adapters, N, r], scale [n_adapters]; adapter i has rank max(1, r >> i)."""
    a = torch.randn(n_adapters, r, k, generator=gen) / k**0.5
    b = torch.randn(n_adapters, n, r, generator=gen) / r**0.5
    for i in range(n_adapters):
        a[i, max(1, r >> i) :] = 0
        b[i, :, max(1, r >> i) :] = 0
    scale = 0.5 + torch.rand(n_adapters, generator=gen)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), scale.to(DEVICE)


def make_idx(m: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """Adapter index per row: 'none' (all -1), 'one' (adapter 0, every third row -1), 'three' (0, 1, 2 and -1)."""
    if pattern == "none":
        idx = torch.full((m,), -1)
    elif pattern == "one":
        idx = torch.where(torch.arange(m) % 3 == 1, -1, 0)
    else:
        idx = torch.randint(0, 3, (m,), generator=gen)
        idx[1::4] = -1
        idx[: min(m, 3)] = torch.tensor([0, 1, 2])[: min(m, 3)]
    return idx.to(DEVICE)


# (M, K, N, R, n_adapters, pattern): decode shapes (M <= 64) go through the fused path when one adapter is stacked
# and the rank is small, otherwise through shrink + expand; M > 64 is the prefill shape class.
CASES = [
    (1, 7, 7, 1, 1, "one"),
    (1, 257, 123, 128, 1, "one"),
    (3, 123, 257, 8, 1, "one"),
    (4, 123, 257, 16, 4, "three"),
    (7, 257, 7, 64, 4, "three"),
    (5, 64, 172, 16, 3, "three"),  # 4096 → 11008 scaled down
    (8, 172, 64, 8, 1, "none"),  # 11008 → 4096 scaled down
    (2, 128, 128, 128, 3, "one"),
    (33, 64, 172, 64, 1, "one"),
    (130, 123, 257, 16, 3, "three"),
    (100, 64, 172, 1, 1, "one"),
    (70, 172, 64, 64, 2, "none"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r,n_adapters,pattern", CASES)
def test_matches_reference(m, k, n, r, n_adapters, pattern, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k + n + r)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = make_weight(n, k, dtype, gen)
    a, b, s = make_lora(n_adapters, n, k, r, dtype, gen)
    idx = make_idx(m, pattern, gen)
    expected = ref.lora_linear(x, w, a, b, s, idx)
    assert_close(tl_lora.lora_linear(x, w, a, b, s, idx), expected)
    if pattern != "none":  # the LoRA term is far above the tolerance, so dropping it cannot pass
        assert (expected - F.linear(x, w))[idx >= 0].abs().max() > 0.1


@triton.jit
def _cast_probe_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    from fastdebias.kernels.lora import cast

    offs = tl.arange(0, BLOCK)
    m = offs < N
    tl.store(y_ptr + offs, cast(tl.load(x_ptr + offs, mask=m), y_ptr.dtype.element_ty), mask=m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_casts_round_as_torch_does(dtype):
    """The kernels' fp32 -> 16-bit casts round to nearest even as torch (and a GPU) do, over 60 decades, ties and
    the largest finite values included, and NaNs stay NaN (the interpreter's own bf16 cast truncates: ``cast`` rounds
    by hand there)."""
    g = torch.Generator().manual_seed(0)
    lim = 30 if dtype == torch.bfloat16 else 4
    x = torch.randn(4096, generator=g) * torch.logspace(-lim, lim, 4096)
    x[:6] = torch.tensor([float("inf"), -float("inf"), 0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)])
    # NaNs of every payload stay NaN (the hand rounding's carry would turn some into zeros)
    bits = [0x7FC00000, -0x400000, 0x7FFFFFFF, -1, 0x7F80FFFF, 0x7FFF8000]
    x[6:12] = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    x = x.to(DEVICE)
    y = torch.empty(4096, dtype=dtype, device=DEVICE)
    _cast_probe_kernel[(1,)](x, y, 4096, BLOCK=4096)
    nan = torch.isnan(x)
    assert nan.sum().item() == 6 and torch.isnan(y[nan]).all()
    assert torch.equal(y[~nan], x[~nan].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_base_projection_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    for m, k, n in [(1, 7, 7), (3, 257, 123), (130, 123, 257)]:
        x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
        w = make_weight(n, k, dtype, gen)
        assert_close(tl_lora.lora_linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("m,n_adapters,r", [(3, 1, 16), (3, 4, 16), (5, 1, 128), (130, 3, 8)])
def test_rows_without_adapter_bit_identical_to_base(m, n_adapters, r):
    # Fused decode, two-phase decode (several adapters, or a rank too large to fuse) and prefill.
    gen = torch.Generator().manual_seed(m + r)
    k, n = 123, 257
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.float16)
    w = make_weight(n, k, torch.float16, gen)
    a, b, s = make_lora(n_adapters, n, k, r, torch.float16, gen)
    idx = make_idx(m, "three" if n_adapters >= 3 else "one", gen)
    idx[-1] = n_adapters  # out of range: treated as no adapter, like the reference
    y = tl_lora.lora_linear(x, w, a, b, s, idx)
    base = tl_lora.lora_linear(x, w)
    none = (idx < 0) | (idx >= n_adapters)
    assert torch.equal(y[none], base[none])
    assert not torch.equal(y[~none], base[~none])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merged_weights_match_unmerged(dtype):
    gen = torch.Generator().manual_seed(7)
    m, k, n, r = 9, 123, 257, 16
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = make_weight(n, k, dtype, gen)
    a, b, s = make_lora(3, n, k, r, dtype, gen)
    idx = make_idx(m, "three", gen)
    y = tl_lora.lora_linear(x, w, a, b, s, idx)
    for adapter in range(3):
        rows = idx == adapter
        merged = (w.float() + s[adapter] * b[adapter].float() @ a[adapter].float()).to(dtype)
        assert_close(y[rows], F.linear(x[rows], merged))


# (M, K, slice sizes, slice ranks (None = no LoRA), n_adapters, pattern): q/k/v with GQA-like k/v, gate/up.
SLICED = [
    (3, 123, (64, 16, 16), (8, None, 16), 1, "one"),
    (5, 57, (123, 123), (4, 16), 3, "three"),
    (6, 64, (7, 5, 5), (None, 2, 8), 3, "three"),
    (70, 57, (64, 16, 16), (16, 16, 16), 2, "one"),
    (2, 33, (9,), (5,), 2, "none"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,sizes,ranks,n_adapters,pattern", SLICED)
def test_sliced_matches_reference(m, k, sizes, ranks, n_adapters, pattern, dtype):
    gen = torch.Generator().manual_seed(m + k + sum(sizes))
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = make_weight(sum(sizes), k, dtype, gen)
    loras = [None if r is None else make_lora(n_adapters, size, k, r, dtype, gen) for size, r in zip(sizes, ranks)]
    idx = make_idx(m, pattern, gen)
    y = tl_lora.lora_linear_sliced(x, w, sizes, loras, idx)
    assert_close(y, ref.lora_linear_sliced(x, w, sizes, loras, idx))
    # Packed once (at load time) gives the very same launch.
    packed = tl_lora.pack_sliced_lora(sizes, loras)
    assert torch.equal(tl_lora.lora_linear_sliced(x, w, sizes, packed, idx), y)
    # Rows without adapter and slices without LoRA are the base projection, bit for bit.
    base = tl_lora.lora_linear(x, w)
    assert torch.equal(y[idx < 0], base[idx < 0])
    ends = torch.tensor(sizes).cumsum(0).tolist()
    for start, end, r in zip([0] + ends[:-1], ends, ranks):
        if r is None:
            assert torch.equal(y[:, start:end], base[:, start:end])


def test_sliced_without_any_lora_is_base():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 33, generator=gen).to(DEVICE)
    w = make_weight(30, 33, torch.float32, gen)
    idx = make_idx(4, "one", gen)
    assert torch.equal(tl_lora.lora_linear_sliced(x, w, [10, 20], [None, None], idx), tl_lora.lora_linear(x, w))
    assert tl_lora.pack_sliced_lora([10, 20], [None, None]) is None


def _bad_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen).to(DEVICE)
    w = make_weight(8, 16, torch.float32, gen)
    a, b, s = make_lora(2, 8, 16, 4, torch.float32, gen)
    idx = torch.tensor([0, 1, -1, 0], device=DEVICE)
    return x, w, a, b, s, idx


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda x, w, a, b, s, i: (x[0], w, a, b, s, i), GenerationError, "x must be"),
        (lambda x, w, a, b, s, i: (x.long(), w, a, b, s, i), GenerationError, "x has dtype"),
        (lambda x, w, a, b, s, i: (x, w[:, :8], a, b, s, i), GenerationError, "weight must be"),
        (lambda x, w, a, b, s, i: (x, w.half(), a, b, s, i), GenerationError, "cast weight"),
        (lambda x, w, a, b, s, i: (x, w, a[:, :, :8], b, s, i), AdapterError, "lora_a must be"),
        (lambda x, w, a, b, s, i: (x, w, a, b[:, :4], s, i), AdapterError, "lora_b must be"),
        (lambda x, w, a, b, s, i: (x, w, a.half(), b, s, i), GenerationError, "cast lora_a"),
        (lambda x, w, a, b, s, i: (x, w, a, b, s.half(), i), AdapterError, "scale must be"),
        (lambda x, w, a, b, s, i: (x, w, a, None, s, i), GenerationError, "given together"),
        (lambda x, w, a, b, s, i: (x, w, a, b, s, i[:3]), GenerationError, "adapter_idx must be"),
        (lambda x, w, a, b, s, i: (x, w, a, b, s, i.float()), GenerationError, "adapter_idx must be"),
    ],
    ids=lambda p: p.replace(" ", "_") if isinstance(p, str) else getattr(p, "__name__", "x").strip("<>"),
)
def test_bad_input_raises(mutate, error, match):
    with pytest.raises(error, match=match):
        tl_lora.lora_linear(*mutate(*_bad_inputs()))


def test_bad_slices_raise():
    x, w, a, b, s, idx = _bad_inputs()
    pair = (a, b[:, :4], s)
    with pytest.raises(GenerationError, match="slice_sizes sum"):
        tl_lora.lora_linear_sliced(x, w, [4, 5], [pair, None], idx)
    with pytest.raises(GenerationError, match="1 to 3"):
        tl_lora.lora_linear_sliced(x, w, [2, 2, 2, 2], [None] * 4, idx)
    with pytest.raises(GenerationError, match="one \\(or None\\) per slice"):
        tl_lora.lora_linear_sliced(x, w, [4, 4], [pair], idx)
    with pytest.raises(AdapterError, match="stack the same adapters"):
        tl_lora.lora_linear_sliced(x, w, [4, 4], [pair, (a[:1], b[:1, 4:], s[:1])], idx)
    packed = tl_lora.pack_sliced_lora([4, 4], [pair, None])
    with pytest.raises(GenerationError, match="packed loras"):
        tl_lora.lora_linear_sliced(x, w, [8], packed, idx)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, *_ = _bad_inputs()
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        tl_lora.lora_linear(x.cpu(), w.cpu())
    assert issubclass(BackendError, FastDebiasError)


# ---------------------------------------------------------------------------------------------------- GPU only


def _skip_on_oom(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            pytest.skip("CUDA out of memory")

    return wrapper


GPU_CASES = [
    (1, 4096, 4096, 16, 1, "one"),
    (1, 4096, 11008, 64, 8, "three"),
    (8, 11008, 4096, 16, 8, "three"),
    (32, 4096, 4096, 64, 1, "one"),
    (64, 4096, 1024, 128, 4, "three"),
    (517, 4096, 4096, 16, 4, "three"),
    (300, 2048, 5632, 64, 1, "one"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r,n_adapters,pattern", GPU_CASES)
@pytest.mark.gpu
@requires_cuda
@_skip_on_oom
def test_gpu_matches_reference(m, k, n, r, n_adapters, pattern, dtype):
    gen = torch.Generator().manual_seed(m + k + n + r)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = make_weight(n, k, dtype, gen)
    a, b, s = make_lora(n_adapters, n, k, r, dtype, gen)
    idx = make_idx(m, pattern, gen)
    y = tl_lora.lora_linear(x, w, a, b, s, idx)
    assert_close(y, ref.lora_linear(x, w, a, b, s, idx))
    base = tl_lora.lora_linear(x, w)
    assert torch.equal(y[idx < 0], base[idx < 0])
    assert_close(base, F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.gpu
@requires_cuda
@_skip_on_oom
def test_gpu_sliced_qkv_matches_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    k, sizes, m = 4096, (4096, 1024, 1024), 5
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = make_weight(sum(sizes), k, dtype, gen)
    loras = [make_lora(3, sizes[0], k, 16, dtype, gen), None, make_lora(3, sizes[2], k, 16, dtype, gen)]
    idx = make_idx(m, "three", gen)
    y = tl_lora.lora_linear_sliced(x, w, sizes, tl_lora.pack_sliced_lora(sizes, loras), idx)
    assert_close(y, ref.lora_linear_sliced(x, w, sizes, loras, idx))


@pytest.mark.parametrize("n_adapters", [1, 4])
@pytest.mark.gpu
@requires_cuda
@_skip_on_oom
def test_gpu_cuda_graph_replay_follows_adapter_mix(n_adapters):
    # The captured launch must stay valid when the adapter mix changes: no grid sized from the mix, no host sync.
    gen = torch.Generator().manual_seed(5)
    m, k, n, dtype = 8, 4096, 4096, torch.float16
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = make_weight(n, k, dtype, gen)
    a, b, s = make_lora(n_adapters, n, k, 16, dtype, gen)
    idx = torch.full((m,), -1, device=DEVICE)
    tl_lora.lora_linear(x, w, a, b, s, idx)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the op raises
    try:
        tl_lora.lora_linear(x, w, a, b, s, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tl_lora.lora_linear(x, w, a, b, s, idx)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tl_lora.lora_linear(x, w, a, b, s, idx)
    for pattern in ("none", "one", "three" if n_adapters >= 3 else "one", "none"):
        idx.copy_(make_idx(m, pattern, gen))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, ref.lora_linear(x, w, a, b, s, idx))


@pytest.mark.gpu
@requires_cuda
def test_gpu_mismatched_devices_raise():
    x, w, a, b, s, idx = _bad_inputs()
    with pytest.raises(GenerationError, match="move weight"):
        tl_lora.lora_linear(x, w.cpu())
    with pytest.raises(GenerationError, match="keep it on"):
        tl_lora.lora_linear(x, w, a, b, s, idx.cpu())
    with pytest.raises(BackendError, match="CUDA"):
        tl_lora.lora_linear(x.cpu(), w.cpu())
