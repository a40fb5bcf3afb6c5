"""``fastdebias.load``: a base checkpoint (or the embedded default) plus LoRA adapters → a ready model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fastdebias import ops
from fastdebias.errors import AdapterError, BackendError, CheckpointError, TokenizerError
from fastdebias.loader import (
    check_saved_base_layers,
    expected_shapes,
    load_adapter,
    load_base_weights,
    load_config,
    normalize_adapters,
    read_json,
)
from fastdebias.model import LlamaDecoder
from fastdebias.runtime import DecodeRunner, available_memory, resolve_runtime

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class FastDebiasModel:
    """A loaded model: the decoder, its tokenizer and config, and the adapters it can apply per prompt."""

    def __init__(self, path, decoder, tokenizer, config, device, dtype, backend, merged_adapter, eos_token_ids,
                 runtime: str = "eager"):
        self.path: Path = path
        self.decoder: LlamaDecoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        self.device: torch.device = device
        self.dtype: torch.dtype = dtype
        self.backend: str = backend
        self.merged_adapter: str | None = merged_adapter
        self.eos_token_ids: list[int] = eos_token_ids
        self.runner = DecodeRunner(decoder, runtime)

    @property
    def runtime(self) -> str:
        return self.runner.runtime

    @property
    def adapter_names(self) -> list[str]:
        return self.decoder.adapter_names

    @property
    def max_context(self) -> int:
        ctx = self.config.max_position_embeddings
        window = getattr(self.config, "sliding_window", None)
        return min(ctx, window) if window else ctx

    def __repr__(self) -> str:
        return (
            f"FastDebiasModel(path={str(self.path)!r}, device={self.device}, dtype={self.dtype}, "
            f"backend={self.backend!r}, runtime={self.runtime!r}, adapters={self.adapter_names}, "
            f"merged={self.merged_adapter!r})"
        )


def _resolve_dtype(dtype, config, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        cfg = _DTYPES.get(str(cfg).replace("torch.", ""), None) if cfg is not None else None
        return cfg if cfg in (torch.float16, torch.bfloat16) else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise BackendError(f"dtype={dtype!r} is not supported; use float32, float16 or bfloat16")


def _load_tokenizer(model_dir: Path):
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((model_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise TokenizerError(f"{model_dir}: the tokenizer files cannot be loaded by transformers: {e}") from e


def _eos_ids(model_dir: Path, config, tokenizer) -> list[int]:
    """generation_config.json's eos_token_id, else config.json's, else the tokenizer's."""
    eos, source = None, None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos, source = read_json(gen, "generation config").get("eos_token_id"), gen
    if eos is None:
        eos, source = getattr(config, "eos_token_id", None), model_dir / "config.json"
    if eos is None and tokenizer is not None:
        eos, source = tokenizer.eos_token_id, None
    if eos is None:
        return []
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if source is not None and not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise CheckpointError(
            f"{source}: field 'eos_token_id' = {eos!r} must be a token id (a non-negative integer) or a list of "
            "them; fix it to the tokenizer's end-of-sequence id"
        )
    v = config.vocab_size
    outside = [e for e in ids if isinstance(e, int) and not 0 <= e < v]
    if outside:  # found at load, where the file is known, not blamed on generate's eos_token_id argument later
        where = f"{source}: field 'eos_token_id'" if source is not None else f"{model_dir}: the tokenizer's eos token"
        raise CheckpointError(
            f"{where} = {eos!r} holds id(s) {outside} outside the vocabulary [0, {v}) of config.json; fix it to "
            "the tokenizer's end-of-sequence id"
        )
    return [int(e) for e in ids]


def _check_weights_fit(model_dir: Path, config, dtype: torch.dtype, dev: torch.device) -> None:
    """Refuse a model whose weights in ``dtype`` take more than the memory available on ``dev``, before any weight
    is read: on a host the loader would end in the OOM killer, with no message, and on a GPU in an out-of-memory
    error halfway (SR-LLM's Llama-2-7B takes 25.1 GiB in float32, the CPU default)."""
    item = torch.empty((), dtype=dtype).element_size()
    need = sum(math.prod(s) for s in expected_shapes(config).values()) * item
    free = available_memory(dev)
    if need <= free:
        return
    where = f"free on {dev}" if dev.type == "cuda" else "available on this host"
    half = "float16" if dev.type == "cuda" and not torch.cuda.is_bf16_supported() else "bfloat16"
    fix = (f"load with dtype='{half}' ({need / item * 2 / 2**30:.1f} GiB)" if item > 2 and need / item * 2 <= free
           else "free memory, or use a machine with more")  # fmt: skip
    raise CheckpointError(
        f"{model_dir}: its weights take {need / 2**30:.1f} GiB in {str(dtype).replace('torch.', '')}, more than the "
        f"{free / 2**30:.1f} GiB {where}: {fix}"
    )


