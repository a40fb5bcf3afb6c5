"""The decode runtime: chunked prefill, the static-shape step (batch and kv buckets, kept cache), CUDA graphs.

On CPU the static-shape logic is exercised through the ``"cuda_graph"`` runner logic with captures emulated
(``emulated_graphs``: what a graph replays is exactly the eager function on the static buffers), and
``runtime="compile"`` through real ``torch.compile`` runs. The CUDA-graph tests proper run on a GPU only.
"""

from __future__ import annotations

import collections
import gc
import importlib
import inspect
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdebias
from fastdebias import runtime
from fastdebias.errors import FastDebiasError
from fastdebias.generate import prefill
from fastdebias.lexicon import Lexicon

from .conftest import TOLERANCES, as_cuda_graph, triton_cuda_backend

generate_module = importlib.import_module("fastdebias.generate")  # the module (fastdebias.generate is the function)

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
NEW = 12


def tokens(results):
    return [r.token_ids for r in results]


def test_chunked_prefill_equals_one_pass(llama_dir, adapter_qv, monkeypatch):
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    idx = torch.tensor([0, -1, 0], dtype=torch.int32)
    whole, *_ = prefill(model, PROMPTS, 4, idx)
    want = tokens(fastdebias.generate(model, PROMPTS, adapter=["qv", None, "qv"], max_new_tokens=NEW))
    monkeypatch.setattr(runtime, "PREFILL_CHUNK", 3)  # 11 prompt tokens → chunks of 3, 3, 3, 2
    chunked, *_ = prefill(model, PROMPTS, 4, idx)
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(chunked, whole, rtol=rtol, atol=atol)
    assert tokens(fastdebias.generate(model, PROMPTS, adapter=["qv", None, "qv"], max_new_tokens=NEW)) == want


def test_unpadded_prefill_takes_is_causal_and_equals_masked(llama_dir, adapter_qv, monkeypatch):
    """A batch of equal-length prompts prefills with is_causal (flash on GPU): same logits as with the mask."""
    import torch.nn.functional as F

    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    same = [[1, 17, 42, 99, 5, 6, 7], [1, 200, 3, 4, 9, 8, 2]]
    idx = torch.tensor([0, -1], dtype=torch.int32)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda *a, **kw: seen.append(kw["attn_mask"] is None and kw["is_causal"]) or sdpa(*a, **kw),
    )
    causal, *_ = prefill(model, same, 4, idx)
    assert seen and all(seen)
    masked = model.decoder(
        torch.tensor(same),
        torch.arange(7).expand(2, 7),
        torch.zeros(2, dtype=torch.long),
        7,
        model.runner.allocate(2, 11, model.dtype, model.device),
        idx,
    )
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(causal, masked, rtol=rtol, atol=atol)
    seen.clear()
    prefill(model, PROMPTS, 4, None)  # padded: the mask
    assert seen and not any(seen)


def test_static_step_equals_eager(llama_dir, adapter_qv, adapter_all, emulated_graphs):
    adapters = {"qv": adapter_qv, "all": adapter_all}
    eager = fastdebias.load(llama_dir, adapters, runtime="eager", progress=False)
    static = as_cuda_graph(fastdebias.load(llama_dir, adapters, runtime="eager", progress=False))
    assert static.runner.static and not eager.runner.static
    for names in (["qv", None, "all"], ["all", "all", None], None):  # the adapter mix changes between calls
        want = tokens(fastdebias.generate(eager, PROMPTS, adapter=names, max_new_tokens=NEW))
        got = tokens(fastdebias.generate(static, PROMPTS, adapter=names, max_new_tokens=NEW))
        assert got == want, names
    # batch 3 is padded to 4; the cache is kept and reused across calls, and grows for a larger batch
    cache = static.runner.cache
    assert cache.k[0].shape[0] == 4
    assert tokens(fastdebias.generate(static, PROMPTS[:1], max_new_tokens=NEW)) == tokens(
        fastdebias.generate(eager, PROMPTS[:1], max_new_tokens=NEW)
    )
    assert static.runner.cache is cache
    five = PROMPTS + [[1, 3], [1, 4, 5]]
    assert tokens(fastdebias.generate(static, five, max_new_tokens=NEW)) == tokens(
        fastdebias.generate(eager, five, max_new_tokens=NEW)
    )
    assert static.runner.cache.k[0].shape[0] == 8


def _rewinds_equal_eager(eager, model, sampling: bool = True):
    """Bans of each row's free-running tokens 3-5 (rewinds) and the three penalties: ``model``'s tokens and
    interventions equal ``eager``'s, greedy and (``sampling``) seeded sampling. Returns (the free-running tokens,
    the kwargs, the tokens under them)."""
    free = tokens(fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW))
    lex = Lexicon.from_token_sequences({tuple(r[3:6]): float("-inf") for r in free})
    kw = dict(max_new_tokens=NEW, lexicon=lex, repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3)
    a, b = fastdebias.generate(eager, PROMPTS, **kw), fastdebias.generate(model, PROMPTS, **kw)
    assert any(i.action == "rewound" for r in b for i in r.interventions)  # rewinds happened under ``model``
    assert tokens(b) == tokens(a) and [r.interventions for r in b] == [r.interventions for r in a]
    if sampling:
        s1 = fastdebias.generate(eager, PROMPTS, temperature=0.9, seed=5, **kw)
        assert tokens(fastdebias.generate(model, PROMPTS, temperature=0.9, seed=5, **kw)) == tokens(s1)
    return free, kw, tokens(a)


def test_static_step_with_backtracking_and_sampling(llama_dir, emulated_graphs):
    eager = fastdebias.load(llama_dir, runtime="eager", progress=False)
    static = as_cuda_graph(fastdebias.load(llama_dir, runtime="eager", progress=False))
    _rewinds_equal_eager(eager, static)


