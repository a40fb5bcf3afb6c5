"""End-to-end decode benchmark: fastdebias against stock transformers generation, in one process and one run.

    fastdebias bench                          # embedded SmolLM2-135M (CPU or GPU), random LoRA r=16 on q/v
    fastdebias bench --synthetic llama2-7b    # the SR-LLM shape, random weights, LoRA r=64 on q/v (GPU only)
    fastdebias bench --model DIR --adapter DIR
    fastdebias bench --quick                  # CI: a tiny random Llama built on the fly, a few seconds on CPU

Systems, on the same prompts, adapter and lexicon:

- ``fastdebias``: ``fastdebias.load(..., backend="auto", runtime=...)`` + ``fastdebias.generate``, LoRA unmerged,
  the lexicon as a ``fastdebias.Lexicon``; runtime ``"compile"`` on CPU (the decoder layers, head and step compiled
  with dynamic shapes: batches of 1, 2 and more rows compile once each; first calls timed as ``compile_s``),
  ``"auto"`` (CUDA graphs) on GPU;
- ``hf-eager``: transformers ``generate`` (dynamic cache, no compile), the PEFT adapter unmerged
  (``PeftModel.from_pretrained``), the lexicon as ``sequence_bias`` / ``bad_words_ids`` — the stock path;
- ``hf-compile``: transformers' best stock configuration: static cache + ``torch.compile`` through ``generate``'s
  own ``compile_config`` (one static graph per batch size), the adapter merged (``merge_and_unload``);
- ``fastdebias-merged`` / ``fastdebias-noadapter``: the LoRA overhead (``load(merge=True)``; ``adapter=None``).

Method: fixed output length (EOS ignored: ``eos_token_id=[]`` for fastdebias, no EOS in transformers' generation
config), warm-up runs excluded, the device synchronised before every clock read, ``reps`` repetitions and their
medians. TTFT is a run with ``max_new_tokens=1``; TPOT = (total - TTFT) / (n - 1); tokens/s = batch x n / total.
Every fastdebias call prefills each row's prompt in full (``runner.share_prefix`` off: no prefix shared or kept).
Bytes per decode step = weights (+ LoRA) + the KV cache read at the mean context length; GB/s = bytes / TPOT,
compared with the device's copy bandwidth measured in the same run. The lexicons are random token sequences of
1-4 tokens with finite negative penalties, so that fastdebias and transformers must give the same tokens.

Systems run one after another (each loaded alone, then freed), so each one's peak memory is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdebias.errors import FastDebiasError

SYSTEMS = ("fastdebias", "hf-eager", "hf-compile", "fastdebias-merged", "fastdebias-noadapter")
# Run only when named in --systems: fastdebias with the eager runtime (the CPU default of ``load``), to see in the
# same run what the compiled / graph-captured step buys; and with runtime "compile" (on CUDA the compiled forward
# captured in CUDA graphs, against "fastdebias"'s graphs of the eager forward: the runtime's open choice).
EXTRA_SYSTEMS = ("fastdebias-eager", "fastdebias-compile")
ALL_SYSTEMS = SYSTEMS + EXTRA_SYSTEMS
SYSTEM_DESCRIPTIONS = {
    "fastdebias": "fastdebias, backend auto, LoRA unmerged",
    "hf-eager": "transformers generate, eager, PEFT unmerged, sequence_bias (stock)",
    "hf-compile": "transformers generate, static cache + torch.compile, adapter merged",
    "fastdebias-merged": "fastdebias, adapter merged into the weights",
    "fastdebias-noadapter": "fastdebias, adapter=None",
    "fastdebias-eager": "fastdebias, runtime='eager', LoRA unmerged",
    "fastdebias-compile": "fastdebias, runtime='compile' (on CUDA: CUDA graphs of the compiled forward), LoRA unmerged",
}
# Systems that run the whole sweep (batch sizes and lexicon sizes); the LoRA-overhead variants run the batch sweep.
HEAD_TO_HEAD = ("fastdebias", "hf-eager", "hf-compile")

SYNTHETIC = {
    # Llama-2-7B as SR-LLM fine-tuned it: vocab 32064 (SR-LLM's added tokens), bf16, LoRA r=64 alpha=16 on q/v.
    "llama2-7b": dict(
        config=dict(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        dtype="bfloat16",
        lora=dict(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    ),
}

TEXTS = [
    "Old people can't learn new technology.",
    "Women are too emotional to be leaders.",
    "Poor people are lazy and don't want to work.",
    "Immigrants are taking all our jobs.",
    "Men are bad at taking care of children.",
    "Young people today have no work ethic at all.",
    "People with tattoos are unprofessional and can't be trusted.",
    "Engineers are socially awkward and boring.",
]

# Every field of a point record (one system at one batch size and lexicon size); tests check them all.
POINT_FIELDS = (
    "system", "batch", "lexicon_size", "status", "reason", "ttft_ms", "tpot_ms", "total_ms", "tokens_per_s",
    "decode_tokens_per_s", "bytes_per_step", "gbps", "pct_copy_bandwidth", "peak_allocated_mib",
    "peak_reserved_mib", "peak_rss_mib", "memory_bound_mib", "speedup_vs_hf_eager", "speedup_vs_hf_compile",
    "tokens_identical", "ttft_ms_all", "total_ms_all",
)


@dataclass
class BenchConfig:
    """What one ``fastdebias bench`` run measures. ``None`` fields take device-dependent defaults (``resolve``)."""

    model: str | None = None
    adapter: str | None = None
    synthetic: str | None = None
    quick: bool = False
    device: str | None = None
    dtype: str | None = None
    batch_sizes: list[int] | None = None
    lexicon_sizes: list[int] | None = None
    lexicon_size: int | None = None  # the lexicon of the batch sweep
    prompt_len: int | None = None
    new_tokens: int | None = None
    reps: int | None = None
    warmup: int = 1
    compile: bool = True
    runtime: str | None = None  # fastdebias' decode runtime; default: "compile" on CPU, "auto" (CUDA graphs) on GPU
    compile_step: bool | None = None  # torch.compile the loop's step too (default: as the runtime does)
    compile_timeout: float = 900.0
    lexicon_mode: str = "backtrack"
    interleave: bool | None = None  # default: on CPU (noisy, small models), off on GPU (peak memory per system)
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    seed: int = 0
    progress: bool = True

    def resolve(self) -> BenchConfig:
        """Fill the defaults: GPU batch 1/8/32/64, lexicons 0/1k/10k/100k, 128 new tokens, 5 reps; CPU batch
        1/8/32, lexicons 0/1k/10k, 64 new tokens, 3 reps; ``quick`` batch 1/2, lexicons 0/1k, 8 new tokens."""
        cuda = _device(self.device).type == "cuda"
        c = BenchConfig(**asdict(self))
        if c.quick:
            defaults = dict(batch_sizes=[1, 2], lexicon_sizes=[0, 1000], lexicon_size=1000, prompt_len=16,
                            new_tokens=8, reps=2, runtime="eager")
            c.compile = False
        elif cuda:
            defaults = dict(batch_sizes=[1, 8, 32, 64], lexicon_sizes=[0, 1000, 10_000, 100_000],
                            lexicon_size=10_000, prompt_len=64, new_tokens=128, reps=5, runtime="auto")
        else:
            defaults = dict(batch_sizes=[1, 8, 32], lexicon_sizes=[0, 1000, 10_000], lexicon_size=10_000,
                            prompt_len=64, new_tokens=64, reps=3, runtime="compile")
        defaults["interleave"] = not cuda
        for k, v in defaults.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        c.batch_sizes = sorted(set(c.batch_sizes))
        c.lexicon_sizes = sorted(set(c.lexicon_sizes))
        c.check()
        return c

    def check(self) -> None:
        def positive(name: str, values) -> None:
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise FastDebiasError(f"--{name.replace('_', '-')}: expected integers >= 1, got {values!r}")

        positive("batch_sizes", self.batch_sizes)
        positive("prompt_len", [self.prompt_len])
        positive("new_tokens", [self.new_tokens])
        positive("reps", [self.reps])
        if self.new_tokens < 2:
            raise FastDebiasError("--new-tokens: needs at least 2 (TPOT is measured between the 1st and last token)")
        if any(not isinstance(v, int) or v < 0 for v in self.lexicon_sizes + [self.lexicon_size]):
            raise FastDebiasError(f"--lexicon-sizes/--lexicon-size: expected integers >= 0, got {self.lexicon_sizes}")
        if self.warmup < 0:
            raise FastDebiasError(f"--warmup: expected an integer >= 0, got {self.warmup}")
        bad = [s for s in self.systems if s not in ALL_SYSTEMS]
        if bad or not self.systems:
            raise FastDebiasError(f"--systems: unknown {bad or 'empty list'}; choose from {', '.join(ALL_SYSTEMS)}")
        if self.lexicon_mode not in ("backtrack", "hf"):
            raise FastDebiasError(f"--lexicon-mode must be 'backtrack' or 'hf', got {self.lexicon_mode!r}")
        if self.synthetic is not None:
            if self.synthetic not in SYNTHETIC:
                raise FastDebiasError(f"--synthetic {self.synthetic}: unknown; choose from {', '.join(SYNTHETIC)}")
            if self.model is not None or self.adapter is not None or self.quick:
                raise FastDebiasError("--synthetic builds its own model and adapter: drop --model/--adapter/--quick")
            if _device(self.device).type != "cuda":
                raise FastDebiasError(
                    f"--synthetic {self.synthetic} needs a CUDA GPU (6.7B parameters in bf16, 13.5 GB); on CPU run "
                    "the embedded model (no --synthetic) or --quick"
                )
        if self.quick and (self.model is not None or self.adapter is not None):
            raise FastDebiasError("--quick builds a tiny model and adapter: drop --model/--adapter")

    def points(self) -> dict[str, list[tuple[int, int]]]:
        """(batch, lexicon size) per system: the batch sweep at ``lexicon_size``, the lexicon sweep at the
        smallest batch; the LoRA-overhead variants only run the batch sweep."""
        batch_sweep = [(b, self.lexicon_size) for b in self.batch_sizes]
        lex_sweep = [(self.batch_sizes[0], n) for n in self.lexicon_sizes]
        both = list(dict.fromkeys(batch_sweep + lex_sweep))
        return {s: (both if s in HEAD_TO_HEAD else batch_sweep) for s in self.systems}


# ------------------------------------------------------------------------------------------- environment


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FastDebiasError(f"--device {device!r} is not a valid torch device ('cpu', 'cuda', 'cuda:1')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FastDebiasError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_tag(dev: torch.device) -> str:
    """The name results are filed under: ``cpu``, or the GPU's name with dashes (``NVIDIA-H100-80GB-HBM3``)."""
    return torch.cuda.get_device_name(dev).replace(" ", "-") if dev.type == "cuda" else "cpu"


