"""The one dispatch point: model code calls ``fastdebias.ops.<op>``; the backend is picked here.

Order of preference for ``backend="auto"``: CUDA extension → Triton → PyTorch reference. The reference is
always available and is the CPU path.
"""

from __future__ import annotations

import os
import platform

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


def resolve_device(device) -> torch.device:
    """A user's device choice (None: CUDA if available, else CPU) → a torch.device this machine has, or
    BackendError naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise BackendError(f"device={device!r} is not a valid torch device ('cpu', 'cuda', 'cuda:1')") from e
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device={device!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device={device!r} requested but CUDA is not available; use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise BackendError(f"device={device!r}: this machine has {n} CUDA device(s); use cuda:0 .. cuda:{n - 1}")
    return dev


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
        if device.type != "cuda" and not _kernels_interpreted():
            raise BackendError(
                "backend='triton' on CPU: TRITON_INTERPRET=1 is set, but only after triton was imported, so its "
                "functions were defined for a GPU; set it before anything imports triton (in the shell: "
                "TRITON_INTERPRET=1 python ...)"
            )
        return "triton"
    if backend == "cuda":
        raise BackendError("backend='cuda' (csrc/ extension) is not built in this install; use 'triton' or 'torch'")
    return "torch"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_interpreted() -> bool:
    """Whether triton's own library functions (``tl.sum``, ``tl.argmax``: defined when triton is imported) and
    fastdebias's kernels are its interpreter's. TRITON_INTERPRET=1 set after ``import triton`` leaves the former
    compiled, and the kernels then fail at their first launch ("Cannot call @triton.jit'd outside of the scope of a
    kernel")."""
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    from fastdebias.kernels import lora as kernels

    return all(isinstance(f, InterpretedFunction) for f in (tl_standard.sum, kernels._lora_linear_kernel))


_DEVICE_LIMITS: dict[torch.device, tuple[int, int]] = {}


@torch.compiler.assume_constant_result
def device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory one program may opt into) of ``device``, read once per device; off CUDA an H100's,
    so that the interpreter runs the GPU's meta-parameter rules. The Triton ops' meta rules call it on every launch:
    inside a ``torch.compile``d region (the CUDA ``"compile"`` runtime's layer and head) dynamo calls it once at
    trace time and keeps the result as a constant, rather than tracing the device query."""
    limits = _DEVICE_LIMITS.get(device)
    if limits is None:
        if device.type != "cuda":
            limits = (132, 232448)
        else:
            props = torch.cuda.get_device_properties(device)
            limits = (props.multi_processor_count, props.shared_memory_per_block_optin)
        _DEVICE_LIMITS[device] = limits
    return limits


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
# ``bench/results/cpu_gemm_cpu.md`` (the 2-core CI CPU, AMD EPYC with AVX-512, SmolLM2 fp32 shapes), ms per step for
# the 120 decoder projections + lm_head, compiled multiply-reduce vs compiled oneDNN vs eager F.linear (MKL): 1 row
# 13.0 + 3.8 vs 34.2 + 7.6 vs 53.5 + 13.7; 2 rows 19.9 + 5.2 vs 33.7 + 7.5; 4 rows 51.0 + 9.1 vs 43.3 + 9.1 (a
# tie, 33.8 + 9.9 vs 33.1 + 6.9, in an earlier run); 8 rows 98.8 + 24.5 vs 53.7 + 8.9; 32 rows 317.6 + 81.7 vs
# 72.7 + 16.8.
CPU_GEMV_MAX_ROWS = 2
# fp32 CPU projections go to oneDNN's matmul (``mkldnn._linear_pointwise``) instead of F.linear (MKL's sgemm):
# faster at every size measured on the CI CPU: 1-32 rows in the same file, and prefill sizes, 64-2048 rows, in a
# one-off check of the same two calls (the 49152-wide lm_head at 64 rows 24 vs 60 ms, the gate/up at 512 rows 9.4
# vs 14.6). On the plain weight bf16 needs nothing: F.linear already takes oneDNN there (3072 x 576, 8 rows: 153 vs
# 155 us), with the same result bit for bit; what it gains is the packed weight (below). Only on x86-64, where it was
# measured. Read once: dynamo breaks the graph at a call of ``mkldnn.is_available``.
_ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
# bf16 weights are packed too where oneDNN computes bf16 natively (AVX512-BF16 or AMX); elsewhere it would emulate.
_ONEDNN_BF16 = _ONEDNN and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def _cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "GenuineIntel" if "GenuineIntel" in platform.processor() else ""  # (Windows names the vendor there)


# Except that on Intel CPUs fp32 projections of up to this many rows call F.linear (MKL's sgemm, Intel's library):
# there it beat oneDNN on the packed weight, where on the AMD EPYC above it took twice as long. ``bench/cpu_gemm.py``
# on the 2-core Intel Xeon CI machine (``bench/results/cpu_gemm_cpu-xeon.md``), the 120 SmolLM2 projections +
# lm_head of a step: 1/2/3 rows F.linear 17.5 + 2.8 / 20.3 + 3.1 / 22.1 + 4.7 ms vs oneDNN packed 22.4 + 2.6 /
# 26.1 + 3.5 / 24.2 + 4.6; 4 rows 31.2 + 5.1 vs 26.3 + 4.6, 8 rows 38.7 + 8.3 vs 29.3 + 5.3 (oneDNN), the layers'
# projections at 64 and 256 rows within 1 %. Inside torch.compile one row stays a multiply-reduce (14.6 + 3.3 there)
# and two rows take F.linear (20.1 + 3.1 compiled, against the multiply-reduce's 25.6 + 7.6). Whole decodes of
# SmolLM2 there, interleaved in one process (this rule vs 0): eager runtime 1.16-1.19x faster at batch 1-3 (TPOT
# 33.6 vs 39.7 ms at batch 1), batch 4 and 8 unchanged; compile runtime 1.46x at batch 2 (30.8 vs 44.9 ms), batch 1
# unchanged; same tokens. The two differ by rounding only (~1e-6 in fp32: their sums run in different orders), and
# the rule is fixed per machine, not measured at load, so a machine's results do not change from run to run. Set it
# to 0 to turn it off (before ``load``: the eager runtime keeps the plain weights only where it is on, and only where
# both copies fit ``cpu_pack_fits``; else the packed ones alone, and the rule has no plain weight to read).
CPU_MKL_MAX_ROWS = 3 if _ONEDNN and _cpu_vendor() == "GenuineIntel" else 0


def mkl_rows(x: torch.Tensor) -> bool:
    """Whether ``_base_linear`` computes the fp32 CPU projection of ``x`` [M, K] with F.linear on the plain weight
    (``CPU_MKL_MAX_ROWS``) rather than oneDNN's matmul (or, compiled, a multiply-reduce from 2 rows). Compiled, only
    up to ``CPU_GEMV_MAX_ROWS`` rows, so that the compiled layer's kinds stay those of 1, 2 and more rows."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    if torch.compiler.is_compiling():  # (one bound, the multiply-reduce's: a second would add a kind at 3 rows)
        return x.shape[0] <= min(CPU_MKL_MAX_ROWS, CPU_GEMV_MAX_ROWS)
    return x.shape[0] <= CPU_MKL_MAX_ROWS