def test_static_compiled_step_with_min_new_tokens(llama_dir, emulated_graphs):
    """``min_new_tokens`` inside the captured (and compiled) step: EOS banned per row until it holds that many
    tokens, as eager; two rows for four prompts, so joining rows start with their own (zero) lengths."""
    eager = fastdebias.load(llama_dir, runtime="eager", progress=False)
    static = as_cuda_graph(fastdebias.load(llama_dir, runtime="eager", progress=False), compile_step=True)
    prompts = PROMPTS + [[1, 60, 61]]
    free = tokens(fastdebias.generate(eager, prompts, max_new_tokens=NEW, eos_token_id=[]))
    kw = dict(max_new_tokens=NEW, eos_token_id=sorted({r[2] for r in free}), batch_size=2)
    assert any(len(r) < 6 for r in tokens(fastdebias.generate(eager, prompts, **kw)))
    want = fastdebias.generate(eager, prompts, min_new_tokens=6, **kw)
    assert all(len(r.token_ids) >= 6 for r in want)
    got = fastdebias.generate(static, prompts, min_new_tokens=6, **kw)
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in want]
    assert sum(g.replays for g in emulated_graphs) > 0
    assert static.runner._step_fns.get(generate_module._advance) is not None


def test_static_step_with_triton_fused_head(llama_dir, adapter_qv, emulated_graphs):
    """backend="triton" (interpreted on CPU) under (emulated) graphs: the static step returns hidden states for the
    fused lm_head + step."""
    kw = dict(backend="triton", device="cuda" if torch.cuda.is_available() else "cpu", progress=False)
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw)
    static = as_cuda_graph(fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw))
    names = ["qv", None, "qv"]
    want = tokens(fastdebias.generate(eager, PROMPTS, adapter=names, max_new_tokens=5))
    assert tokens(fastdebias.generate(static, PROMPTS, adapter=names, max_new_tokens=5)) == want


def test_graph_replay_logic_on_cpu(llama_dir, adapter_qv, adapter_all, emulated_graphs, monkeypatch):
    """The cuda_graph runtime's bookkeeping (one graph per bucket, shared output buffers, no re-capture when the
    adapter mix changes; the loop's step captured per call and forward graph) with replay emulated; and failing
    captures fall back to eager with a warning."""
    adapters = {"qv": adapter_qv, "all": adapter_all}
    eager = fastdebias.load(llama_dir, adapters, runtime="eager", progress=False)
    model = as_cuda_graph(fastdebias.load(llama_dir, adapters, runtime="eager", progress=False))
    step_graphs = emulated_graphs
    for names in (["qv", None, "all"], ["all", "qv", None]):
        want = tokens(fastdebias.generate(eager, PROMPTS, adapter=names, max_new_tokens=NEW))
        assert tokens(fastdebias.generate(model, PROMPTS, adapter=names, max_new_tokens=NEW)) == want
        if names[0] == "qv":
            n = len(model.runner.graphs)
    assert len(model.runner.graphs) == n > 1  # several kv buckets; the second mix reused every graph
    # the loop's step was captured once per forward graph and call, and replayed (its state updated in place)
    assert len(step_graphs) == 2 * n and all(g.replays > 0 for g in step_graphs)
    _, kw, want = _rewinds_equal_eager(eager, model, sampling=False)
    assert sum(g.replays for g in step_graphs[2 * n:]) > 0

    def broken_step(self, fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runtime.DecodeRunner, "_capture_graph", broken_step)
    with pytest.warns(RuntimeWarning, match="capture of the decode loop's step failed"):
        assert tokens(fastdebias.generate(model, PROMPTS, **kw)) == want
    assert model.runtime == "cuda_graph"  # the forward's graphs are kept

    def broken(self, *key):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runtime.DecodeRunner, "_capture", broken)
    model.runner.reset()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed.*decoding eagerly"):
        got = tokens(fastdebias.generate(model, PROMPTS, max_new_tokens=NEW))
    assert got == tokens(fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW)) and model.runtime == "eager"


def _failing_compile(fn, **kw):
    """torch.compile on a machine where inductor cannot build (no C++ compiler, say): fails at the first call."""

    def run(*a):
        cls = torch._dynamo.exc.BackendCompilerFailed  # its constructor differs across torch versions
        e = cls.__new__(cls)
        Exception.__init__(e, "InvalidCxxCompiler: no working C++ compiler found")
        raise e

    return run


def test_failed_compile_falls_back_to_eager(llama_dir, monkeypatch):
    """A machine where inductor cannot build (no C++ compiler, say): a warning, then the eager step, same tokens."""

    eager = fastdebias.load(llama_dir, runtime="eager", progress=False)
    model = fastdebias.load(llama_dir, runtime="compile", progress=False)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*decoding eagerly"):
        got = tokens(fastdebias.generate(model, PROMPTS, max_new_tokens=NEW))
    assert got == tokens(fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW)) and model.runtime == "eager"