def git_commit() -> tuple[str, bool | None]:
    """(short commit, tracked files modified?) of the source tree fastdebias runs from; ("unknown", None)."""
    if os.environ.get("FASTDEBIAS_COMMIT"):
        return os.environ["FASTDEBIAS_COMMIT"], None
    where = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                             check=True, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=where, capture_output=True, timeout=10)
        return out.stdout.strip(), dirty.returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a load above the core count means something else shared the CPU."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth_gbs(dev: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """The device's copy bandwidth: (read + write bytes) / time of ``dst.copy_(src)``, median of ``reps``.

    1 GiB on GPU, 256 MiB on CPU (far beyond the last-level cache). ``src`` is filled so that reads touch real
    pages; ``dst`` is written once before timing so page faults are not counted (a fresh ``clone`` on CPU would
    time the kernel zeroing pages, not the memory).
    """
    nbytes = nbytes or (1 << 30 if dev.type == "cuda" else 256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 1):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


class _PeakMemory:
    """Peak memory over a region: CUDA allocated/reserved; on CPU the process's peak RSS.

    On Linux the RSS high-water mark is reset at the start (``/proc/self/clear_refs``) so the figure is this
    region's; elsewhere it is ``getrusage``'s max RSS since the process started (an upper bound).
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.method = "cuda" if dev.type == "cuda" else "getrusage"

    def reset(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            return
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "getrusage"

    def read(self) -> dict[str, float | None]:
        mib = 1 << 20
        if self.dev.type == "cuda":
            return dict(peak_allocated_mib=torch.cuda.max_memory_allocated(self.dev) / mib,
                        peak_reserved_mib=torch.cuda.max_memory_reserved(self.dev) / mib, peak_rss_mib=None)
        rss = None
        if self.method == "VmHWM":
            with contextlib.suppress(OSError, ValueError):
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        rss = int(line.split()[1]) * 1024 / mib
        if rss is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / mib  # KiB on Linux
        return dict(peak_allocated_mib=None, peak_reserved_mib=None, peak_rss_mib=rss)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise ``_Timeout`` in the main thread after ``seconds`` (no-op elsewhere or without SIGALRM)."""
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise _Timeout(f"took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------ model setup


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, GQA 4:2) with a byte-level BPE tokenizer of 251 ids trained on
    ``TEXTS``. Weights use initializer_range 0.2 so greedy decoding has clear winners."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=251, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=251, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def make_random_adapter(base_dir: Path, path: Path, *, r: int, lora_alpha: int, target_modules: Sequence[str],
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 1,
                        model=None) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (``init_lora_weights=False``), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), init_lora_weights=False,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(str(path))
    return path


def make_synthetic(name: str, root: Path, device: torch.device, spec: dict | None = None) -> tuple[Path, Path]:
    """Random-weight checkpoint of a ``SYNTHETIC`` shape (+ its random LoRA), written with transformers/peft.

    Weights are initialised on ``device`` directly in the target dtype (a 7B fp32 init on CPU takes minutes).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or SYNTHETIC[name]
    dtype = getattr(torch, spec["dtype"])
    config = LlamaConfig(**spec["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model_dir, adapter_dir = root / name, root / f"{name}-lora"
    model.save_pretrained(str(model_dir))
    lora = spec["lora"]
    make_random_adapter(model_dir, adapter_dir, r=lora["r"], lora_alpha=lora["lora_alpha"],
                        target_modules=lora["target_modules"], model=model)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model_dir, adapter_dir


@dataclass
class Setup:
    """The model directory, adapter directory and a description of both, for the header."""

    model_dir: Path | None  # None: the embedded model (loaded as fastdebias.load(None))
    hf_dir: Path
    adapter_dir: Path
    model_desc: str
    adapter_desc: str


def prepare(cfg: BenchConfig, workdir: Path, dev: torch.device) -> Setup:
    """Build or locate the model and adapter: tiny (``--quick``), synthetic, ``--model``, or the embedded one."""
    if cfg.quick:
        d = make_tiny_model(workdir / "tiny", seed=cfg.seed)
        ad = make_random_adapter(d, workdir / "tiny-lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                 seed=cfg.seed + 1)
        return Setup(d, d, ad, "tiny random Llama (hidden 64, 2 layers, vocab 251; built for --quick)",
                     "random LoRA r=8 alpha=16 on q_proj,v_proj (generated)")
    if cfg.synthetic is not None:
        d, ad = make_synthetic(cfg.synthetic, workdir, dev)
        lora = SYNTHETIC[cfg.synthetic]["lora"]
        return Setup(d, d, ad, f"synthetic {cfg.synthetic} (random weights, {SYNTHETIC[cfg.synthetic]['dtype']})",
                     f"random LoRA r={lora['r']} alpha={lora['lora_alpha']} on {','.join(lora['target_modules'])} "
                     "(generated, non-zero B)")
    if cfg.model is not None:
        d = Path(cfg.model)
        if not (d / "config.json").is_file():
            raise FastDebiasError(f"--model {d}: no config.json there; give an HF Llama-family model directory")
        model_dir, hf_dir, desc = d, d, str(d)
    else:
        from fastdebias.embedded import MODEL_NAME, embedded_model_dir

        hf_dir = embedded_model_dir(progress=cfg.progress)
        model_dir, desc = None, f"embedded {MODEL_NAME}"
    if cfg.adapter is not None:
        ad = Path(cfg.adapter)
        if not (ad / "adapter_config.json").is_file():
            raise FastDebiasError(f"--adapter {ad}: no adapter_config.json there; give a PEFT LoRA adapter directory")
        return Setup(model_dir, hf_dir, ad, desc, str(ad))
    # peft keeps the LoRA weights in fp32 whatever the base dtype; the base is only loaded to shape them
    base_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ad = make_random_adapter(hf_dir, workdir / "random-lora", r=16, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"], dtype=base_dtype, device=dev, seed=cfg.seed + 1)
    return Setup(model_dir, hf_dir, ad, desc,
                 "random LoRA r=16 alpha=16 on q_proj,v_proj (generated: no --adapter given; non-zero B)")


def make_prompts(tokenizer, n: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_len`` tokens: SR-LLM debiasing prompts of ``TEXTS`` (the format the
    adapter would be trained on), left-truncated so each keeps its instruction and text; random ids if there is
    no tokenizer. Equal lengths: no padding, so every system does the same work."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (n, prompt_len), generator=g).tolist()
    from fastdebias.generate import srllm_prompt

    encoded = [tokenizer(srllm_prompt(t))["input_ids"] for t in TEXTS]
    prompts = []
    for i in range(n):
        ids, j = list(encoded[i % len(TEXTS)]), i
        while len(ids) < prompt_len:  # a long --prompt-len: earlier prompts go in front
            j += 1
            ids = encoded[j % len(TEXTS)] + ids
        prompts.append(ids[-prompt_len:])
    return prompts


def synthetic_lexicon(n: int, vocab_size: int, *, seed: int = 0, exclude: Sequence[int] = ()):
    """A ``Lexicon`` of ``n`` distinct random token sequences of 1-4 tokens, each with a penalty in [-4, -0.5].

    Penalties only (no bans): fastdebias' default ``"backtrack"`` mode treats penalties exactly as transformers'
    ``sequence_bias``, so greedy outputs must stay token-identical in every mode.
    """
    from fastdebias.lexicon import Lexicon

    if n == 0:
        return None
    rng = random.Random(seed * 1_000_003 + n)
    skip = set(exclude)
    pool = [t for t in range(vocab_size) if t not in skip]
    capacity = sum(len(pool) ** k for k in range(1, 5))
    if n > capacity:
        raise FastDebiasError(f"lexicon size {n}: only {capacity} distinct sequences of 1-4 tokens exist here")
    seqs: dict[tuple[int, ...], float] = {}
    while len(seqs) < n:
        seq = tuple(rng.choice(pool) for _ in range(rng.randint(1, 4)))
        seqs.setdefault(seq, round(-rng.uniform(0.5, 4.0), 3))
    return Lexicon.from_token_sequences(seqs, category="synthetic")


# ------------------------------------------------------------------------------------------------ systems


class _System:
    """One system loaded: ``call(prompts, n, lexicon_size)`` → generated ids per row (exactly ``n`` each)."""

    name: str
    compile_s: float | None = None

    def call(self, prompts: list[list[int]], n: int, lexicon_size: int) -> list[list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FastDebias(_System):
    def __init__(self, name: str, setup: Setup, dev: torch.device, dtype: torch.dtype, lexicons, mode: str,
                 runtime: str, model=None, compile_step: bool | None = None) -> None:
        import fastdebias

        self.name, self.lexicons, self.mode = name, lexicons, mode
        self.model = model or fastdebias.load(setup.model_dir, setup.adapter_dir, dtype=dtype, device=dev,
                                              merge=name == "fastdebias-merged", backend="auto", runtime=runtime,
                                              progress=False)
        if compile_step is not None and model is None:
            self.model.runner.compile_step = compile_step
        # every row's prompt prefilled in full, as transformers does: no prefix shared by a call's prompts, none
        # kept from an earlier call, and no repeated prompt (the bench cycles its texts) prefilled once for its rows
        self.model.runner.share_prefix = False
        self.adapter = None if name == "fastdebias-noadapter" else fastdebias.FIRST_ADAPTER
        self.compile_times: dict[int, float] = {}
        self.compile_s = 0.0 if self.model.runtime != "eager" else None
        self.warmed: set[int] = set()

    def prepare_lexicon(self, size: int) -> None:
        """Compile the lexicon for this model once, outside the timings (generate reuses it from the cache)."""
        lex = self.lexicons(size)
        if lex is not None and size not in self.compile_times:
            t0 = time.perf_counter()
            lex.compile(self.model.tokenizer, vocab_size=self.model.config.vocab_size, eos_token_id=[],
                        device=self.model.device)
            self.compile_times[size] = time.perf_counter() - t0

    def call(self, prompts, n, lexicon_size):
        import fastdebias

        self.prepare_lexicon(lexicon_size)
        outs = fastdebias.generate(self.model, prompts, adapter=self.adapter, max_new_tokens=n, eos_token_id=[],
                                   lexicon=self.lexicons(lexicon_size), lexicon_mode=self.mode, progress=False)
        return [o.token_ids for o in outs]

    def warm(self, prompts, n, lexicon_size) -> None:
        """The first call at a batch size compiles (what this batch size needs) or captures the decode step for its
        buckets: timed as compile_s."""
        t0 = time.perf_counter()
        self.call(prompts, n, lexicon_size)
        if self.compile_s is not None and len(prompts) not in self.warmed:
            self.compile_s += time.perf_counter() - t0
            self.warmed.add(len(prompts))

    def close(self) -> None:
        self.model = None


class _Transformers(_System):
    def __init__(self, name: str, setup: Setup, dev: torch.device, dtype: torch.dtype, hf_lexicon,
                 compile_timeout: float) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.name, self.dev, self.hf_lexicon, self.compile_timeout = name, dev, hf_lexicon, compile_timeout
        placement = dict(device_map=str(dev)) if dev.type == "cuda" else {}
        base = AutoModelForCausalLM.from_pretrained(str(setup.hf_dir), dtype=dtype, **placement)
        base.generation_config.eos_token_id = None  # fixed output length: generate never stops at EOS
        model = PeftModel.from_pretrained(base, str(setup.adapter_dir))
        if name == "hf-compile":
            model = model.merge_and_unload()
        self.model = model.eval()
        self.attn_implementation = base.config._attn_implementation
        pad = base.config.pad_token_id
        self.pad = int(pad if isinstance(pad, int) else 0)
        self.compiled_batches: set[int] = set()
        self.compile_config = None
        if name == "hf-compile":
            from transformers import CompileConfig

            # One static graph per batch size (dynamic=False: a dynamic graph after the first recompile measured
            # slower); CUDA graphs on GPU (reduce-overhead); on CPU generate only compiles when told to.
            cc = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if dev.type == "cuda" else
                               "default")
            cc._compile_all_devices = dev.type != "cuda"
            self.compile_config = cc
        self.compile_s = 0.0 if name == "hf-compile" else None

    def call(self, prompts, n, lexicon_size):
        from transformers import GenerationConfig

        bias, bad = self.hf_lexicon(lexicon_size)
        kw: dict[str, Any] = dict(do_sample=False, num_beams=1, max_new_tokens=n, pad_token_id=self.pad,
                                  eos_token_id=None, sequence_bias=bias or None, bad_words_ids=bad or None)
        if self.compile_config is not None:
            kw.update(cache_implementation="static", compile_config=self.compile_config)
        ids = torch.tensor(prompts, dtype=torch.long, device=self.dev)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=GenerationConfig(**kw))
        gen = out[:, ids.shape[1]:].tolist()
        if any(len(row) != n for row in gen):
            raise FastDebiasError(f"{self.name}: transformers generated {len(gen[0])} tokens, not {n}")
        return gen

    def warm(self, prompts, n, lexicon_size) -> None:
        """The first call at a batch size compiles that batch size's graph: timed, and bounded by the deadline."""
        b = len(prompts)
        if self.compile_config is None or b in self.compiled_batches:
            self.call(prompts, n, lexicon_size)
            return
        t0 = time.perf_counter()
        with _deadline(self.compile_timeout):
            self.call(prompts, n, lexicon_size)
        self.compile_s += time.perf_counter() - t0
        self.compiled_batches.add(b)

    def close(self) -> None:
        self.model = None
        if self.compile_config is not None:
            torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- measuring


def _warm(system: _System, prompts, n: int, lexicon_size: int, warmup: int) -> None:
    for i in range(warmup):  # both shapes of run: the first 1-token run pays one-off costs too
        if i == 0 and isinstance(system, (_Transformers, _FastDebias)):
            system.warm(prompts, n, lexicon_size)
        else:
            system.call(prompts, n, lexicon_size)
        system.call(prompts, 1, lexicon_size)


def measure_group(systems: dict[str, _System], prompts, n: int, lexicon_size: int, reps: int, warmup: int,
                  dev: torch.device, peak: _PeakMemory, on_error: Callable[[str, Exception], None]) -> dict:
    """Time each system at one point: warm-up, then ``reps`` rounds in which every system in turn does a TTFT run
    (1 token) and a full run (``n`` tokens); medians. Taking turns means a slow spell of a shared machine hits
    every system alike. ``on_error(name, exc)`` re-raises or records why a system dropped out.

    Returns ``{name: (record, generated ids of the last full run)}`` for the systems that completed.
    """
    live: dict[str, _System] = {}
    for name, system in systems.items():
        try:
            _warm(system, prompts, n, lexicon_size, warmup)
            live[name] = system
        except Exception as e:
            on_error(name, e)
    peak.reset()
    ttft: dict[str, list[float]] = {k: [] for k in live}
    total: dict[str, list[float]] = {k: [] for k in live}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(reps):
        for name, system in list(live.items()):
            try:
                _sync(dev)
                t0 = time.perf_counter()
                system.call(prompts, 1, lexicon_size)
                _sync(dev)
                t1 = time.perf_counter()
                outs[name] = system.call(prompts, n, lexicon_size)
                _sync(dev)
                t2 = time.perf_counter()
            except Exception as e:
                on_error(name, e)
                del live[name]
                continue
            ttft[name].append(t1 - t0)
            total[name].append(t2 - t1)
    mem = peak.read()
    b, res = len(prompts), {}
    for name in live:
        ttft_ms, total_ms = statistics.median(ttft[name]) * 1e3, statistics.median(total[name]) * 1e3
        tpot_ms = (total_ms - ttft_ms) / (n - 1)
        res[name] = (dict(
            ttft_ms=ttft_ms, tpot_ms=tpot_ms, total_ms=total_ms, tokens_per_s=b * n / (total_ms / 1e3),
            decode_tokens_per_s=b / (tpot_ms / 1e3) if tpot_ms > 0 else None,
            ttft_ms_all=[t * 1e3 for t in ttft[name]], total_ms_all=[t * 1e3 for t in total[name]], **mem,
        ), outs[name])
    return res


@dataclass
class ModelBytes:
    """What a decode step must read: the weights (the tied or untied LM head included; the embedding itself only
    row by row), the active adapter's LoRA weights, and per row and cached position the K and V of every layer."""

    weights_read: int
    weights_total: int
    lora: int
    kv_per_position: int

    @classmethod
    def from_config(cls, config, itemsize: int, lora: int) -> ModelBytes:
        h, i, n_layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
        nh, nkv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        hd = getattr(config, "head_dim", None) or h // nh
        layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * i + 2 * h
        read = n_layers * layer + h + v * h
        total = read + (0 if config.tie_word_embeddings else v * h)
        return cls(read * itemsize, total * itemsize, lora, n_layers * 2 * nkv * hd * itemsize)

    def per_step(self, batch: int, prompt_len: int, n: int, with_lora: bool) -> int:
        mean_context = prompt_len + n / 2  # decode steps attend to prompt_len + 1 ... prompt_len + n - 1 positions
        return int(self.weights_read + (self.lora if with_lora else 0) + batch * self.kv_per_position * mean_context)


def adapter_numel(adapter_dir: Path) -> int:
    """Number of LoRA A/B parameters in a PEFT adapter directory (safetensors or legacy .bin)."""
    st, binf = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "lora_" in k)
    sd = torch.load(str(binf), map_location="cpu", weights_only=True)
    return sum(v.numel() for k, v in sd.items() if "lora_" in k)


def _first_difference(x: list[int], y: list[int]) -> int | None:
    """The first step at which two rows of generated ids differ (the shorter one's length if one is a prefix of the
    other), or None if they are equal."""
    if x == y:
        return None
    return next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def _compare(a: list[list[int]], b: list[list[int]]) -> dict:
    rows = sum(x == y for x, y in zip(a, b))
    first = None
    for r, (x, y) in enumerate(zip(a, b)):
        step = _first_difference(x, y)
        if step is not None:
            if first is None or step < first["step"]:
                first = dict(row=r, step=step)
    return dict(identical=rows == len(a) == len(b), rows_identical=rows, rows=len(a), first_divergence=first)


# Where greedy outputs diverge, the largest difference between the two models' logits (for the same prefix) that
# still counts as rounding, relative to the largest |logit|: 2.5x the test suite's atol for the dtype (as
# tests/test_parity.py's half-precision check allows).
ROUNDING_TOL = {torch.float32: 2.5e-5, torch.float16: 2.5e-2, torch.bfloat16: 5e-2}
# Where the two half-precision models' logits differ by more than ROUNDING_TOL (a deep model: SR-LLM's 7B shape in
# bf16 differs from transformers by ~6 % of the largest |logit| on CPU, and transformers from fp32 by ~8 %), a
# divergence is still a rounding flip when fastdebias' logits are about as close to an fp32 evaluation of the same
# weights as transformers' are: at most this factor further off (the rule tests/test_parity.py applies to half
# precision). (The two tokens' fp32 scores then differ by at most twice fastdebias' error, so a near tie follows.)
REFERENCE_SLACK = 1.25
# Divergence steps diagnosed per (batch, lexicon) point, the earliest first: each costs a prefill and a decode step
# of both models on the whole batch (a second or so for the 7B shape at batch 64 on a GPU).
MAX_DIAGNOSED_STEPS = 4


def _diagnose(fd: _FastDebias, hf: _Transformers, prompts, ours: list[list[int]], ref: list[list[int]],
              lexicon_size: int, dtype: torch.dtype) -> dict:
    """Why fastdebias' greedy tokens left transformers' (``ours`` vs ``ref``, the timed runs' outputs).

    For each step k at which a row first diverges, both models score the next token after the same prefixes (every
    row's prompt and transformers' first k tokens), each along its own path as in the timed runs: a prefill of all
    but the last token, then one decode step of the whole batch (k = 0: the prefill's logits); transformers' scores
    then go through its logits processors (``sequence_bias``, ``bad_words_ids``). A diverging row is a rounding flip
    when the two models' logits agree within ``ROUNDING_TOL`` of the largest |logit| and transformers' own
    processed scores of its token and of fastdebias' differ by no more than the two models' logits differ (the
    margin a rounding difference of that size can overturn). In half precision, a row outside that tolerance is
    still a rounding flip when, against fp32 logits of the same weights and prefixes (``_fp32_logits``), fastdebias'
    largest error is at most ``REFERENCE_SLACK`` times transformers'. Anything else is an error. Only the earliest
    ``MAX_DIAGNOSED_STEPS`` divergence steps are diagnosed; rows first diverging later are counted, not diagnosed.

    Returns dict(rounding: bool (every diagnosed row a rounding flip), rows: [dict(row, step, ours, ref, margin,
    max_logit_diff, logit_scale, rounding, and in half precision err_fastdebias, err_transformers (largest
    |logit - fp32 logit| of the row), ref_margin (how far apart fp32 scores the two tokens) and fp32_prefers
    ("fastdebias" or "transformers": whose token fp32 scores higher))], not_diagnosed: int).
    """
    from transformers import LogitsProcessorList, NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor

    from fastdebias.generate import decode_one_token, prefill, resolve_adapter_rows

    model, dev, b = fd.model, fd.model.device, len(prompts)
    rows = resolve_adapter_rows(model, fd.adapter, b)
    adapter_idx = torch.tensor(rows, dtype=torch.int32, device=dev) if any(r >= 0 for r in rows) else None
    bias, bad = hf.hf_lexicon(lexicon_size)
    procs = LogitsProcessorList()
    if bias:
        procs.append(SequenceBiasLogitsProcessor(sequence_bias=bias))
    if bad:
        procs.append(NoBadWordsLogitsProcessor(bad, eos_token_id=None))
    first = {}
    for r, (x, y) in enumerate(zip(ours, ref)):  # (the bench's outputs have a fixed length: k < len(x))
        k = _first_difference(x, y)
        if k is not None:
            first.setdefault(k, []).append(r)
    found = []
    steps = sorted(first)
    for k in steps[:MAX_DIAGNOSED_STEPS]:
        diverged = first[k]
        ids = torch.tensor([list(p) + y[:k] for p, y in zip(prompts, ref)], dtype=torch.long, device=dev)
        with torch.inference_mode():
            if k == 0:  # (logits_to_keep=1: the last position's logits only, not [B, T, V])
                l_hf = hf.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
                l_fd = prefill(model, ids.tolist(), 1, adapter_idx)[0]
            else:
                past = hf.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
                l_hf = hf.model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1].float()
                _, cache, start, _ = prefill(model, ids[:, :-1].tolist(), 2, adapter_idx)
                t = ids.shape[1] - 1
                slots = torch.full((b,), t, dtype=torch.long, device=dev)
                l_fd = decode_one_token(model, ids[:, -1], slots, t + 1, start, cache, adapter_idx)
            scores = procs(ids, l_hf.clone())
        diff = (l_fd.float() - l_hf).abs().amax().item()
        scale = l_hf.abs().amax().item()
        exact = None
        if dtype != torch.float32:
            exact = _fp32_logits(hf.model, ids)
            exact_scores = procs(ids, exact.clone())
        for r in diverged:
            a, h = ours[r][k], ref[r][k]
            margin = (scores[r, h] - scores[r, a]).item()
            ok = diff <= ROUNDING_TOL[dtype] * scale and margin <= diff
            row = dict(row=r, step=k, ours=a, ref=h, margin=margin, max_logit_diff=diff, logit_scale=scale)
            if exact is not None:
                e_fd = (l_fd[r].float() - exact[r]).abs().amax().item()
                e_hf = (l_hf[r] - exact[r]).abs().amax().item()
                ref_margin = (exact_scores[r, h] - exact_scores[r, a]).item()
                ok = ok or e_fd <= REFERENCE_SLACK * e_hf
                row.update(err_fastdebias=e_fd, err_transformers=e_hf, ref_margin=abs(ref_margin),
                           fp32_prefers="transformers" if ref_margin > 0 else "fastdebias")
            found.append(dict(row, rounding=ok))
    model.runner.prefix = None
    return dict(rounding=bool(found) and all(f["rounding"] for f in found), rows=found,
                not_diagnosed=sum(len(first[k]) for k in steps[MAX_DIAGNOSED_STEPS:]))


def _fp32_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, V] fp32: the last position's logits for ``ids`` [B, T] computed in fp32 on a transformers (or PEFT)
    Llama's own half-precision weights, the reference both half-precision paths are measured against. Each decoder
    layer (its LoRA included) is cast to fp32 for its own forward and back to its parameters' dtypes after (exact:
    the values came from those dtypes), so at most one layer is held in fp32 at a time; the embedding's output, the
    rotary tables, the final norm and the lm_head are fp32 throughout."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model

    def to_fp32(mod) -> dict:
        dtypes = {p: p.dtype for p in mod.parameters()}
        mod.float()
        return dtypes

    def restore(dtypes: dict) -> None:
        for p, dt in dtypes.items():
            p.data = p.data.to(dt)

    held: dict = {}
    hooks = [inner.embed_tokens.register_forward_hook(lambda m, args, out: out.float())]
    for layer in inner.layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, args: held.__setitem__(m, to_fp32(m))))
        hooks.append(layer.register_forward_hook(lambda m, args, out: restore(held.pop(m))))
    ends = [to_fp32(m) for m in (inner.norm, base.lm_head)]
    try:  # (no_grad, not inference_mode: the weights cast back must stay ordinary tensors)
        with torch.no_grad():
            return model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    finally:
        for hook in hooks:
            hook.remove()
        for dtypes in [*ends, *held.values()]:
            restore(dtypes)