def keeps_plain_weights(dtype: torch.dtype) -> bool:
    """Whether a CPU model of ``dtype`` under the eager runtime keeps its plain weights beside the packed ones
    (which it reads otherwise): where the projections of a few rows call F.linear (``CPU_MKL_MAX_ROWS``), and if both
    copies fit ``cpu_pack_fits`` (``LlamaDecoder.pack_cpu_weights``)."""
    return CPU_MKL_MAX_ROWS > 0 and dtype == torch.float32


# Rows the pre-packed CPU weights are laid out for (one packed copy serves every row count: packed for 8 rows and
# called with 1-512 rows it measured as fast as packing for the exact count or faster than the plain weight,
# ``bench/results/cpu_gemm_cpu.md``).
CPU_PACK_ROWS = 8
# Under the compiled runtime the packed copies sit beside the plain weights (its 1-2-row multiply-reduce reads
# those), and under the eager runtime where F.linear takes a few rows (``keeps_plain_weights``): both only when the
# copies take at most this fraction of the machine's RAM (else the compiled runtime keeps the plain weights alone,
# the eager one the packed ones alone). (Otherwise the eager runtime keeps the packed weights alone: nothing to add,
# no limit.)
CPU_PACK_MAX_RAM_FRACTION = 0.25


def pack_cpu_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A fp32 (or bf16, ``_ONEDNN_BF16``) CPU projection weight [N, K] reordered once into oneDNN's blocked layout
    (``mkldnn._reorder_linear_weight``), for ``_base_linear``; None where oneDNN's matmul is not the path (other
    dtypes, devices or architectures). oneDNN on the plain weight reorders it on every call: packed, the 120
    SmolLM2 projections of a step took 29.9 instead of 48.5 ms at 8 rows and 101 instead of 173 ms at 64 (fp32).
    In bf16, one call on SmolLM2's shapes took 40-65 % of F.linear's time at 1 row and 55-83 % at 8 and 64 rows
    (2-core AVX512-BF16 CPU, one process, 100-200 calls each), with the same result bit for bit."""
    if not cpu_packable(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), CPU_PACK_ROWS)


def cpu_packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dim() == 2 and _onednn_dtype(weight.dtype)


def _onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether a CPU projection in ``dtype`` goes to oneDNN's matmul (packed or not)."""
    return _ONEDNN and (dtype == torch.float32 or (dtype == torch.bfloat16 and _ONEDNN_BF16))