def test_compiled_forward_in_graphs_equals_eager(llama_dir, adapter_qv, emulated_graphs, monkeypatch):
    """``runtime="compile"`` on CUDA: the static step of ``"cuda_graph"`` (buckets, kept cache, captured graphs)
    whose captured forward runs through the compiled layer and head, static shapes. Here the real torch.compile on
    CPU, the capture emulated: tokens and interventions equal eager's across adapter mixes, rewinds and sampling;
    a failed compile warns and captures the eager forward instead."""
    eager = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="eager", progress=False)
    comp = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="compile", progress=False)
    assert not comp.runner.static  # on CPU "compile" is the dynamic-shape runtime
    comp.runner.on_cuda = True  # what a CUDA device sets
    assert comp.runner.static and comp.runtime == "compile"
    compiled, real_compile = [], torch.compile

    def spy(fn, **kw):
        compiled.append((fn.__name__, kw))
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()  # dynamo's caches are per process: count this test's graphs only
    counters.clear()
    for names in (["qv", None, "qv"], [None, "qv", "qv"]):
        want = tokens(fastdebias.generate(eager, PROMPTS, adapter=names, max_new_tokens=NEW))
        assert tokens(fastdebias.generate(comp, PROMPTS, adapter=names, max_new_tokens=NEW)) == want, names
    assert ("run_layers", {"dynamic": False}) in compiled and ("head", {"dynamic": False}) in compiled
    assert comp.runner.regions[2] == 1  # one layer a call under CUDA graphs
    assert comp.runner.cache.k[0].shape[0] == 4 and len(comp.runner.graphs) > 1  # padded batch, kv buckets
    # the layer, the head and the loop's step: one graph each, whatever the kv bucket and the adapter mix
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    free, *_ = _rewinds_equal_eager(eager, comp)
    assert comp.runtime == "compile"

    def inductor_error(fn, **kw):  # an error of inductor's own (not wrapped in BackendCompilerFailed), at a call
        def run(*a):
            raise RuntimeError("InductorError: LoweringException")

        return run

    for broken in (_failing_compile, inductor_error):
        monkeypatch.setattr(torch, "compile", broken)
        model = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="compile", progress=False)
        model.runner.on_cuda, model.runner.compile_step = True, False  # (the step's own fallback is tested above)
        with pytest.warns(RuntimeWarning, match="torch.compile of the forward failed.*capturing the eager forward"):
            got = tokens(fastdebias.generate(model, PROMPTS, max_new_tokens=NEW))
        assert got == free and model.runtime == "cuda_graph" and model.runner.static