# ------------------------------------------------------------------------------------------------- running


def run(cfg: BenchConfig, log: Callable[[str], None] | None = None,
        checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the result dict (the JSON). ``log`` receives progress notes; ``checkpoint``
    receives the partial result (``header.complete`` false) after every point, so a run cut short keeps its data."""
    import transformers

    log = log or (lambda s: None)
    cfg = cfg.resolve()
    dev = _device(cfg.device)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="fastdebias-bench-") as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft
            return _run(cfg, dev, Path(tmp), log, checkpoint)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _run(cfg: BenchConfig, dev: torch.device, workdir: Path, log: Callable[[str], None],
         checkpoint: Callable[[dict], None] | None) -> dict:
    from fastdebias.loader import load_config
    from fastdebias.pipeline import _load_tokenizer, _resolve_dtype

    t_start, load_start = time.perf_counter(), _loadavg()
    log("preparing the model and adapter ...")
    setup = prepare(cfg, workdir, dev)
    config = load_config(setup.hf_dir)
    dtype = _resolve_dtype(cfg.dtype or (SYNTHETIC[cfg.synthetic]["dtype"] if cfg.synthetic else None), config, dev)
    tokenizer = _load_tokenizer(setup.hf_dir)
    vocab = config.vocab_size
    prompts_all = make_prompts(tokenizer, max(cfg.batch_sizes), cfg.prompt_len, vocab, seed=cfg.seed)
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    log("measuring the copy bandwidth ...")
    copy_gbs = copy_bandwidth_gbs(dev)

    lexicon_cache: dict[int, Any] = {}
    lexicon_build_s: dict[int, float] = {}

    def lexicon(size: int):
        if size not in lexicon_cache:
            t0 = time.perf_counter()
            lexicon_cache[size] = synthetic_lexicon(size, vocab, seed=cfg.seed, exclude=special)
            lexicon_build_s[size] = time.perf_counter() - t0
        return lexicon_cache[size]

    hf_cache: dict[int, tuple[dict, list]] = {}

    def hf_lexicon(size: int):
        """The same lexicon as transformers takes it, from ``Lexicon.compile`` (EOS-only bans dropped as
        ``generate`` does)."""
        if size not in hf_cache:
            lex = lexicon(size)
            if lex is None:
                hf_cache[size] = ({}, [])
            else:
                m = lex.compile(tokenizer, vocab_size=vocab, eos_token_id=config.eos_token_id)
                hf_cache[size] = (m.hf_sequence_bias(), m.hf_bad_words_ids())
        return hf_cache[size]

    itemsize = torch.empty((), dtype=dtype).element_size()
    mb = ModelBytes.from_config(config, itemsize, adapter_numel(setup.adapter_dir) * itemsize)
    plan = cfg.points()
    systems_info = {name: dict(description=SYSTEM_DESCRIPTIONS[name], status="ok", reason=None, load_s=None,
                               compile_s=None) for name in plan}
    if "hf-compile" in plan and not cfg.compile:
        systems_info["hf-compile"].update(status="skipped", reason="--quick" if cfg.quick else "--no-compile")
    todo = [s for s in ALL_SYSTEMS if s in plan and systems_info[s]["status"] == "ok"]
    # Interleaved: every system loaded at once, taking turns at each point (fair under a noisy CPU). One at a
    # time: each system alone in memory (its peak memory is its own; a 7B model four times over would not fit);
    # fastdebias and fastdebias-noadapter always share one loaded model.
    # Cheapest first, torch.compile last: a run cut short by a time limit keeps the most (see ``checkpoint``).
    if cfg.interleave:
        groups = [todo]
    else:
        groups = [[s for s in todo if s in ("fastdebias", "fastdebias-noadapter")]]
        groups += [[s] for s in ("fastdebias-merged", "fastdebias-eager", "fastdebias-compile", "hf-eager",
                                 "hf-compile") if s in todo]
    points: list[dict] = []
    outputs: dict[tuple[str, int, int], list[list[int]]] = {}
    divergences: dict[tuple[int, int], dict] = {}  # (batch, lexicon) -> _diagnose(...), where the outputs differ
    peak = _PeakMemory(dev)
    bar = tqdm(total=sum(len(plan[s]) for s in todo), desc="bench", unit="point", disable=not cfg.progress)

    def on_error(name: str, e: Exception, where: str = "") -> None:
        info = systems_info[name]
        if isinstance(e, _Timeout):
            info.update(status="skipped", reason=f"torch.compile {where}{e}; see --compile-timeout")
        elif dev.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
            info.setdefault("out_of_memory", []).append(where.strip())
            torch.cuda.empty_cache()
            log(f"{name}: CUDA out of memory {where}")
            return
        elif name == "hf-compile":  # torch.compile failing is a result to report, not a crash
            info.update(status="skipped", reason=f"torch.compile failed: {type(e).__name__}: {e}"[:500])
        else:
            raise e
        if isinstance(e, _Timeout) or name == "hf-compile":
            torch._dynamo.reset()
        log(f"{name}: {info['reason']}")

    from fastdebias import ops

    commit, dirty = git_commit()
    header = dict(
        device=device_name(dev), device_tag=device_tag(dev), device_type=dev.type, torch=torch.__version__,
        transformers=_version("transformers"), peft=_version("peft"), triton=_version("triton"),
        fastdebias=_version("fastdebias"), python=platform.python_version(), dtype=str(dtype).replace("torch.", ""),
        commit=commit, dirty=dirty, model=setup.model_desc, adapter=setup.adapter_desc, prompt_len=cfg.prompt_len,
        new_tokens=cfg.new_tokens, batch_sizes=cfg.batch_sizes, lexicon_sizes=cfg.lexicon_sizes,
        lexicon_size=cfg.lexicon_size,
        lexicon=("random token sequences of 1-4 tokens, penalties uniform in [-4, -0.5], no bans; "
                 f"fastdebias lexicon_mode={cfg.lexicon_mode!r}, transformers sequence_bias"),
        reps=cfg.reps, warmup=cfg.warmup, quick=cfg.quick, synthetic=cfg.synthetic,
        prompts=(f"{len(TEXTS)} SR-LLM debiasing prompts, left-truncated to {cfg.prompt_len} tokens"
                 if tokenizer is not None else f"random token ids, {cfg.prompt_len} per prompt"),
        fastdebias_runtime=cfg.runtime,
        fastdebias_compile_step=cfg.compile_step,
        # which CPU GEMM few fp32 rows take (F.linear on Intel CPUs, oneDNN elsewhere): it differs by machine
        cpu_mkl_max_rows=ops.CPU_MKL_MAX_ROWS if dev.type == "cpu" else None,
        hf_compile_config=("cache_implementation='static', CompileConfig(fullgraph=True, dynamic=False, mode="
                           f"{'reduce-overhead' if dev.type == 'cuda' else 'default'!r})"),
        order="interleaved" if cfg.interleave else "one system at a time", loadavg_start=load_start,
        model_tag=_model_tag(cfg),
    )

    def assemble(complete: bool) -> dict:
        """The result (the JSON) from what has been measured so far."""
        comparisons = _finish_points(points, outputs, cfg, mb, copy_gbs, divergences)
        result = dict(
            schema=1,
            header=dict(header, memory_method=peak.method, loadavg_end=_loadavg(), complete=complete,
                        seconds=time.perf_counter() - t_start),
            copy_bandwidth_gbs=copy_gbs,
            model_bytes=asdict(mb),
            lexicon_build_s={str(k): v for k, v in lexicon_build_s.items()},
            systems=systems_info,
            points=points,
            comparisons=comparisons,
            mismatches=[c for c in comparisons if c["identical"] is False and not c["rounding"]],
            lora_overhead=_lora_overhead(points, cfg),
            lexicon_overhead=_lexicon_overhead(points, cfg),
        )
        result["goals"] = evaluate_goals(result)
        return result

    for group in groups:
        loaded: dict[str, _System] = {}
        for name in group:
            bar.set_description(f"bench: loading {name}")
            t0 = time.perf_counter()
            try:
                if name.startswith("fastdebias"):
                    shared = loaded.get("fastdebias") if name == "fastdebias-noadapter" else None
                    runtime = {"fastdebias-eager": "eager", "fastdebias-compile": "compile"}.get(name, cfg.runtime)
                    loaded[name] = _FastDebias(name, setup, dev, dtype, lexicon, cfg.lexicon_mode, runtime,
                                               model=shared.model if shared else None,
                                               compile_step=cfg.compile_step)
                    systems_info[name]["runtime"] = loaded[name].model.runtime
                else:
                    loaded[name] = _Transformers(name, setup, dev, dtype, hf_lexicon, cfg.compile_timeout)
                    systems_info[name]["attn_implementation"] = loaded[name].attn_implementation
            except Exception as e:  # a system that cannot load is reported, not fatal
                systems_info[name].update(status="failed", reason=f"load: {type(e).__name__}: {e}"[:500])
                log(f"{name}: could not load ({systems_info[name]['reason']})")
                bar.update(len(plan[name]))
                continue
            systems_info[name]["load_s"] = time.perf_counter() - t0
        for b, lx in dict.fromkeys(pt for name in loaded for pt in plan[name]):
            members = {n: s for n, s in loaded.items() if (b, lx) in plan[n] and systems_info[n]["status"] == "ok"}
            bar.set_description(f"bench b={b} lex={lx}: {', '.join(members)}")
            where = f"at batch {b}, lexicon {lx}: "
            res = measure_group(members, prompts_all[:b], cfg.new_tokens, lx, cfg.reps, cfg.warmup, dev, peak,
                                lambda n, e: on_error(n, e, where))
            for name, (rec, out) in res.items():
                outputs[(name, b, lx)] = out
                points.append(dict(system=name, batch=b, lexicon_size=lx, status="ok", reason=None, **rec))
            if "fastdebias" in res and "hf-eager" in res and res["fastdebias"][1] != res["hf-eager"][1]:
                bar.set_description(f"bench b={b} lex={lx}: where the greedy outputs diverge")
                try:
                    divergences[(b, lx)] = _diagnose(members["fastdebias"], members["hf-eager"], prompts_all[:b],
                                                     res["fastdebias"][1], res["hf-eager"][1], lx, dtype)
                except Exception as e:  # reported; the mismatch then stays unexplained
                    log(f"could not diagnose the divergence at batch {b}, lexicon {lx}: {type(e).__name__}: {e}")
            bar.update(len(members))
            if checkpoint is not None:
                checkpoint(assemble(complete=False))
        for name, system in loaded.items():
            systems_info[name]["compile_s"] = system.compile_s
            if isinstance(system, _FastDebias):
                systems_info[name]["lexicon_compile_s"] = {str(k): v for k, v in system.compile_times.items()}
            system.close()
        del loaded
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    for name, pts in plan.items():  # a record for every planned point; the reason where it was not measured
        for b, lx in pts:
            if _find(points, name, b, lx) is None:
                oom = f"at batch {b}, lexicon {lx}:" in " ".join(systems_info[name].get("out_of_memory", []))
                points.append(_skipped_point(name, b, lx, "CUDA out of memory" if oom else
                                             systems_info[name]["reason"] or "not measured"))

    return assemble(complete=True)


def _model_tag(cfg: BenchConfig) -> str:
    """The model part of result file names: empty for the embedded model, else the synthetic shape, "quick", or
    the model directory's name."""
    if cfg.quick:
        return "quick"
    if cfg.synthetic:
        return cfg.synthetic
    return "" if cfg.model is None else "".join(c if c.isalnum() or c in "-." else "-" for c in Path(cfg.model).name)


def _skipped_point(system: str, batch: int, lexicon_size: int, reason: str) -> dict:
    rec = {k: None for k in POINT_FIELDS}
    rec.update(system=system, batch=batch, lexicon_size=lexicon_size, status="skipped", reason=reason)
    return rec


def _find(points: list[dict], system: str, batch: int, lexicon_size: int) -> dict | None:
    for p in points:
        if (p["system"], p["batch"], p["lexicon_size"]) == (system, batch, lexicon_size) and p["status"] == "ok":
            return p
    return None


def _finish_points(points, outputs, cfg: BenchConfig, mb: ModelBytes, copy_gbs: float,
                   divergences: dict | None = None) -> list[dict]:
    """Bytes, bandwidth, memory bound, speedups and the token-identity check, filled into each point; where the
    outputs differ, the comparison carries ``_diagnose``'s findings (``divergence``) and whether every diverging
    row was a rounding flip (``rounding``)."""
    comparisons = []
    for p in points:
        for k in POINT_FIELDS:
            p.setdefault(k, None)
        if p["status"] != "ok":
            continue
        b, lx = p["batch"], p["lexicon_size"]
        with_lora = p["system"] in ("fastdebias", "hf-eager")
        p["bytes_per_step"] = mb.per_step(b, cfg.prompt_len, cfg.new_tokens, with_lora)
        if p["tpot_ms"] and p["tpot_ms"] > 0:
            p["gbps"] = p["bytes_per_step"] / (p["tpot_ms"] / 1e3) / 1e9
            p["pct_copy_bandwidth"] = 100 * p["gbps"] / copy_gbs
        kv = b * mb.kv_per_position * (cfg.prompt_len + cfg.new_tokens)
        p["memory_bound_mib"] = (mb.weights_total + (mb.lora if with_lora else 0) + kv) / (1 << 20)
        for ref, key in (("hf-eager", "speedup_vs_hf_eager"), ("hf-compile", "speedup_vs_hf_compile")):
            other = _find(points, ref, b, lx)
            p[key] = p["tokens_per_s"] / other["tokens_per_s"] if other else None
        if p["system"] in ("fastdebias", "hf-eager"):
            a, h = outputs.get(("fastdebias", b, lx)), outputs.get(("hf-eager", b, lx))
            if a is not None and h is not None:
                c = _compare(a, h)
                p["tokens_identical"] = c["identical"]
                if p["system"] == "fastdebias":
                    d = (divergences or {}).get((b, lx)) if not c["identical"] else None
                    comparisons.append(dict(batch=b, lexicon_size=lx, **c, divergence=d,
                                            rounding=bool(d and d["rounding"])))  # fmt: skip
    return comparisons


def _lora_overhead(points, cfg: BenchConfig) -> list[dict]:
    rows = []
    for b in cfg.batch_sizes:
        u, m, n = (_find(points, s, b, cfg.lexicon_size) for s in
                   ("fastdebias", "fastdebias-merged", "fastdebias-noadapter"))
        if u is None or (m is None and n is None):
            continue
        rows.append(dict(
            batch=b, lexicon_size=cfg.lexicon_size, unmerged_tokens_per_s=u["tokens_per_s"],
            merged_tokens_per_s=m["tokens_per_s"] if m else None,
            noadapter_tokens_per_s=n["tokens_per_s"] if n else None,
            overhead_vs_merged_pct=100 * (m["tokens_per_s"] / u["tokens_per_s"] - 1) if m else None,
            overhead_vs_noadapter_pct=100 * (n["tokens_per_s"] / u["tokens_per_s"] - 1) if n else None,
        ))
    return rows


def _lexicon_overhead(points, cfg: BenchConfig) -> list[dict]:
    b = cfg.batch_sizes[0]
    rows = []
    for system in HEAD_TO_HEAD:
        base = _find(points, system, b, 0)
        for lx in cfg.lexicon_sizes:
            p = _find(points, system, b, lx)
            if p is None or lx == 0:
                continue
            none = base["tokens_per_s"] if base else None
            rows.append(dict(system=system, batch=b, lexicon_size=lx, tokens_per_s=p["tokens_per_s"],
                             none_tokens_per_s=none,
                             overhead_vs_none_pct=100 * (none / p["tokens_per_s"] - 1) if base else None))
    return rows


def evaluate_goals(result: dict) -> list[dict]:
    """The issue's goals with this run's figures. Each: goal, target, measured, met (None: not measured here),
    and whether this run is the configuration the goal is stated for (``applies``)."""
    h, pts = result["header"], result["points"]
    b1, lx = h["batch_sizes"][0], h["lexicon_size"]
    fd = _find(pts, "fastdebias", b1, lx)
    goals = []

    def add(goal, target, measured, ok, applies, note=""):
        goals.append(dict(goal=goal, target=target, measured=measured, met=None if measured is None else ok,
                          applies=applies, note=note))

    where = f"batch {b1}, lexicon {lx}"
    if h["device_type"] == "cpu":
        applies = h["model"].startswith("embedded") and h["dtype"] == "float32" and b1 == 1
        s = fd["speedup_vs_hf_eager"] if fd else None
        add("CPU: tokens/s over hf-eager (SmolLM2 fp32, batch 1)", ">= 2.5x", s, s is not None and s >= 2.5,
            applies, where)
        fd0 = _find(pts, "fastdebias", b1, 0)
        s0 = fd0["speedup_vs_hf_eager"] if fd0 else None
        add("CPU: tokens/s over hf-eager, no lexicon", ">= 2.5x", s0, s0 is not None and s0 >= 2.5, applies,
            f"batch {b1}, lexicon 0")
        return goals
    applies = "H100" in h["device"] and h["synthetic"] == "llama2-7b" and b1 == 1 and lx == 10_000
    pct = fd["pct_copy_bandwidth"] if fd else None
    add("GPU: % of measured copy bandwidth", ">= 85%", pct, pct is not None and pct >= 85, applies, where)
    for ref, target in (("hf_eager", 10.0), ("hf_compile", 2.0)):
        s = fd[f"speedup_vs_{ref}"] if fd else None
        add(f"GPU: tokens/s over {ref.replace('_', '-')}", f">= {target:g}x", s, s is not None and s >= target,
            applies, where)
    lo = next((r for r in result["lora_overhead"] if r["batch"] == b1), None)
    o = lo["overhead_vs_merged_pct"] if lo else None
    add("GPU: LoRA overhead vs merged", "<= 3%", o, o is not None and o <= 3, applies, where)
    lex = next((r for r in result["lexicon_overhead"] if r["system"] == "fastdebias"
                and r["lexicon_size"] == max(h["lexicon_sizes"])), None)
    o = lex["overhead_vs_none_pct"] if lex else None
    add(f"GPU: lexicon {max(h['lexicon_sizes'])} overhead vs none", "<= 1%", o, o is not None and o <= 1,
        applies and max(h["lexicon_sizes"]) >= 100_000, f"batch {b1}")
    if fd and fd["peak_allocated_mib"] is not None:
        r = fd["peak_allocated_mib"] / fd["memory_bound_mib"]
        add("GPU: peak allocated / (weights + LoRA + KV cache)", "<= 1.10", r, r <= 1.10, applies, where)
    else:
        add("GPU: peak allocated / (weights + LoRA + KV cache)", "<= 1.10", None, None, applies, where)
    return goals


# ---------------------------------------------------------------------------------------------- reporting


def _f(x, fmt: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _one_line(text) -> str:
    """``text`` on one line (an exception's message may span several)."""
    return " ".join(str(text).split())


def _cell(text) -> str:
    """``text`` as one markdown table cell: on one line, pipes escaped."""
    return _one_line(text).replace("|", "\\|")


def format_markdown(result: dict) -> str:
    """The header, the head-to-head table, LoRA and lexicon overheads, token identity and the goals."""
    h = result["header"]
    commit = h["commit"] + ("+dirty" if h["dirty"] else "")
    memory = "CUDA max allocated (reserved in the JSON)" if h["device_type"] == "cuda" else (
        f"the process's peak RSS ({h['memory_method']}), reset at each point")
    if h["order"] == "interleaved":
        memory += ", every system loaded at once"
    lines = [
        f"# fastdebias end-to-end decode benchmark: {h['device_tag']}"
        + ("" if h.get("complete", True) else " (PARTIAL: the run stopped before the end)"),
        "",
        f"- device: {h['device']}; copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s (read + write, measured "
        "in this run)",
        f"- torch {h['torch']}, transformers {h['transformers']}, peft {h['peft']}, triton {h['triton']}, "
        f"python {h['python']}; commit {commit}",
        f"- model: {h['model']}; dtype {h['dtype']}; adapter: {h['adapter']}",
        f"- prompts: {h['prompts']}; output: {h['new_tokens']} new tokens (EOS ignored); medians of {h['reps']} "
        f"reps after {h['warmup']} warm-up",
        f"- lexicon: {h['lexicon']}",
        f"- fastdebias: runtime {h.get('fastdebias_runtime', 'auto')!r}"
        f"{'' if h.get('fastdebias_compile_step') is None else ', compile_step=' + str(h['fastdebias_compile_step'])}"
        " (see fastdebias.runtime); hf-compile: "
        f"{h['hf_compile_config']}",
        *([] if h.get("cpu_mkl_max_rows") is None else [
            "- CPU projections (fp32): "
            + (f"F.linear (MKL) for up to {h['cpu_mkl_max_rows']} rows eagerly, 2 compiled; " if h["cpu_mkl_max_rows"]
               else "no F.linear rule (not an Intel CPU); ")
            + "compiled, a multiply-reduce for 1 row (2 without the rule); else oneDNN on packed weights "
            f"(fastdebias.ops.CPU_MKL_MAX_ROWS = {h['cpu_mkl_max_rows']}: 3 on Intel CPUs, 0 elsewhere)"]),
        f"- order: {h['order']}; peak memory: {memory}",
        f"- load average (1/5/15 min) at start {h['loadavg_start']}, at end {h['loadavg_end']}; "
        f"run took {h['seconds']:.0f} s",
        "",
        "TTFT: 1-token run; TPOT: (total - TTFT) / (n - 1); tok/s: batch x n / total; GB/s: (weights + LoRA + KV "
        "read) per decode step / TPOT; speedups in tok/s at the same batch and lexicon.",
        "",
        "| system | batch | lexicon | TTFT ms | TPOT ms | tok/s | decode tok/s | GB/s | % copy BW | peak MiB | "
        "x hf-eager | x hf-compile | identical |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    mem = "peak_allocated_mib" if h["device_type"] == "cuda" else "peak_rss_mib"
    order = {s: i for i, s in enumerate(ALL_SYSTEMS)}
    flips = {(c["batch"], c["lexicon_size"]) for c in result["comparisons"] if c.get("rounding")}
    for p in sorted(result["points"], key=lambda p: (p["lexicon_size"] != h["lexicon_size"], p["lexicon_size"],
                                                      p["batch"], order[p["system"]])):
        if p["status"] != "ok":
            lines.append(f"| {p['system']} | {p['batch']} | {p['lexicon_size']} | skipped: {_cell(p['reason'])} "
                         "| | | | | | | | | |")
            continue
        ident = {True: "yes", False: "**MISMATCH**", None: ""}[p["tokens_identical"]]
        if (p["batch"], p["lexicon_size"]) in flips and p["tokens_identical"] is False:
            ident = "no: rounding flip"
        lines.append(
            f"| {p['system']} | {p['batch']} | {p['lexicon_size']} | {_f(p['ttft_ms'])} | {_f(p['tpot_ms'], '.2f')} "
            f"| {_f(p['tokens_per_s'])} | {_f(p['decode_tokens_per_s'])} | {_f(p['gbps'], '.2f')} "
            f"| {_f(p['pct_copy_bandwidth'])} | {_f(p[mem], '.0f')} | {_f(p['speedup_vs_hf_eager'], '.2f')} "
            f"| {_f(p['speedup_vs_hf_compile'], '.2f')} | {ident} |"
        )
    if result["lora_overhead"]:
        lines += ["", "LoRA overhead (fastdebias tok/s, unmerged vs merged / no adapter; + = unmerged slower):", "",
                  "| batch | unmerged | merged | no adapter | vs merged % | vs no adapter % |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in result["lora_overhead"]:
            lines.append(f"| {r['batch']} | {_f(r['unmerged_tokens_per_s'])} | {_f(r['merged_tokens_per_s'])} "
                         f"| {_f(r['noadapter_tokens_per_s'])} | {_f(r['overhead_vs_merged_pct'], '+.1f')} "
                         f"| {_f(r['overhead_vs_noadapter_pct'], '+.1f')} |")
    if result["lexicon_overhead"]:
        lines += ["", "Lexicon overhead (tok/s with the lexicon vs none, same system and batch):", "",
                  "| system | batch | lexicon | tok/s | tok/s none | overhead % |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in result["lexicon_overhead"]:
            lines.append(f"| {r['system']} | {r['batch']} | {r['lexicon_size']} | {_f(r['tokens_per_s'])} "
                         f"| {_f(r['none_tokens_per_s'])} | {_f(r['overhead_vs_none_pct'], '+.1f')} |")
    lines += ["", "Greedy outputs, fastdebias vs hf-eager:", ""]
    for c in result["comparisons"]:
        if c["identical"]:
            verdict = "token-identical"
        else:
            verdict = (f"{'diverged by rounding' if c.get('rounding') else 'MISMATCH'}: {c['rows_identical']}/"
                       f"{c['rows']} rows identical, first divergence at row {c['first_divergence']['row']} step "
                       f"{c['first_divergence']['step']}")
            d = c.get("divergence")
            if d is None:
                verdict += (" (not diagnosed: fastdebias and hf-eager were not loaded together; --interleave loads "
                            "them together and says why they diverge)")
            elif d.get("not_diagnosed"):
                verdict += (f" ({d['not_diagnosed']} rows diverging after the first {MAX_DIAGNOSED_STEPS} divergence "
                            "steps not diagnosed)")
            shown = (d or {}).get("rows", [])
            if len(shown) > 3:
                beyond = sum(not f["rounding"] for f in shown[3:])
                verdict += f" ({len(shown) - 3} more rows diverged, {beyond} of them beyond rounding: see the JSON)"
            for f in shown[:3]:
                verdict += (
                    f"; row {f['row']} step {f['step']}: fastdebias {f['ours']}, transformers {f['ref']}, whose "
                    f"scores of the two differ by {f['margin']:.3g} where the models' logits for that prefix differ "
                    f"by up to {f['max_logit_diff']:.3g} (largest |logit| {f['logit_scale']:.3g})"
                    + ("" if "ref_margin" not in f else
                       f"; against fp32 logits fastdebias is off by up to {f['err_fastdebias']:.3g}, transformers by "
                       f"{f['err_transformers']:.3g}, and fp32 prefers {f['fp32_prefers']}'s token by "
                       f"{f['ref_margin']:.3g}")
                    + (": a near tie, rounding" if f["rounding"] else ": **beyond rounding**"))
        lines.append(f"- batch {c['batch']}, lexicon {c['lexicon_size']}: {verdict}")
    if any(c.get("rounding") for c in result["comparisons"]):
        lines.append(f"\nA rounding flip: at a step where transformers' top two scores are closer than the two "
                     f"models' logits differ ({h['dtype']} rounding, each within "
                     f"{ROUNDING_TOL[getattr(torch, h['dtype'])]:g} of the largest |logit|, or fastdebias within "
                     f"{REFERENCE_SLACK:g}x transformers' own distance from fp32 logits of the same weights), the two "
                     "picked different tokens, and the rows went on from different prefixes "
                     "(fastdebias.bench._diagnose).")
    if not result["comparisons"]:
        lines.append("- not compared (one of the two systems did not run)")
    lines += ["", "Goals:", "", "| goal | target | measured | met | configuration of the goal |",
              "| --- | --- | ---: | --- | --- |"]
    for g in result["goals"]:
        # (a miss is bold only where this run is the goal's configuration: --quick's tiny model misses by design)
        met = {True: "yes", False: "**no**" if g["applies"] else "no", None: "pending"}[g["met"]]
        lines.append(f"| {g['goal']} ({g['note']}) | {g['target']} | {_f(g['measured'], '.2f')} | {met} "
                     f"| {'yes' if g['applies'] else 'no (figure for information)'} |")
    skipped = {s: i["reason"] for s, i in result["systems"].items() if i["status"] != "ok"}
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{s}: {_one_line(r)}" for s, r in skipped.items())]
    lines.append("")
    return "\n".join(lines)


def mismatch_lines(result: dict) -> list[str]:
    """One loud line per (batch, lexicon) where fastdebias and transformers gave different greedy tokens."""
    return [
        f"MISMATCH: fastdebias vs hf-eager greedy outputs differ at batch {c['batch']}, lexicon {c['lexicon_size']}: "
        f"{c['rows_identical']}/{c['rows']} rows identical, first divergence row {c['first_divergence']['row']} "
        f"step {c['first_divergence']['step']}"
        for c in result["mismatches"]
    ]


def plot(result: dict, path: str | os.PathLike) -> None:
    """PNG: tokens/s vs batch (at the sweep's lexicon), one line per system; tokens/s vs lexicon size."""
    from matplotlib.figure import Figure  # Figure + savefig uses the Agg canvas: no pyplot, no display needed
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    h = result["header"]
    sweep_lexicon = len({p["lexicon_size"] for p in result["points"]}) > 1  # else no second panel
    fig = Figure(figsize=(12 if sweep_lexicon else 6.5, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2) if sweep_lexicon else (fig.subplots(1, 1), None)
    for system in ALL_SYSTEMS:
        pts = sorted((p["batch"], p["tokens_per_s"]) for p in result["points"] if p["system"] == system
                     and p["status"] == "ok" and p["lexicon_size"] == h["lexicon_size"])
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=system)
        pts = sorted((p["lexicon_size"], p["tokens_per_s"]) for p in result["points"] if p["system"] == system
                     and p["status"] == "ok" and p["batch"] == h["batch_sizes"][0])
        if ax2 is not None and len(pts) > 1:
            ax2.plot(*zip(*pts), marker="o", label=system)
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="generated tokens/s",
            title=f"tokens/s vs batch (lexicon {h['lexicon_size']})")
    ax1.set_xticks(h["batch_sizes"], [str(b) for b in h["batch_sizes"]])
    ax1.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.tick_params(axis="y", which="minor", labelsize=7)
    if ax2 is not None:
        ax2.set(xscale="symlog", xlabel="lexicon entries", ylabel="generated tokens/s",
                title=f"tokens/s vs lexicon size (batch {h['batch_sizes'][0]})")
        ax2.set_xscale("symlog", linthresh=100)
        ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2) if ax2 is not None else (ax1,):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    commit = h["commit"] + ("+dirty" if h["dirty"] else "")
    sep = " | " if sweep_lexicon else "\n"  # one panel: the header on two lines
    fig.suptitle(f"{h['device']} | {h['model']} | {h['dtype']} | prompt {h['prompt_len']}, {h['new_tokens']} new "
                 f"tokens{sep}torch {h['torch']}, transformers {h['transformers']} | {commit}", fontsize=8)
    fig.savefig(str(path), dpi=110)


def write_outputs(result: dict, *, json_path=None, md_path=None, plot_path=None, out_dir=None,
                  with_plot: bool = True) -> list[Path]:
    """Write the JSON, the markdown and the PNG where asked; ``out_dir`` names them ``e2e_<device>.*`` for the
    embedded model, ``e2e_<device>_<model>.*`` otherwise (``e2e_cpu``, ``e2e_NVIDIA-H100-80GB-HBM3_llama2-7b``)."""
    paths: dict[str, Path | None] = dict(json=json_path, md=md_path, png=plot_path)
    if out_dir is not None:
        h = result["header"]
        stem = Path(out_dir) / ("_".join(x for x in ("e2e", h["device_tag"], h.get("model_tag")) if x))
        for ext in paths:
            paths[ext] = paths[ext] or stem.with_suffix(f".{ext}")
    if not with_plot:
        paths["png"] = None
    written = []
    for ext, p in paths.items():
        if p is None:
            continue
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        if ext == "json":
            p.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        elif ext == "md":
            p.write_text(format_markdown(result), encoding="utf-8")
        else:
            plot(result, p)
        written.append(p)
    return written


def save_results(stem: Path, md: str, data: dict, draw: Callable, figsize: tuple[float, float] = (7, 3.5)) -> None:
    """The outputs of a ``bench/`` script: ``stem``.md (its table), ``stem``.json (``data``) and ``stem``.png, the
    figure ``draw(fig)`` fills (a new matplotlib figure, Agg backend); prints each path written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{stem}.{ext}") for ext in ("md", "json", "png")]  # (not with_suffix: a stem may hold a dot)
    paths[0].write_text(md, encoding="utf-8")
    paths[1].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    draw(fig)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    for path in paths:
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x.replace("_", "").replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 1,8,32 or 0,1k,10k), got {text!r}")
    if not values:  # "" or ",": an empty sweep would fail much later, or silently measure nothing
        raise argparse.ArgumentTypeError(f"no integer given in {text!r}; e.g. 1,8,32 or 0,1k,10k")
    return values


def _one_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer (e.g. 10k), got {text!r}")
    return values[0]


def _system_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:  # "" or ",": would otherwise fall back to the default systems without a word
        raise argparse.ArgumentTypeError(f"no system named in {text!r}; choose from {','.join(ALL_SYSTEMS)}")
    return names


def check_output_paths(*, json_path=None, md_path=None, plot_path=None, out_dir=None) -> None:
    """Make sure every output location can be written before the benchmark runs (it takes minutes to hours, and a
    bad path would otherwise only fail at the first write): creates the directories, then writes and removes a
    probe file in each. Raises ``FastDebiasError`` naming the flag."""
    targets = [("--out", Path(out_dir), None)] if out_dir is not None else []
    for flag, path in (("--json", json_path), ("--md", md_path), ("--plot", plot_path)):
        if path is not None:
            targets.append((flag, Path(path).parent, Path(path)))
    for flag, directory, file in targets:
        shown = file if file is not None else directory
        if file is not None and file.is_dir():
            raise FastDebiasError(f"{flag} {file}: is a directory; give a file path")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".fastdebias-bench-probe-"):
                pass
            if file is not None and file.exists():
                with open(file, "ab"):  # appends nothing: only checks the existing file may be rewritten
                    pass
        except OSError as e:
            raise FastDebiasError(
                f"{flag} {shown}: cannot write there ({e.strerror or e}); choose a writable location"
            ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fastdebias bench`` options."""
    p.add_argument("--model", "-m", default=None, help="HF Llama-family model dir (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", "-a", default=None, help="PEFT LoRA adapter dir (default: a random r=16 one)")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None,
                   help="random-weight model of this shape with a random LoRA (GPU only)")
    p.add_argument("--quick", action="store_true", help="CI: tiny random model, 8 tokens, batch 1,2, lexicon 0,1k")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, the checkpoint's half type on CUDA")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,8,32 (CPU) / 1,8,32,64 (GPU)")
    p.add_argument("--lexicon-sizes", type=_int_list, default=None,
                   help="lexicon sweep at the smallest batch; default 0,1k,10k (CPU) / 0,1k,10k,100k (GPU)")
    p.add_argument("--lexicon-size", type=_one_int, default=None,
                   help="lexicon of the batch sweep (default 10k)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default 64 CPU, 128 GPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions, median reported (default 3 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per point (default 1)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip hf-compile")
    p.add_argument("--runtime", default=None, choices=["auto", "eager", "cuda_graph", "compile"],
                   help="fastdebias decode runtime (default: compile on CPU, auto = CUDA graphs on GPU, eager --quick)")
    p.add_argument("--compile-step", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the decode loop's step (token choice, lexicon bookkeeping) as well; default: "
                        "on under runtime compile, off under CUDA graphs (where it fuses the step's small kernels "
                        "at the cost of a compile per batch size)")
    p.add_argument("--compile-timeout", type=float, default=900.0,
                   help="seconds allowed for torch.compile per batch size before hf-compile is skipped (default 900)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="load every system at once and take turns at each point (default on CPU; on GPU each "
                        "system runs alone so its peak memory is its own)")
    p.add_argument("--lexicon-mode", default="backtrack", choices=["backtrack", "hf"], help="fastdebias' mode")
    p.add_argument("--systems", type=_system_list, default=None,
                   help=f"subset of {','.join(ALL_SYSTEMS)} (default: all but {','.join(EXTRA_SYSTEMS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--md", dest="md_path", default=None, metavar="PATH", help="write the markdown report")
    p.add_argument("--plot", dest="plot_path", default=None, metavar="PATH", help="write the PNG plot")
    p.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="write e2e_<device>[_<model>].json/.md/.png into DIR (e.g. bench/results); the JSON and "
                        "markdown are rewritten after every point")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model, adapter=args.adapter, synthetic=args.synthetic, quick=args.quick, device=args.device,
        dtype=args.dtype, batch_sizes=args.batch_sizes, lexicon_sizes=args.lexicon_sizes,
        lexicon_size=args.lexicon_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps,
        warmup=args.warmup, compile=args.compile, compile_timeout=args.compile_timeout, runtime=args.runtime,
        compile_step=args.compile_step,
        lexicon_mode=args.lexicon_mode, interleave=args.interleave,
        systems=list(SYSTEMS) if args.systems is None else args.systems,
        seed=args.seed, progress=not args.quiet,
    )


__all__ = [
    "BenchConfig", "POINT_FIELDS", "SYNTHETIC", "SYSTEMS", "add_arguments", "check_output_paths", "config_from_args",
    "copy_bandwidth_gbs",
    "evaluate_goals", "format_markdown", "make_prompts", "make_synthetic", "mismatch_lines", "plot", "run",
    "synthetic_lexicon", "write_outputs",
]
