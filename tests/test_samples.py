"""generate(n=N): N sampled sequences per prompt (vLLM's ``n``, transformers' ``num_return_sequences``), each decoded
as a prompt of its own, keyed as the prompts repeated N times would be; a prompt given more than once is prefilled
once and its cache rows copied."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import fastdebias
from fastdebias.errors import GenerationError
from fastdebias.lexicon import Lexicon

from .test_logprobs import check, hf_model  # noqa: F401 (a fixture)

generate_module = importlib.import_module("fastdebias.generate")

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 77]]
KW = dict(max_new_tokens=10, eos_token_id=[], temperature=1.3, top_k=40, seed=11)


def repeated(prompts, n):
    return [p for p in prompts for _ in range(n)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_n_samples_are_the_prompts_repeated(llama_dir, adapter_qv, backend):
    """Prompt i's samples are results i*n..i*n+n-1, token-for-token those of the prompts repeated n times (the same
    keys), different from each other, and independent of the batch size (continuous batching: duplicated prompts
    join the running batch together)."""
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    outs = fastdebias.generate(model, PROMPTS, n=3, **KW)
    assert len(outs) == 9
    want = fastdebias.generate(model, repeated(PROMPTS, 3), **KW)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    for i in range(3):
        assert len({tuple(o.token_ids) for o in outs[3 * i : 3 * i + 3]}) == 3  # noqa: E203
    small = fastdebias.generate(model, PROMPTS, n=3, batch_size=2, **KW)
    assert [o.token_ids for o in small] == [o.token_ids for o in outs]
    # n=1 is the plain call
    one = fastdebias.generate(model, PROMPTS, n=1, **KW)
    assert [o.token_ids for o in one] == [o.token_ids for o in fastdebias.generate(model, PROMPTS, **KW)]


def test_duplicate_prompts_are_prefilled_once(llama_dir, adapter_qv, hf_model, monkeypatch):  # noqa: F811
    """The prefill runs the distinct (prompt, adapter) rows only, and every sample's cache is still right: its
    log-probabilities are transformers + PEFT's, mixed adapters, a lexicon with rewinds and continuous batching
    included (each joining group prefilled once too)."""
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    model.runner.prefix = None  # (the prompts share no prefix of 8 tokens: the prefill computes their whole rows)
    rows = []
    prefill = model.runner.prefill

    def spy(tokens, *args, **kw):
        rows.append(tokens.shape[0])
        return prefill(tokens, *args, **kw)

    monkeypatch.setattr(model.runner, "prefill", spy)
    free = fastdebias.generate(model, PROMPTS, **KW)
    lex = Lexicon.from_token_sequences({tuple(o.token_ids[2:4]): float("-inf") for o in free})
    rows.clear()
    outs = fastdebias.generate(model, PROMPTS, n=4, lexicon=lex, logprobs=True, **KW)
    assert rows == [3]
    check(outs, hf_model, repeated(PROMPTS, 4))
    rows.clear()
    joined = fastdebias.generate(model, PROMPTS, n=4, lexicon=lex, logprobs=True, batch_size=3, **KW)
    assert sum(rows) < 12 and max(rows) <= 3
    assert [o.token_ids for o in joined] == [o.token_ids for o in outs]
    check(joined, hf_model, repeated(PROMPTS, 4))
    # off with the prefix sharing (the bench's setting): every row prefilled
    model.runner.share_prefix = False
    rows.clear()
    full = fastdebias.generate(model, PROMPTS, n=4, lexicon=lex, **KW)
    assert rows == [12] and [o.token_ids for o in full] == [o.token_ids for o in outs]
    model.runner.share_prefix = True
    # the same prompt under two adapters is two distinct rows
    rows.clear()
    a = model.adapter_names[0]
    mixed = fastdebias.generate(model, [PROMPTS[0]] * 4, adapter=[a, None, a, None], logprobs=True, **KW)
    assert rows == [2]
    ref = fastdebias.generate(model, [PROMPTS[0], PROMPTS[0]], adapter=[a, None], **KW)
    assert mixed[0].token_ids == ref[0].token_ids and mixed[1].token_ids == ref[1].token_ids


def test_n_with_stream_and_debias(embedded_dir):
    """``stream`` is called with the result's index (prompt i's sample j: i*n + j); ``debias`` passes ``n`` through."""
    model = fastdebias.load(embedded_dir, progress=False)
    got: dict[int, str] = {}
    outs = fastdebias.generate(model, ["The sky is", "Cats are"], n=2, max_new_tokens=6, temperature=1.0, seed=3,
                               stream=lambda i, t: got.__setitem__(i, got.get(i, "") + t))  # fmt: skip
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[i] for i in range(4)] == [o.text for o in outs]
    texts = ["Old people cannot learn new technology."]
    rewrites = fastdebias.debias(model, texts, n=2, max_new_tokens=12, temperature=0.8, seed=1)
    assert len(rewrites) == 2 and all(r.text for r in rewrites)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_n_must_be_a_positive_integer(llama_dir, bad):
    model = fastdebias.load(llama_dir, progress=False)
    with pytest.raises(GenerationError, match=r"n \(sequences per prompt\) must be an integer >= 1, got"):
        fastdebias.generate(model, PROMPTS, n=bad, **KW)


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_n_above_one_needs_sampling(llama_dir, temperature):
    model = fastdebias.load(llama_dir, progress=False)
    with pytest.raises(GenerationError, match=r"n=2 sequences per prompt need sampling: set temperature >= 1e-5"):
        fastdebias.generate(model, PROMPTS, n=2, max_new_tokens=4, temperature=temperature)


def test_cli_n_and_top_logprobs(llama_dir, capsys):
    from fastdebias.cli import main

    args = ["generate", "--model", str(llama_dir), "--max-new-tokens", "4", "--quiet", "--json", "--n", "3",
            "--temperature", "1.0", "--seed", "2", "--top-logprobs", "2", "hello world", "good day"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["input"], r["sample"]) for r in rows] == [("hello world", j) for j in range(3)] + [
        ("good day", j) for j in range(3)]  # fmt: skip
    for r in rows:
        assert len(r["top_logprobs"]) == len(r["logprobs"]) == len(r["token_ids"]) > 0
        for pos in r["top_logprobs"]:
            assert len(pos) == 2 and all(isinstance(t, str) and isinstance(i, int) and lp <= 0 for t, i, lp in pos)
    assert main(args[:-2] + ["--temperature", "0", "hello"]) == 2
    assert "need sampling" in capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["cuda_graph", "compile"])
def test_n_under_the_other_runtimes(llama_dir, adapter_qv, runtime, emulated_graphs):  # noqa: ARG001
    """Emulated CUDA graphs (the runner's static cache: duplicated prompts' rows copied into it) and the compile
    runtime give the eager runtime's samples, the whole batch at once and with prompts joining it."""
    from .conftest import as_cuda_graph

    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", progress=False)
    if runtime == "cuda_graph":
        model = as_cuda_graph(fastdebias.load(llama_dir, adapter_qv, runtime="eager", progress=False))
    else:
        model = fastdebias.load(llama_dir, adapter_qv, runtime="compile", progress=False)
    for bs in (None, 4):
        want = fastdebias.generate(eager, PROMPTS, n=3, batch_size=bs, **KW)
        got = fastdebias.generate(model, PROMPTS, n=3, batch_size=bs, **KW)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert model.runner.graphs if runtime == "cuda_graph" else model.runner.regions is not None


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_n_under_cuda_graphs(llama_dir, adapter_qv, backend):
    """Real CUDA graphs (the duplicated prompts' rows copied into the runner's static cache; joins with the host
    reading the flags every 8 steps), fp32: the eager runtime's samples and top log-probabilities."""
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw)
    graph = fastdebias.load(llama_dir, adapter_qv, runtime="cuda_graph", **kw)
    for bs in (None, 4):
        want = fastdebias.generate(eager, PROMPTS, n=3, batch_size=bs, top_logprobs=3, **KW)
        got = fastdebias.generate(graph, PROMPTS, n=3, batch_size=bs, top_logprobs=3, **KW)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for x, y in zip(want, got):
            torch.testing.assert_close(torch.tensor([[lp for _, lp in p] for p in y.top_logprobs]),
                                       torch.tensor([[lp for _, lp in p] for p in x.top_logprobs]), rtol=0, atol=1e-4)
    assert graph.runner.graphs
