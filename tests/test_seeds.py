"""generate(seed=[...]): one seed per prompt (vLLM's per-request seed). A prompt's draws depend on its seed only:
not on its place in the list, the other prompts, the batch size or the runtime; with n > 1, sample j's on the seed
and j."""

from __future__ import annotations

import pytest

import fastdebias
from fastdebias.errors import GenerationError

from .conftest import as_cuda_graph

A, B, C = [1, 17, 42, 99, 5], [1, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 77]
KW = dict(max_new_tokens=10, eos_token_id=[], temperature=1.3, top_k=40)


def tokens(outs):
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_prompts_draws_depend_on_its_seed_only(llama_dir, adapter_qv, backend):
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    abc = tokens(fastdebias.generate(model, [A, B, C], seed=[1, 2, 3], **KW))
    assert tokens(fastdebias.generate(model, [C, A], seed=[3, 1], **KW)) == [abc[2], abc[0]]
    assert tokens(fastdebias.generate(model, [B], seed=[2], **KW)) == [abc[1]]
    assert tokens(fastdebias.generate(model, [A, B, C], seed=(1, 2, 3), batch_size=1, **KW)) == abc
    # one prompt twice with two seeds: two different samples; with one seed twice: the same sample
    two = tokens(fastdebias.generate(model, [A, A], seed=[1, 4], **KW))
    assert two[0] == abc[0] and two[1] != two[0]
    assert tokens(fastdebias.generate(model, [A, A], seed=[1, 1], **KW)) == [abc[0], abc[0]]
    # a list is not the call-wide seed: prompt 0 under seed=[7] is not prompt 0 under seed=7
    assert tokens(fastdebias.generate(model, [A], seed=[7], **KW)) != tokens(fastdebias.generate(model, [A], seed=7,
                                                                                                  **KW))  # fmt: skip
    # numpy integers and seeds past 2**62 (taken modulo 2**62, as a single seed is)
    import numpy as np

    assert tokens(fastdebias.generate(model, [A], seed=[np.int64(1)], **KW)) == [abc[0]]
    assert tokens(fastdebias.generate(model, [A], seed=[1 + 2**62], **KW)) == [abc[0]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_n_samples_under_per_prompt_seeds(llama_dir, adapter_qv, backend):
    """With n > 1, prompt i's sample j depends on (seeds[i], j): the same alone or beside other prompts, under
    continuous batching, and the n samples differ."""
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    both = tokens(fastdebias.generate(model, [A, C], seed=[5, 6], n=3, **KW))
    assert tokens(fastdebias.generate(model, [C], seed=[6], n=3, **KW)) == both[3:]
    assert tokens(fastdebias.generate(model, [C, A], seed=[6, 5], n=3, batch_size=2, **KW)) == both[3:] + both[:3]
    assert len({tuple(x) for x in both[:3]}) == 3


@pytest.mark.parametrize("runtime, backend", [("cuda_graph", "torch"), ("cuda_graph", "triton"), ("compile", "torch")])
def test_other_runtimes_draw_the_same(llama_dir, adapter_qv, runtime, backend, emulated_graphs):  # noqa: ARG001
    """Emulated CUDA graphs (the step captured: the row ids are device tensors written in place when prompts join)
    and the compile runtime (torch backend: on CPU the Triton one runs in the interpreter, which torch.compile
    cannot trace) give the eager runtime's samples."""
    eager = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    if runtime == "cuda_graph":
        other = as_cuda_graph(fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False),
                              compile_step=backend == "torch")  # fmt: skip
    else:
        other = fastdebias.load(llama_dir, adapter_qv, backend=backend, runtime="compile", progress=False)
    for bs in (None, 2):
        want = tokens(fastdebias.generate(eager, [A, B, C], seed=[9, 8, 7], batch_size=bs, **KW))
        assert tokens(fastdebias.generate(other, [A, B, C], seed=[9, 8, 7], batch_size=bs, **KW)) == want


def test_debias_passes_seeds_through(embedded_dir):
    model = fastdebias.load(embedded_dir, progress=False)
    texts = ["Old people cannot learn new technology.", "Girls are bad at math."]
    kw = dict(max_new_tokens=12, temperature=1.0, lexicon=None)
    both = fastdebias.debias(model, texts, seed=[3, 4], **kw)
    alone = fastdebias.debias(model, texts[1:], seed=[4], **kw)
    assert alone[0].token_ids == both[1].token_ids


@pytest.mark.parametrize("bad, match", [
    ([1, 2], r"seed: got a list of 2 seeds for 3 prompts; give one per prompt"),
    ([1, 2, 2.5], r"seed: a list of seeds must hold integers, got 2.5"),
    ([1, True, 3], r"seed: a list of seeds must hold integers, got True"),
    (1.5, r"seed: expected an integer, a list of integers \(one per prompt\) or None, got 1.5"),
    ("7", r"seed: expected an integer, a list of integers"),
])  # fmt: skip
def test_bad_seeds(llama_dir, bad, match):
    model = fastdebias.load(llama_dir, progress=False)
    with pytest.raises(GenerationError, match=match):
        fastdebias.generate(model, [A, B, C], seed=bad, **KW)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_per_prompt_seeds_under_cuda_graphs(llama_dir, adapter_qv, backend):
    """Real CUDA graphs with joins (batch_size 2): the eager runtime's samples, and a prompt's the same alone."""
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw)
    graph = fastdebias.load(llama_dir, adapter_qv, runtime="cuda_graph", **kw)
    for bs in (None, 2):
        want = tokens(fastdebias.generate(eager, [A, B, C], seed=[9, 8, 7], n=2, batch_size=bs, **KW))
        assert tokens(fastdebias.generate(graph, [A, B, C], seed=[9, 8, 7], n=2, batch_size=bs, **KW)) == want
    assert tokens(fastdebias.generate(graph, [B], seed=[8], n=2, **KW)) == want[2:4]
    assert graph.runner.graphs


def test_seed_count_wording(llama_dir):
    model = fastdebias.load(llama_dir, progress=False)
    with pytest.raises(GenerationError, match=r"got a list of 0 seeds for 1 prompt; give one per prompt"):
        fastdebias.generate(model, [A], seed=[], **KW)