def load(
    model_path: str | Path | None = None,
    adapter=None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    merge: bool = False,
    backend: str = "auto",
    runtime: str = "auto",
    progress: bool = True,
) -> FastDebiasModel:
    """Load a Llama-family checkpoint and LoRA adapters.

    Parameters
    ----------
    model_path : HF model directory (config.json + safetensors/bin weights + tokenizer). ``None`` → the embedded
        SmolLM2-135M-Instruct, converted once into the user cache.
    adapter : a PEFT LoRA adapter directory, a list of them (named by directory name), or a dict name → directory.
    dtype : float32 | float16 | bfloat16 (default: float32 on CPU, the checkpoint's half type on CUDA). Weights that
        would not fit the memory available in this dtype (the host's, or the GPU's free memory) raise
        ``CheckpointError`` before any is read, naming both sizes and the fix.
    device : "cpu" | "cuda" | "cuda:N" (default: CUDA when available).
    merge : fold the single adapter into the base weights (lossy for QLoRA-trained adapters; default False).
    backend : "auto" | "torch" | "triton" | "cuda"; "torch" is the pure-PyTorch reference.
    runtime : how the decode step runs: "auto" (CUDA graphs on CUDA, eager on CPU) | "eager" | "cuda_graph" |
        "compile" (each decoder layer, the lm_head and the loop's step through ``torch.compile``; on CPU the first
        calls compile for ~45 s in all (~10 s with inductor's cache warm), batches of 1, 2 and more rows once
        each, then decode faster than eager: ~2x at batch 1, see the README's benchmarks; on CUDA the compiled
        forward is captured in the CUDA graphs of "cuda_graph", a compile per batch bucket). See
        ``fastdebias.runtime``.
    progress : show tqdm progress bars.
    """
    if model_path is not None and (isinstance(model_path, bytes) or not isinstance(model_path, (str, os.PathLike))):
        raise CheckpointError(
            f"model_path={model_path!r}: must be a directory path (str or os.PathLike), or None for the embedded model"
        )
    if model_path is not None and not os.fspath(model_path):
        raise CheckpointError("model_path='': empty path; pass the model directory, or None for the embedded model")
    specs = normalize_adapters(adapter)  # argument checks before any file is read or the embedded model converted
    if merge and len(specs) != 1:
        raise AdapterError(f"merge=True needs exactly one adapter, got {len(specs)}")
    dev = ops.resolve_device(device)
    resolved_backend = ops.resolve_backend(backend, dev)
    resolved_runtime = resolve_runtime(runtime, dev)
    if resolved_runtime == "compile" and resolved_backend == "triton" and dev.type != "cuda":
        raise BackendError(
            "runtime='compile' with backend='triton' needs a CUDA device: on CPU the Triton kernels run in the "
            "interpreter, which torch.compile cannot trace; use backend='torch' (the CPU path) or runtime='eager'"
        )
    if model_path is None:
        from fastdebias.embedded import embedded_model_dir

        model_dir = embedded_model_dir(progress=progress)
    else:
        model_dir = Path(model_path)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_config(model_dir)
    dt = _resolve_dtype(dtype, config, dev)
    _check_weights_fit(model_dir, config, dt, dev)
    # Adapters are checked against the shapes config.json implies before any base weight is read: fail fast.
    shapes = {k[: -len(".weight")]: s for k, s in expected_shapes(config).items() if len(s) == 2}
    shapes.pop("model.embed_tokens", None)
    shapes["lm_head"] = (config.vocab_size, config.hidden_size)
    adapters = [load_adapter(path, name, config, shapes) for name, path in specs]
    tokenizer = _load_tokenizer(model_dir)
    eos_token_ids = _eos_ids(model_dir, config, tokenizer)  # before the weights: a bad file should fail fast
    weights = load_base_weights(model_dir, config, dt, dev, progress=progress)
    for a in adapters:
        check_saved_base_layers(a, weights, tied=config.tie_word_embeddings)
    decoder = LlamaDecoder(config, weights, backend=resolved_backend, progress=progress)
    del weights
    merged = None
    if merge:
        decoder.merge_adapter(adapters[0])
        merged = adapters[0].name
    elif adapters:
        decoder.attach_adapters(adapters)
    if dev.type == "cpu" and resolved_backend == "torch":
        # fp32 (and bf16 where oneDNN computes it natively) on x86-64 only, a no-op elsewhere; the eager runtime keeps
        # the packed weights alone, except where a few rows' fp32 projections call F.linear (Intel CPUs)
        # (both copies only if they fit; else, under eager, the packed ones alone: the F.linear rule then off)
        eager = resolved_runtime == "eager"
        keep_plain = not eager or ops.keeps_plain_weights(dt)
        decoder.pack_cpu_weights(keep_plain=keep_plain, progress=progress, packed_if_not_both=eager)
    return FastDebiasModel(
        path=model_dir, decoder=decoder, tokenizer=tokenizer, config=config, device=dev, dtype=dt,
        backend=resolved_backend, merged_adapter=merged, eos_token_ids=eos_token_ids,
        runtime=resolved_runtime,
    )