def cpu_pack_fits(nbytes: int) -> bool:
    """Whether ``nbytes`` of packed copies fit the ``CPU_PACK_MAX_RAM_FRACTION`` rule on this machine."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: do not pack
        return False
    return nbytes <= CPU_PACK_MAX_RAM_FRACTION * ram


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


# Inside torch.compile, an opaque op: inductor's own lowering of ``_linear_pointwise`` asserts on our packed weight
# (it expects weights frozen into the graph). Defined with the plain ``torch.library.Library`` API rather than
# ``torch.library.custom_op``, whose Python wrapper (autograd and schema checks) cost ~17 µs more per call: four
# projections of a batch-8 layer, compiled, 472-485 vs 539-555 µs (a /tmp micro-benchmark; ~2 ms per SmolLM2 token).
_LIB = torch.library.Library("fastdebias", "FRAGMENT")
_LIB.define("cpu_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("cpu_linear", _onednn, "CompositeExplicitAutograd")
_LIB.impl("cpu_linear", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]), "Meta")
_cpu_linear = torch.ops.fastdebias.cpu_linear


def multiply_reduce_rows(x: torch.Tensor) -> bool:
    """Whether ``_base_linear`` computes ``x`` [M, K] as a multiply-reduce on the plain weight (compiled, CPU, few
    rows). The model then does not even read its packed copy: inside ``torch.compile`` each read costs a guard per
    call (the batch-1 step measured ~1.4 ms slower with them)."""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[0] <= CPU_GEMV_MAX_ROWS):
        return False
    return x.shape[0] == 1 or not mkl_rows(x)


def reads_plain_weight(x: torch.Tensor) -> bool:
    """Whether ``_base_linear`` reads the plain weight for ``x`` (a multiply-reduce, or F.linear): the model then
    passes no packed one (inside torch.compile each read costs a guard per call)."""
    return multiply_reduce_rows(x) or mkl_rows(x)


def _base_linear(x: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ, the torch backend's projection (``packed``: ``pack_cpu_weight(weight)``, if the model keeps one;
    ``weight`` may then be None, where the model keeps the packed one alone). On CPU:

    - inside ``torch.compile``, a decode GEMV of up to ``CPU_GEMV_MAX_ROWS`` rows is a multiply-reduce: inductor
      turns it into one vectorised pass that streams W from memory at about twice oneDNN's rate and three times
      MKL's (it would materialise [M, N, K] eagerly, so only there);
    - fp32 projections of up to ``CPU_MKL_MAX_ROWS`` rows (3 on Intel CPUs, 0 elsewhere; compiled, from 2 rows up
      to ``CPU_GEMV_MAX_ROWS``) are F.linear (MKL) on the plain weight, if given;
    - other fp32 projections (eager, prefill, larger batches), and bf16 ones where oneDNN computes bf16 natively,
      are oneDNN's matmul, on the packed weight if given.
    Everything else is ``F.linear``."""
    w = packed if packed is not None else weight
    if x.device.type == "cpu" and x.dim() == 2 and w is not None:
        if weight is not None and multiply_reduce_rows(x):
            return _multiply_reduce(x, weight)
        if weight is not None and mkl_rows(x):
            return torch.nn.functional.linear(x, weight)
        if x.dtype == w.dtype and _onednn_dtype(x.dtype):
            return _cpu_linear(x.contiguous(), w) if torch.compiler.is_compiling() else _onednn(x, w)
    if weight is None:
        raise BackendError(
            f"a projection keeps only its oneDNN-packed CPU weight, which takes [M, K] inputs of its dtype; got "
            f"{x.dtype} {tuple(x.shape)} on {x.device}: load the model with runtime='compile' to keep plain weights"
        )
    return torch.nn.functional.linear(x, weight)


