"""Shared fixtures: tiny random Llama checkpoints, PEFT adapters and a small tokenizer, built offline in tmp dirs."""

from __future__ import annotations

import os

# Triton kernels run through the interpreter on CPU-only machines; this must be set before they are defined.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import json
from pathlib import Path

import pytest
import torch

from fastdebias import runtime

from . import interpret_bounds

if os.environ.get("TRITON_INTERPRET") == "1":
    interpret_bounds.install()  # every interpreted load and store must stay inside its launch's tensors

# dtype → (rtol, atol) for comparisons against references; one table for the whole suite.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

CORPUS = [
    "Old people can learn new technology as well as anyone.",
    "Women and men can both be strong leaders.",
    "People from every background work hard.",
    "The quick brown fox jumps over the lazy dog.",
    "Engineers, nurses and teachers deserve respect.",
    "A fair sentence treats every group with dignity.",
    "stop here. END of the line; new lines\nand tabs\tare text too!",
] * 4


def triton_cuda_backend(tools: bool = False) -> bool:
    """Whether the installed triton has its CUDA backend (compiles for a GPU without one: the compile-only checks),
    with ``tools`` also the ptxas and cuobjdump it ships (cubins and their resource usage)."""
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return "nvidia" in backends and (not tools or all((bin_dir / t).exists() for t in ("ptxas", "cuobjdump")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences: <unk>=0, <s>=1, </s>=2; 251 ids at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=251, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(d))
    return d


def make_llama(
    path: Path,
    *,
    vocab_size: int = 251,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    tie: bool = False,
    rope_scaling: dict | None = None,
    arch: str = "llama",
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    safe: bool = True,
    max_shard_size: str | None = None,
    max_position_embeddings: int = 512,
) -> Path:
    """Save a random tiny LlamaForCausalLM (or Mistral) with transformers; weights are scaled up so that
    greedy decoding has clear winners (near-ties would make token parity depend on rounding)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=tie,
        max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2, rms_norm_eps=1e-5,
    )
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kwargs))
    else:
        if rope_scaling is not None:
            kwargs["rope_scaling"] = rope_scaling
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    path.mkdir(parents=True, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **save_kwargs)
    if not safe:  # transformers 5 writes only safetensors: write the legacy pickle format ourselves
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    return path


def make_adapter(
    base_dir: Path,
    path: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    targets=("q_proj", "v_proj"),
    seed: int = 1,
    **lora_kwargs,
) -> Path:
    """Train-free PEFT LoRA adapter with random non-zero A and B (init_lora_weights=False), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str) else targets,
                     init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the adapter matter: default init_lora_weights=False values are small
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(str(path))
    return path


def save_peft05_bin_adapter(src: Path, dst: Path) -> Path:
    """Rewrite a PEFT adapter the way peft 0.5 (SR-LLM's pin) saved it: adapter_model.bin + an old-style config."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "adapter_model.safetensors"))
    torch.save(sd, dst / "adapter_model.bin")
    new = json.loads((src / "adapter_config.json").read_text())
    old = {
        "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": new["lora_alpha"], "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA",
        "r": new["r"], "revision": None, "target_modules": new["target_modules"], "task_type": "CAUSAL_LM",
    }
    (dst / "adapter_config.json").write_text(json.dumps(old))
    return dst


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Default tiny GQA Llama with the tiny tokenizer."""
    return make_llama(tmp_path_factory.mktemp("llama") / "m", tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def adapter_qv(tmp_path_factory, llama_dir) -> Path:
    return make_adapter(llama_dir, tmp_path_factory.mktemp("ad") / "qv", r=8, alpha=16)


@pytest.fixture(scope="session")
def adapter_all(tmp_path_factory, llama_dir) -> Path:
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return make_adapter(llama_dir, tmp_path_factory.mktemp("ad") / "all7", r=4, alpha=8, targets=targets, seed=2)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The real embedded SmolLM2-135M-Instruct, converted once into the cache."""
    from fastdebias.embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


# ------------------------------------------------------------------- the cuda_graph runtime emulated on CPU


class _ReplayGraph:
    """Stands in for a CUDA graph on CPU: replay() recomputes into the same output buffer, as a real replay
    overwrites its captured output, so any step that held on to an earlier step's logits would see them change."""

    def __init__(self, runner, key):
        self.runner, self.key = runner, key

    def replay(self):
        self.out.copy_(self.runner._forward(*self.key))


class _ReplayStep:
    """Stands in for a CUDA graph of the loop's step: replay() reruns the step on the captured arguments and writes
    into the captured outputs. A graph replays kernels on fixed addresses, so it also checks that every state tensor
    of the loop is still the one captured (updated in place, never rebound)."""

    def __init__(self, fn, args, registry):
        self.fn, self.args, self.replays = fn, args, 0
        self.addresses = self._addresses()
        b = args[0].b  # a capture runs nothing: outputs (feed, slots) are allocated, then written by each replay
        self.outs = (torch.empty(b, dtype=torch.long), torch.empty(b, dtype=torch.long))
        registry.append(self)

    def _addresses(self):
        loop = self.args[0]
        objs = [loop] + ([loop.lex] if loop.lex is not None else [])
        return {(id(o), k): v.data_ptr() for o in objs for k, v in vars(o).items() if isinstance(v, torch.Tensor)}

    def replay(self):
        assert self._addresses() == self.addresses, "a loop state tensor was rebound, not updated in place"
        for o, new in zip(self.outs, self.fn(*self.args)):
            o.copy_(new)
        self.replays += 1


@pytest.fixture
def emulated_graphs(monkeypatch):
    """The cuda_graph runtime's logic on CPU: forward graphs and step graphs replaced by recomputation into the
    captured output buffers (``_ReplayGraph``, ``_ReplayStep``), kv read in buckets of 8. Returns the step graphs."""
    monkeypatch.setattr(runtime.DecodeRunner, "kv_read_len", lambda self, kv_len, n: min(-(-kv_len // 8) * 8, n))

    def capture(self, *key):
        g = _ReplayGraph(self, key)
        g.out = self._forward(*key).clone()
        return g, g.out

    step_graphs = []

    def capture_step(self, fn, args):  # only the step's: _capture is faked whole
        g = _ReplayStep(fn, args, step_graphs)
        return g, g.outs

    monkeypatch.setattr(runtime.DecodeRunner, "_capture", capture)
    monkeypatch.setattr(runtime.DecodeRunner, "_capture_graph", capture_step)
    return step_graphs


def as_cuda_graph(model, compile_step=False):
    """resolve_runtime refuses cuda_graph without CUDA; the runner's logic is device-free (with emulated_graphs)."""
    model.runner.runtime, model.runner.compile_step = "cuda_graph", compile_step
    return model