@pytest.mark.skipif(not triton_cuda_backend(), reason="needs triton with its CUDA backend")
@pytest.mark.parametrize("dtype,names,batch", [("float32", ["qv"], 1), ("bfloat16", ["qv", "all"], 4)])
def test_cuda_compiled_regions_trace_in_one_graph(llama_dir, adapter_qv, adapter_all, tmp_path, dtype, names, batch):
    """On CUDA, ``runtime="compile"`` compiles the layer and the head with the Triton backend's LoRA launches inside.
    Dynamo must take each region in one graph, every launch a Triton kernel node: a graph break (a host read in an
    op, a device query it cannot trace) would split it. ``tests/trace_regions.py`` traces both with
    ``fullgraph=True`` as the runtime calls them, the kernels defined as GPU kernels, and stops before anything
    runs; it runs in a subprocess, since the kernels must be defined without ``TRITON_INTERPRET``."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    harness = Path(__file__).with_name("trace_regions.py")
    adapters = [str({"qv": adapter_qv, "all": adapter_all}[n]) for n in names]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "trace.json"
    cmd = [sys.executable, str(harness), str(llama_dir), *adapters, "--dtype", dtype, "--batch", str(batch)]
    proc = subprocess.run([*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    regions = json.loads(out.read_text())["regions"]
    assert all(r["one_graph"] for r in regions.values()), regions
    # q/k/v, o, gate/up and down: one launch each, plus a shrink each where two adapters share the batch (adapter
    # "all" targets every projection); the head's lm_head, no adapter on it
    per_projection = ["_lora_linear_kernel"] if len(names) == 1 else ["_lora_shrink_kernel", "_lora_linear_kernel"]
    assert regions["layer"]["kernels"] == per_projection * 4, regions["layer"]
    assert regions["head"]["kernels"] == ["_lora_linear_kernel"], regions["head"]


def test_device_limits_are_a_trace_constant(monkeypatch):
    """The Triton ops' meta rules read the SM count and shared memory at every launch; inside a compiled region
    dynamo must call that once at trace time and keep the result, not trace the device query (which it may not be
    able to: here one that parses JSON)."""
    import json
    import types

    from fastdebias import ops

    def query(device):
        return types.SimpleNamespace(**json.loads('{"multi_processor_count": 7, "shared_memory_per_block_optin": 99}'))

    monkeypatch.setattr(torch.cuda, "get_device_properties", query)
    monkeypatch.setattr(ops, "_DEVICE_LIMITS", {})
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * ops.device_limits(torch.device("cuda", 0))[0] + ops.device_limits(
        torch.device("cuda", 0))[1], fullgraph=True, backend="eager")  # fmt: skip
    assert f(torch.ones(2)).tolist() == [106.0, 106.0]
    assert ops.device_limits(torch.device("cpu")) == (132, 232448)  # off CUDA: an H100's, for the interpreter


@pytest.mark.parametrize("mkl_max_rows", [0, 3])
def test_torch_compile_step_equals_eager(llama_dir, adapter_qv, mkl_max_rows, monkeypatch):
    """The real torch.compile on CPU (a few seconds to compile the tiny model): one compiled graph serves every
    decoder layer, and new batch sizes, prompt and output lengths (kv and cache sizes) compile nothing new once
    batches of 1, 2 and more rows have been seen; no graph breaks; tokens and interventions equal eager. With the
    F.linear rule of Intel CPUs (``ops.CPU_MKL_MAX_ROWS`` 3: two rows compiled, 1-3 eagerly) and without it."""
    from fastdebias import ops

    monkeypatch.setattr(ops, "CPU_MKL_MAX_ROWS", mkl_max_rows)
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", progress=False)
    comp = fastdebias.load(llama_dir, adapter_qv, runtime="compile", progress=False)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()  # dynamo's caches are per process: count this test's graphs only
    counters.clear()
    names = ["qv", None]
    want = tokens(fastdebias.generate(eager, PROMPTS[:2], adapter=names, max_new_tokens=6))
    assert tokens(fastdebias.generate(comp, PROMPTS[:2], adapter=names, max_new_tokens=6)) == want
    # the layer (all 4 of them, one graph), the final norm + lm_head, the loop's step: not a graph per layer
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    # 3 rows: the projections take oneDNN instead of the multiply-reduce (a graph of the layer and of the head)
    names3 = ["qv", None, "qv"]
    want3 = tokens(fastdebias.generate(eager, PROMPTS, adapter=names3, max_new_tokens=4))
    assert tokens(fastdebias.generate(comp, PROMPTS, adapter=names3, max_new_tokens=4)) == want3
    assert not counters["graph_break"]  # every region compiles whole
    # the loop's step (token choice, lexicon, rewinds, log) compiled too: same tokens and interventions
    free = tokens(fastdebias.generate(eager, PROMPTS[:2], max_new_tokens=NEW))
    lex = Lexicon.from_token_sequences({tuple(r[3:6]): float("-inf") for r in free} | {(free[1][2],): -1.5})
    kw = dict(adapter=names, max_new_tokens=NEW, lexicon=lex, repetition_penalty=1.2)
    a, b = fastdebias.generate(eager, PROMPTS[:2], **kw), fastdebias.generate(comp, PROMPTS[:2], **kw)
    assert any(i.action == "rewound" for r in b for i in r.interventions)
    assert tokens(b) == tokens(a) and [r.interventions for r in b] == [r.interventions for r in a]
    assert comp.runner._step_fns.get(generate_module._advance) is not None  # compiled, not fallen back
    assert comp.runner.regions is not None and comp.runtime == "compile"
    # another prompt length, adapter mix, output length and batch size: nothing recompiles
    frames = counters["stats"]["unique_graphs"]
    other = [[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 13]]
    five = PROMPTS + [[1, 3], [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    for prompts, kw2 in ((other, kw), (other, dict(kw, adapter=[None, "qv"], max_new_tokens=NEW + 5)),
                         (five, dict(kw, adapter=["qv", None, "qv", "qv", None], max_new_tokens=NEW + 9))):  # fmt: skip
        got = fastdebias.generate(comp, prompts, **kw2)
        assert tokens(got) == tokens(fastdebias.generate(eager, prompts, **kw2))
    assert counters["stats"]["unique_graphs"] == frames, dict(counters["stats"])
    assert not counters["graph_break"]


def test_compiled_layer_group_equals_its_layers_one_by_one(llama_dir, tiny_tokenizer_dir, tmp_path):
    """The compiled CPU runtime runs consecutive layers in one call in fp32 (``model.LAYER_GROUPS``; the tiny model's
    two layers: one group). Fused across the layer boundary, the group gives the same hidden states and caches bit
    for bit as the same compiled function called on each layer alone. In bf16 it runs one layer a call: fused, a
    group would skip the rounding to bf16 between layers that eager makes."""
    from fastdebias.model import KVCache, layer_group

    bf16 = fastdebias.load(llama_dir, runtime="compile", dtype="bfloat16", progress=False)
    assert bf16.runner._dynamic_regions()[2] == 1
    model = fastdebias.load(llama_dir, runtime="compile", progress=False)
    dec, cfg = model.decoder, model.config
    layers_fn, _, g = model.runner._dynamic_regions()
    assert g == layer_group(cfg.num_hidden_layers) == 2
    gen = torch.Generator().manual_seed(0)
    b, kv_len = 2, 9
    h = torch.randn(b, 1, cfg.hidden_size, generator=gen) * 4
    slots = torch.tensor([[kv_len - 1], [kv_len - 3]])
    cos, sin = dec.rope_cos[slots], dec.rope_sin[slots]
    mask = torch.arange(kv_len).view(1, 1, 1, kv_len) <= slots.view(b, 1, 1, 1)
    caches = []
    for _ in range(2):
        cache = KVCache.allocate(cfg, b, kv_len, torch.float32, torch.device("cpu"))
        for i, t in enumerate(cache.k + cache.v):
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)))
        caches.append(cache)
    with torch.inference_mode():
        group = layers_fn(tuple(dec.layers), h, None, cos, sin, tuple(caches[0].k), tuple(caches[0].v), slots, mask)
        one = h
        for i, layer in enumerate(dec.layers):
            one = layers_fn((layer,), one, None, cos, sin, (caches[1].k[i],), (caches[1].v[i],), slots, mask)
    assert torch.equal(group, one) and not torch.equal(group, h)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))
    # six layers: two groups of three, each with its own layers' caches; the tokens of eager decoding
    from .conftest import make_llama

    six = make_llama(tmp_path / "six", layers=6, tokenizer_dir=tiny_tokenizer_dir)
    want = tokens(fastdebias.generate(fastdebias.load(six, progress=False), PROMPTS, max_new_tokens=NEW))
    comp = fastdebias.load(six, runtime="compile", progress=False)
    assert tokens(fastdebias.generate(comp, PROMPTS, max_new_tokens=NEW)) == want
    assert comp.runner.regions[2] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", [True, False])
def test_compiled_gemv_of_a_computed_input_equals_eager(dtype, stored, monkeypatch):
    """The compiled CPU GEMV of a computed input (an MLP's silu(gate) * up into down_proj, with an unmerged LoRA and
    a row without one) equals eager whether its input is stored first (``REALIZE_GEMV_INPUT``, the default) or
    left to inductor to inline; one graph either way."""
    from fastdebias import model as fm
    from fastdebias.model import LoRALinear

    monkeypatch.setattr(fm, "REALIZE_GEMV_INPUT", stored)
    g = torch.Generator().manual_seed(0)
    down = LoRALinear([torch.randn(48, 96, generator=g).to(dtype)], "torch")
    down.attach(0, (torch.randn(1, 4, 96, generator=g).to(dtype), torch.randn(1, 48, 4, generator=g).to(dtype),
                    torch.tensor([0.5])))  # fmt: skip
    gate, up = torch.randn(2, 96, generator=g).to(dtype), torch.randn(2, 96, generator=g).to(dtype)
    rows = torch.tensor([0, -1], dtype=torch.int32)

    def mlp_out(gate, up, rows):
        return down(torch.nn.functional.silu(gate) * up, rows)

    torch._dynamo.reset()
    got, want = torch.compile(mlp_out, fullgraph=True)(gate, up, rows), mlp_out(gate, up, rows)
    rtol, atol = TOLERANCES[dtype]
    if dtype == torch.bfloat16:  # compiled, silu(gate) * up stays fp32 where eager rounds each op: 2 bf16 ulps
        atol = 2**-7 * want.abs().max().item()  # of the output's scale
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "rows,dtype", [(1, torch.float32), (2, torch.float32), (3, torch.float32), (8, torch.float32),
                   (1, torch.bfloat16), (5, torch.bfloat16)]
)  # fmt: skip
@pytest.mark.parametrize("mkl_max_rows", [0, 3])
def test_cpu_projection_equals_f_linear_eager_and_compiled(rows, dtype, mkl_max_rows, monkeypatch):
    """The torch backend's CPU projection (``ops._base_linear``: compiled, a multiply-reduce up to
    ``CPU_GEMV_MAX_ROWS`` rows; fp32 otherwise oneDNN, an opaque op when compiled, except F.linear for up to
    ``CPU_MKL_MAX_ROWS`` rows: 3 on Intel CPUs, 0 elsewhere, both run here) equals F.linear, and compiles in one
    graph (a graph break in every projection once made the compiled SmolLM2 step 2.6x slower). Without oneDNN
    (another CPU architecture) it is F.linear itself."""
    from fastdebias import ops

    monkeypatch.setattr(ops, "CPU_MKL_MAX_ROWS", mkl_max_rows)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows + 3, 40, generator=gen)[3:].to(dtype)  # a view at an offset, as the model's rows are
    w = torch.randn(24, 40, generator=gen).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    packed = ops.pack_cpu_weight(w)  # oneDNN's blocked layout (x86-64 only; bf16 where oneDNN computes it natively)
    assert (packed is not None) == (ops._ONEDNN and (dtype == torch.float32 or ops._ONEDNN_BF16))
    packed_linear = lambda x, w: ops._base_linear(x, w, packed)  # noqa: E731
    for fn in (ops._base_linear, ops._factor_linear, packed_linear):  # LoRA factors: a multiply-reduce compiled
        torch.testing.assert_close(fn(x, w).float(), want, **tol)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)  # fullgraph: a graph break raises
        torch.testing.assert_close(compiled(x, w).float(), want, **tol)
    # which path: F.linear (MKL) itself, bit for bit, where the rule says so (eager up to CPU_MKL_MAX_ROWS rows of
    # fp32; compiled only from 2 rows up to CPU_GEMV_MAX_ROWS, one row staying a multiply-reduce), else oneDNN
    mkl = dtype == torch.float32 and rows <= mkl_max_rows
    assert ops.mkl_rows(x) == mkl and ops.reads_plain_weight(x) == mkl
    onednn_calls = []
    onednn = ops._onednn
    monkeypatch.setattr(ops, "_onednn", lambda *a: onednn_calls.append(1) or onednn(*a))
    f_linear = torch.nn.functional.linear(x, w)
    got = packed_linear(x, w)
    assert bool(onednn_calls) == (packed is not None and not mkl)
    if mkl:
        assert torch.equal(got, f_linear)
    if mkl and 1 < rows <= ops.CPU_GEMV_MAX_ROWS:
        torch._dynamo.reset()
        assert torch.equal(torch.compile(packed_linear, fullgraph=True, dynamic=False)(x, w), f_linear)
    monkeypatch.setattr(ops, "_ONEDNN", False)
    assert torch.equal(ops._base_linear(x, w), torch.nn.functional.linear(x, w))
    assert ops.pack_cpu_weight(w) is None


@pytest.mark.parametrize("b,heads,kv_heads,kv_len,dtype", [(1, 4, 2, 7, torch.float32), (3, 6, 2, 33, torch.float32),
                                                          (2, 4, 4, 5, torch.float32), (3, 6, 3, 20, torch.bfloat16)])
def test_decode_attention_equals_sdpa(b, heads, kv_heads, kv_len, dtype):
    """The compiled CPU runtime's one-query attention (``model.decode_attention``: multiply-reduces that inductor
    fuses into the layer) equals SDPA with the same boolean mask and GQA, eager and compiled (in one graph), with
    the query written to memory first (``realize_q``) or inlined."""
    from fastdebias.model import decode_attention

    gen = torch.Generator().manual_seed(kv_len)
    q = torch.randn(b, heads, 1, 16, generator=gen).to(dtype)
    k, v = (torch.randn(b, kv_heads, kv_len, 16, generator=gen).to(dtype) for _ in range(2))
    mask = torch.rand(b, 1, 1, kv_len, generator=gen) < 0.6  # rows see scattered slots: padding, other prompts
    mask[:, :, :, -1] = True  # (the model's mask always lets a query see its own slot)
    mask[0, :, :, :-1] = False  # a row that sees only itself
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=True
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    got = decode_attention(q, k, v, mask, 0.25)
    assert got.dtype == dtype and got.shape == (b, heads, 1, 16)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(got[0].float(), v[0, :, -1:].float().repeat_interleave(heads // kv_heads, 0), **tol)
    shared = mask[-1:].expand(b, 1, 1, kv_len)  # one mask for every row, broadcast (not contiguous)
    want_shared = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=shared, scale=0.25, enable_gqa=True
    )
    torch.testing.assert_close(decode_attention(q, k, v, shared, 0.25).float(), want_shared, **tol)
    torch.testing.assert_close(decode_attention(q, k, v, mask, 0.25, realize_q=False).float(), want, **tol)

    def rotated(q, k, v, mask, realize_q):  # q as the layer makes it: computed, not a stored input (what is realized)
        return decode_attention(q * 2.0 - 1.0, k, v, mask, 0.25, realize_q=realize_q)

    want_rot = torch.nn.functional.scaled_dot_product_attention(
        (q * 2.0 - 1.0).float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=True
    )
    for realize_q in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(decode_attention, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(q, k, v, mask, 0.25, realize_q=realize_q).float(), want, **tol)
        compiled = torch.compile(rotated, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(q, k, v, mask, realize_q).float(), want_rot, **tol)


def test_cpu_models_keep_packed_weights(llama_dir, adapter_qv, tiny_tokenizer_dir, tmp_path_factory, monkeypatch):
    """On CPU, fp32, x86-64: every projection has a oneDNN-packed weight (the step's projections read it). The
    eager runtime keeps it alone (no second copy), except a tied lm_head's (the embedding reads the plain one),
    and except where a few rows' fp32 projections call F.linear (``ops.CPU_MKL_MAX_ROWS``, Intel CPUs): both then,
    if they fit the compiled runtime's RAM rule (else the packed ones alone). Same tokens as the plain weights; in
    bf16 too, where oneDNN computes bf16 natively (and the F.linear rule does not apply)."""
    from pathlib import Path

    from fastdebias import ops
    from fastdebias.loader import AdapterWeights

    from .conftest import make_llama

    monkeypatch.setattr(ops, "CPU_MKL_MAX_ROWS", 3)  # (the rule on Intel CPUs, whatever this one is)
    fraction = ops.CPU_PACK_MAX_RAM_FRACTION
    both = fastdebias.load(llama_dir, adapter_qv, device="cpu", progress=False)
    assert both.runtime == "eager"
    assert all(m.weight is not None and (m.cpu_weight is not None) == ops._ONEDNN for m in both.decoder.projections())
    two_rows = tokens(fastdebias.generate(both, PROMPTS[:2], max_new_tokens=NEW))  # F.linear (MKL), then the packed
    eight_rows = tokens(fastdebias.generate(both, (PROMPTS * 4)[:8], max_new_tokens=NEW))  # oneDNN weights
    monkeypatch.setattr(ops, "CPU_PACK_MAX_RAM_FRACTION", 0.0)  # both would not fit: the packed weights alone
    packed_only = fastdebias.load(llama_dir, adapter_qv, device="cpu", progress=False)
    assert all((m.weight is None) == ops._ONEDNN for m in packed_only.decoder.projections())
    assert tokens(fastdebias.generate(packed_only, (PROMPTS * 4)[:8], max_new_tokens=NEW)) == eight_rows
    monkeypatch.setattr(ops, "CPU_PACK_MAX_RAM_FRACTION", fraction)
    monkeypatch.setattr(ops, "CPU_MKL_MAX_ROWS", 0)  # (the rule elsewhere)
    model = fastdebias.load(llama_dir, adapter_qv, device="cpu", progress=False)
    assert model.runtime == "eager"
    mods = model.decoder.projections()
    assert len(mods) == 4 * model.config.num_hidden_layers + 1
    assert all((m.cpu_weight is not None) == ops._ONEDNN for m in mods)
    assert all((m.weight is None) == ops._ONEDNN for m in mods)  # untied lm_head: nothing keeps a plain copy
    want = tokens(fastdebias.generate(model, PROMPTS, max_new_tokens=NEW))
    assert tokens(fastdebias.generate(model, PROMPTS[:2], max_new_tokens=NEW)) == two_rows
    assert tokens(fastdebias.generate(model, (PROMPTS * 4)[:8], max_new_tokens=NEW)) == eight_rows
    plain = fastdebias.load(llama_dir, adapter_qv, device="cpu", progress=False)
    for m in plain.decoder.projections():  # the plain layout back, exactly (to_dense), and no packed copy
        if m.weight is None:
            m.weight = m.cpu_weight.to_dense()
        m.cpu_weight = None
    assert tokens(fastdebias.generate(plain, PROMPTS, max_new_tokens=NEW)) == want
    # the compiled runtime's rule: copies beside the plain weights, only within the RAM fraction
    decoder = plain.decoder
    nbytes = sum(m.weight.numel() * 4 for m in decoder.projections())
    monkeypatch.setattr(ops, "CPU_PACK_MAX_RAM_FRACTION", 0.0)
    assert decoder.pack_cpu_weights(keep_plain=True) == 0 and all(m.cpu_weight is None for m in decoder.projections())
    monkeypatch.setattr(ops, "CPU_PACK_MAX_RAM_FRACTION", fraction)
    assert decoder.pack_cpu_weights(keep_plain=True) == (nbytes if ops._ONEDNN else 0)
    assert all(m.weight is not None for m in decoder.projections())
    # a tied lm_head keeps the plain weight the embedding reads, and a merge restores the plain layout
    tied = make_llama(tmp_path_factory.mktemp("tied") / "m", tie=True, tokenizer_dir=tiny_tokenizer_dir)
    tied_model = fastdebias.load(tied, device="cpu", progress=False)
    head = tied_model.decoder.lm_head
    assert head.weight is tied_model.decoder.embed_tokens and (head.cpu_weight is not None) == ops._ONEDNN
    # packed alone, nothing of the (live) model keeps the checkpoint's memory map, and its pages, resident; with the
    # plain weights kept, the map stays
    if ops._ONEDNN and os.path.exists("/proc/self/maps"):
        gc.collect()
        ckpt = str(tied / "model.safetensors")
        assert ckpt not in Path("/proc/self/maps").read_text()
        kept = fastdebias.load(tied, device="cpu", runtime="compile", progress=False)
        assert ckpt in Path("/proc/self/maps").read_text() and kept.decoder.lm_head.weight is not None
    if ops._ONEDNN:
        q = tied_model.decoder.layers[0].self_attn.qkv_proj
        assert q.weight is None
        dense = q.cpu_weight.to_dense()
        tied_model.decoder.merge_adapter(AdapterWeights("none", Path("."), {}))
        assert torch.equal(q.weight, dense) and q.cpu_weight is None
    bf16 = fastdebias.load(llama_dir, adapter_qv, device="cpu", dtype="bfloat16", progress=False)
    assert all((m.cpu_weight is not None) == ops._ONEDNN_BF16 for m in bf16.decoder.projections())
    assert all((m.weight is None) == ops._ONEDNN_BF16 for m in bf16.decoder.projections())
    want = tokens(fastdebias.generate(bf16, PROMPTS, max_new_tokens=NEW))
    for m in bf16.decoder.projections():
        if m.weight is None:
            m.weight = m.cpu_weight.to_dense()
            assert m.weight.dtype == torch.bfloat16
        m.cpu_weight = None
    assert tokens(fastdebias.generate(bf16, PROMPTS, max_new_tokens=NEW)) == want


class _SyncSpy(TorchDispatchMode):
    """Records where the decode loop reads a tensor's value on the host (what would wait for the device, and what
    a CUDA graph capture refuses): the ops behind ``.item()`` / ``bool()`` / ``int()``, data-dependent shapes, and
    ``.tolist()`` / ``.numpy()`` (these do not dispatch, so they are wrapped)."""

    OPS = ("_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "masked_select", "_unique2",
           "unique_consecutive", "unique_dim")  # fmt: skip

    def __init__(self, monkeypatch):
        super().__init__()
        self.sites = collections.Counter()
        lines, first = inspect.getsourcelines(generate_module._generate_batch)
        body = "".join(lines)
        loop = first + body[: body.index("    while True:")].count("\n")
        end = first + body[: body.index("_retire_rows(s, live, finished, None)")].count("\n")
        self.loop = (loop, end)
        for name in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def read(t, *a, **kw):
            self._record(name)
            return orig(t, *a, **kw)

        return read

    def _record(self, name):
        for f in reversed(traceback.extract_stack()):  # the decode loop's own line that led here
            if f.filename == generate_module.__file__ and (
                f.name == "_advance" or (f.name == "_generate_batch" and self.loop[0] < f.lineno < self.loop[1])
            ):
                self.sites[(name, f.line)] += 1
                return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self._record(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "backend,runtime_name",
    [("torch", "eager"), ("triton", "eager"), ("torch", "static"), ("triton", "static"), ("torch", "compile")],
)
def test_decode_loop_reads_nothing_back_but_the_completion_check(llama_dir, adapter_qv, backend, runtime_name,
                                                                 monkeypatch, request):  # fmt: skip
    """Per token, the host reads back only the done flags (every N steps on CUDA): the logits step, the lexicon's
    bookkeeping and rewinds, the repetition penalty and sampling stay on the device (capturable, no stall).
    "static" on CPU: the graph path, emulated; "compile": the compiled runtime's regions and step with
    torch.compile as the identity (a compiled function runs these same ops)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, device=dev, progress=False,
                            runtime="eager" if dev == "cpu" else "auto")  # fmt: skip
    if runtime_name == "static" and dev == "cpu":
        request.getfixturevalue("emulated_graphs")
        as_cuda_graph(model)
    elif runtime_name == "compile":
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
        model.runner.runtime, model.runner.compile_step = "compile", True
    free = tokens(fastdebias.generate(model, PROMPTS, max_new_tokens=6))
    lex = Lexicon.from_token_sequences({tuple(r[2:4]): float("-inf") for r in free} | {(free[0][1],): -2.0})
    cases = (
        dict(adapter=["qv", None, "qv"]),
        dict(lexicon=lex, repetition_penalty=1.3),  # backtracking: rewinds happen
        dict(lexicon=lex, lexicon_mode="hf", temperature=0.8, top_k=5, top_p=0.9, seed=3),
        dict(lexicon=lex, temperature=0.7, seed=3),
        dict(lexicon=lex, repetition_penalty=1.3, batch_size=2),  # the third prompt joins
    )
    for kw in cases:
        spy = _SyncSpy(monkeypatch)
        with spy:
            res = fastdebias.generate(model, PROMPTS, max_new_tokens=8, eos_token_id=[], **kw)
        assert all(len(r.token_ids) == 8 for r in res)
        if "repetition_penalty" in kw:
            assert any(i.action == "rewound" for r in res for i in r.interventions)
        # the completion check: of the flags' "all done" under CUDA graphs once no prompt waits, of the flags
        # themselves where prompts wait for places or finished rows may leave the batch; and per join or departure
        # (not per token), the outputs of the rows that finished: a few reads each time (here rows that rewound end
        # later than the others)
        retiring = model.runner.min_rows_after_retiring() is not None
        checks = {"flags = done.tolist()"} | (
            set() if retiring else {"if last or (check and not pending and min_rows is None and bool(done.all())):"})
        events = {"keep = _retire_rows(s, live, finished, min(min_rows, max_rows), flags)",
                  "_harvest(s, live, finished, places)"}  # fmt: skip
        lines = {line for _, line in spy.sites}
        assert lines - events <= checks and lines & checks, (kw, spy.sites)
        per_event = sum(n for (_, line), n in spy.sites.items() if line in events)
        assert per_event <= 7 * len(PROMPTS), (kw, spy.sites)  # each prompt leaves once