def _factor_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ for a LoRA factor (a few kilobytes of weight). Inside ``torch.compile`` on CPU a multiply-reduce at
    any batch size: inductor fuses it with its neighbours, where an opaque GEMM call per factor costs more than
    its arithmetic (SmolLM2, r=16 on q/v, batch 8, interleaved A/B in one process: step 4.5 ms faster in the
    median, faster in 6 of 6 pairs; batch 32: within noise). Elsewhere ``_base_linear``."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.dim() == 2:
        return _multiply_reduce(x, weight)
    return _base_linear(x, weight)


def _multiply_reduce(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # products and sum in fp32 (as the GEMMs accumulate), one rounding at the end; inductor fuses the casts
    return (x.unsqueeze(1).float() * weight.float()).sum(-1).to(x.dtype)


def lora_linear_sliced(
    x: torch.Tensor,
    weight: torch.Tensor,
    sizes: list[int],
    loras: list,
    packed,
    adapter_idx: torch.Tensor | None,
    backend: str = "torch",
    cpu_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """A fused projection of output slices ``sizes`` (q/k/v, gate/up, or one slice), each with its own LoRA.

    x: [M, K], weight: [sum(sizes), K] → [M, sum(sizes)]. ``packed`` comes from ``pack_lora``; ``adapter_idx``
    [M] (-1 = none) or None for the base projection only. Rows with -1 are bit-identical to the base projection.
    ``cpu_weight``: the weight pre-packed for oneDNN (``pack_cpu_weight``), used by the torch backend on CPU.
    """
    if backend == "triton":
        from fastdebias.ops import lora as _triton_lora

        if len(sizes) == 1:
            lora = loras[0] if packed is not None else (None, None, None)
            return _triton_lora.lora_linear(x, weight, *lora, adapter_idx if packed is not None else None)
        return _triton_lora.lora_linear_sliced(x, weight, sizes, packed, adapter_idx)
    y = _base_linear(x, weight, cpu_weight)
    if packed is None or adapter_idx is None:
        return y
    keep = adapter_idx.view(-1, 1) >= 0
    for i in packed:
        lo = sum(sizes[:i])
        ys = y[:, lo:lo + sizes[i]]
        delta = _ref_lora.lora_delta(x, *loras[i], adapter_idx, linear=_factor_linear)
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
    min_p: float = 0.0,
    seed: int = 0,
    step: int | torch.Tensor = 0,
    row_ids: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    backend: str = "torch",
) -> _ref_logits.LogitsStep:
    """One bias-aware decode step: [B, V] ``logits``, or ``hidden`` [B, K] and the ``lm_head`` [V, K] weight (fused).

    See ``fastdebias.reference.logits.logits_step`` for the contract and ``fastdebias.ops.logits`` for which
    Triton path each case takes. ``lm_head_lora`` / ``adapter_idx``: the lm_head's LoRA stack and the rows'
    adapters (fused path only). Returns a ``LogitsStep`` of [B] tensors (next_ids, states, all_banned, ...).
    """
    step_args = dict(
        matcher=matcher, states=states, mask_phrases=mask_phrases, banned_tokens=banned_tokens, counts=counts,
        repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seed=seed, step=step, row_ids=row_ids, output_counts=output_counts, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
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