def test_compiled_step_with_triton_choice_under_graphs(llama_dir, adapter_qv, emulated_graphs):
    """backend="triton" (interpreted on CPU), the loop's step compiled by a real torch.compile and replayed as
    graphs (emulated): the Triton logits step is an opaque island inside the compiled step
    (``generate._triton_choice``); tokens and interventions equal eager, and a new seed (a host value the island
    reads) compiles nothing new."""
    kw = dict(backend="triton", device="cuda" if torch.cuda.is_available() else "cpu", progress=False)
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw)
    model = as_cuda_graph(fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw), compile_step=True)
    free = tokens(fastdebias.generate(eager, PROMPTS[:2], max_new_tokens=6))
    lex = Lexicon.from_token_sequences({tuple(r[2:4]): float("-inf") for r in free} | {(free[1][2],): -1.5})
    kw = dict(adapter=["qv", None], max_new_tokens=NEW, lexicon=lex, temperature=0.8, seed=3)
    a, b = fastdebias.generate(eager, PROMPTS[:2], **kw), fastdebias.generate(model, PROMPTS[:2], **kw)
    assert tokens(b) == tokens(a) and [r.interventions for r in b] == [r.interventions for r in a]
    assert model.runner._step_fns.get(generate_module._advance) is not None  # compiled, no fallback
    assert sum(g.replays for g in emulated_graphs) > 0
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    kw["seed"] = 4
    want = tokens(fastdebias.generate(eager, PROMPTS[:2], **kw))
    assert tokens(fastdebias.generate(model, PROMPTS[:2], **kw)) == want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_runtime_errors(llama_dir):
    with pytest.raises(FastDebiasError, match="runtime='bogus'"):
        fastdebias.load(llama_dir, runtime="bogus", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(FastDebiasError, match="runtime='cuda_graph' needs a CUDA device"):
            fastdebias.load(llama_dir, runtime="cuda_graph", progress=False)
        with pytest.raises(FastDebiasError, match="runtime='compile' with backend='triton' needs a CUDA device"):
            fastdebias.load(llama_dir, runtime="compile", backend="triton", progress=False)
    assert fastdebias.load(llama_dir, device="cpu", progress=False).runtime == "eager"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def step_captures(monkeypatch):
    """Counts the real CUDA-graph captures of the loop's step that succeeded (a failed one raises, then the step
    runs eagerly: only a warning would tell); the forward's captures go through the same method, not counted."""
    n = [0]
    real = runtime.DecodeRunner._capture_graph

    def counting(self, fn, args):
        out = real(self, fn, args)
        n[0] += fn != self._forward
        return out

    monkeypatch.setattr(runtime.DecodeRunner, "_capture_graph", counting)
    return n


@pytest.mark.gpu
# a capture or compile that falls back (fastdebias's own RuntimeWarning) is a failure here; torch's warnings are not
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("graphed", ["cuda_graph", "compile"])  # graphs of the eager forward, of the compiled one
def test_cuda_graph_equals_eager(llama_dir, adapter_qv, adapter_all, backend, graphed, step_captures):
    adapters = {"qv": adapter_qv, "all": adapter_all}
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(llama_dir, adapters, runtime="eager", **kw)
    graph = fastdebias.load(llama_dir, adapters, runtime=graphed, **kw)
    assert graph.runner.static
    for names in (["qv", None, "all"], ["all", "qv", "qv"], ["qv", None, "all"]):
        want = tokens(fastdebias.generate(eager, PROMPTS, adapter=names, max_new_tokens=NEW))
        n_graphs = len(graph.runner.graphs)
        assert tokens(fastdebias.generate(graph, PROMPTS, adapter=names, max_new_tokens=NEW)) == want, names
    # the last call's mix reused the graphs captured for the first: no re-capture when the adapter mix changes
    assert len(graph.runner.graphs) == n_graphs > 0
    assert step_captures[0] > 0 and graph.runtime == graphed
    # sampling with a seed: the Triton step's noise is keyed by the device step counter, so graphs replay it
    if backend == "triton":
        a = fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW, temperature=0.8, top_k=20, seed=7)
        b = fastdebias.generate(graph, PROMPTS, max_new_tokens=NEW, temperature=0.8, top_k=20, seed=7)
        assert tokens(a) == tokens(b)


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("graphed", ["cuda_graph", "compile"])
def test_cuda_graph_backtracking_equals_eager(llama_dir, backend, graphed, step_captures):
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(llama_dir, runtime="eager", **kw)
    graph = fastdebias.load(llama_dir, runtime=graphed, **kw)
    free = tokens(fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW))
    lex = Lexicon.from_token_sequences({tuple(r[3:6]): float("-inf") for r in free} | {(free[1][2],): -1.5})
    kw = dict(max_new_tokens=NEW, lexicon=lex, repetition_penalty=1.2)
    a, b = fastdebias.generate(eager, PROMPTS, **kw), fastdebias.generate(graph, PROMPTS, **kw)
    assert any(i.action == "rewound" for r in b for i in r.interventions)
    assert tokens(b) == tokens(a) and [r.interventions for r in b] == [r.interventions for r in a]
    assert step_captures[0] > 0 and graph.runtime == graphed


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_continuous_batching_equals_one_batch(llama_dir, adapter_qv, backend, step_captures):
    """Two rows at a time under real CUDA graphs (the host checks every 8 steps), the next prompts taking finished
    rows' places in place: every result as from all prompts in one eager batch, mixed adapters and a lexicon."""
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="eager", **kw)
    graph = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="cuda_graph", **kw)
    job = PROMPTS + [[1, 60, 61, 62, 63], [1, 90], [1, 120, 121], [1, 5, 6, 7, 8, 9, 10]]
    names = ["qv", None] * (len(job) // 2) + ["qv"] * (len(job) % 2)
    n = 3 * NEW
    free = tokens(fastdebias.generate(eager, job, adapter=names, max_new_tokens=n, eos_token_id=[]))
    eos = sorted({row[min(3 + 5 * i, n - 1)] for i, row in enumerate(free[::2])})  # rows end at different steps
    lex = Lexicon.from_token_sequences({tuple(free[1][2:4]): float("-inf"), (free[2][1],): -1.0})
    kw = dict(adapter=names, max_new_tokens=n, eos_token_id=eos, lexicon=lex)
    want = fastdebias.generate(eager, job, **kw)
    got = fastdebias.generate(graph, job, batch_size=2, **kw)
    assert len({len(r.token_ids) for r in want}) >= 3
    assert [(r.token_ids, r.finish_reason, r.interventions) for r in got] == [
        (r.token_ids, r.finish_reason, r.interventions) for r in want]  # fmt: skip
    assert step_captures[0] > 0 and graph.runtime == "cuda_graph"


def test_available_memory_reads_the_host_or_sets_no_limit(monkeypatch):
    cpu = torch.device("cpu")
    assert 0 < runtime.available_memory(cpu) < 1 << 50  # /proc/meminfo here
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert 0 < runtime.available_memory(cpu) < 1 << 50  # free physical pages
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))  # e.g. macOS
    assert runtime.available_memory(cpu) == 1 << 62  # unknown: no limit (one batch, as before)
