"""generate(no_repeat_ngram_size=n): transformers' rule (a token that would complete an n-gram already in the row's
prompt + output is banned), computed on the device from each row's own sequence, so it holds through left padding,
rewinds, continuous batching, sampling and every runtime, on both backends."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import fastdebias
from fastdebias.errors import GenerationError
from fastdebias.lexicon import Lexicon

from .conftest import as_cuda_graph, make_llama

generate_module = importlib.import_module("fastdebias.generate")

# a small vocabulary: greedy decoding falls into loops within a few dozen tokens, so every n-gram size fires
V = 24
PROMPTS = [[1, 17, 4, 9, 5], [1, 20, 3], [1, 8, 9, 10, 11, 12], [1, 7]]
NEW = 30


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("ngram") / "m", vocab_size=V, seed=3)


def repeated_ngrams(seq: list[int], n: int) -> int:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]  # noqa: E203
    return len(grams) - len(set(grams))


def hf_greedy(path, prompt, n, new=NEW, **kw):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, no_repeat_ngram_size=n,
                      pad_token_id=0, eos_token_id=None, **kw)  # fmt: skip
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_equals_transformers(small_dir, backend):
    """Greedy, a padded batch of prompts, n = 1..4: token-for-token transformers' ``no_repeat_ngram_size`` (one prompt
    at a time there: its rule reads the padding as tokens), and the bans fire (the free output repeats n-grams)."""
    model = fastdebias.load(small_dir, backend=backend, progress=False)
    free = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[])
    for n in (1, 2, 3, 4):
        new = 12 if n == 1 else NEW  # (n = 1 bans every token seen: the vocabulary would run out)
        outs = fastdebias.generate(model, PROMPTS, max_new_tokens=new, eos_token_id=[], no_repeat_ngram_size=n)
        assert sum(repeated_ngrams(p + f.token_ids[:new], n) for p, f in zip(PROMPTS, free)) > 0
        for p, o in zip(PROMPTS, outs):
            assert o.token_ids == hf_greedy(small_dir, p, n, new)
            assert repeated_ngrams(p + o.token_ids, n) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_with_the_penalties_and_an_hf_lexicon_equals_transformers(small_dir, backend):
    """With the repetition penalty and a lexicon in "hf" mode, against transformers with the same rules
    (``fastdebias.hf.BiasLogitsProcessor`` for the lexicon)."""
    from fastdebias.hf import BiasLogitsProcessor

    model = fastdebias.load(small_dir, backend=backend, progress=False)
    free = [o.token_ids for o in fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[])]
    lex = Lexicon.from_token_sequences({tuple(free[0][3:5]): float("-inf"), (free[2][1],): -2.0,
                                        tuple(free[1][4:7]): float("-inf")})  # fmt: skip
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], no_repeat_ngram_size=3,
                               repetition_penalty=1.3, lexicon=lex, lexicon_mode="hf")  # fmt: skip
    for p, o in zip(PROMPTS, outs):
        ref = hf_greedy(small_dir, p, 3, repetition_penalty=1.3,
                        logits_processor=[BiasLogitsProcessor(lex, eos_token_id=())])  # fmt: skip
        assert o.token_ids == ref
        assert repeated_ngrams(p + o.token_ids, 3) == 0


def _free_of_repeats(outs, prompts, n):
    for p, o in zip(prompts, outs):
        assert repeated_ngrams(p + o.token_ids, n) == 0


def test_through_rewinds_joins_and_sampling(small_dir):
    """Backtracking rewinds (the n-grams of discarded tokens are forgotten), two rows for four prompts (prompts join
    with their own prompts' n-grams) and seeded sampling: each result is the one decoded alone, and has no repeated
    n-gram."""
    model = fastdebias.load(small_dir, progress=False)
    kw = dict(max_new_tokens=NEW, eos_token_id=[], no_repeat_ngram_size=2)
    free = [o.token_ids for o in fastdebias.generate(model, PROMPTS, **kw)]
    lex = Lexicon.from_token_sequences({tuple(r[4:6]): float("-inf") for r in free})
    for extra in ({}, dict(temperature=1.2, seed=4)):
        batched = fastdebias.generate(model, PROMPTS, lexicon=lex, batch_size=2, **kw, **extra)
        alone = [fastdebias.generate(model, [p], lexicon=lex, **kw, **extra)[0] for p in PROMPTS]
        if extra:  # (seeded draws are keyed by the prompt's index: alone, each prompt is prompt 0)
            alone = [fastdebias.generate(model, PROMPTS[: i + 1], lexicon=lex, **kw, **extra)[i]
                     for i in range(len(PROMPTS))]  # fmt: skip
        assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
        _free_of_repeats(batched, PROMPTS, 2)
        assert extra or any(i.action == "rewound" for o in batched for i in o.interventions)


def test_every_token_banned_ends_the_row(small_dir):
    """n = 1 bans each token once seen: with a vocabulary of 24 the row runs out of tokens and ends "banned"."""
    model = fastdebias.load(small_dir, progress=False)
    out = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=40, eos_token_id=[], no_repeat_ngram_size=1)[0]
    assert out.finish_reason == "banned"
    assert len(set(PROMPTS[0] + out.token_ids)) == len(PROMPTS[0] + out.token_ids) == V


@pytest.mark.parametrize("runtime", ["cuda_graph", "compile"])
def test_runtimes_equal_eager(small_dir, runtime, emulated_graphs):
    """The step compiled (and, emulated, captured): as eager, greedy and sampled, with rewinds and joins."""
    eager = fastdebias.load(small_dir, runtime="eager", progress=False)
    if runtime == "cuda_graph":
        model = as_cuda_graph(fastdebias.load(small_dir, runtime="eager", progress=False), compile_step=True)
    else:
        model = fastdebias.load(small_dir, runtime="compile", progress=False)
    kw = dict(max_new_tokens=NEW, eos_token_id=[], no_repeat_ngram_size=3, batch_size=2)
    free = [o.token_ids for o in fastdebias.generate(eager, PROMPTS, **kw)]
    lex = Lexicon.from_token_sequences({tuple(r[4:6]): float("-inf") for r in free})
    for extra in ({}, dict(temperature=0.9, seed=2)):
        want = fastdebias.generate(eager, PROMPTS, lexicon=lex, **kw, **extra)
        got = fastdebias.generate(model, PROMPTS, lexicon=lex, **kw, **extra)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.interventions for o in got] == [o.interventions for o in want]
    if runtime == "cuda_graph":
        assert sum(g.replays for g in emulated_graphs) > 0
    assert model.runner._step_fns.get(generate_module._advance) is not None  # compiled, not fallen back


def test_logprobs_stay_the_models(small_dir):
    """The bans change which token is chosen, not the log-probabilities reported (the model's raw logits')."""
    model = fastdebias.load(small_dir, progress=False)
    kw = dict(max_new_tokens=NEW, eos_token_id=[], logprobs=True)
    plain = fastdebias.generate(model, PROMPTS[:1], **kw)[0]
    banned = fastdebias.generate(model, PROMPTS[:1], no_repeat_ngram_size=2, **kw)[0]
    k = next(j for j, (a, b) in enumerate(zip(plain.token_ids, banned.token_ids)) if a != b)
    assert banned.logprobs[:k] == plain.logprobs[:k]
    assert banned.logprobs[k] < plain.logprobs[k]  # the model's first choice was banned there


def test_n_longer_than_any_sequence_bans_nothing(small_dir):
    """n above prompt + max_new_tokens: no row can hold an n-gram, so nothing is banned (it raised in unfold)."""
    model = fastdebias.load(small_dir, progress=False)
    kw = dict(max_new_tokens=2, eos_token_id=[])
    want = fastdebias.generate(model, [[1]], **kw)[0].token_ids
    assert fastdebias.generate(model, [[1]], no_repeat_ngram_size=4, **kw)[0].token_ids == want


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_bad_values_are_named(small_dir, bad):
    model = fastdebias.load(small_dir, progress=False)
    with pytest.raises(GenerationError, match=r"no_repeat_ngram_size must be an integer >= 0 \(0 = off\), got"):
        fastdebias.generate(model, PROMPTS, max_new_tokens=2, no_repeat_ngram_size=bad)


def test_cli_flag(llama_dir, capsys):
    from fastdebias.cli import main

    args = ["generate", "--model", str(llama_dir), "--max-new-tokens", "12", "--quiet", "--json",
            "--no-repeat-ngram-size", "1", "hello world"]  # fmt: skip
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert len(row["token_ids"]) == 12 and len(set(row["token_ids"])) == 12


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_under_cuda_graphs(small_dir, backend):
    """Real CUDA graphs, fp32: as eager, and transformers' greedy tokens."""
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(small_dir, runtime="eager", **kw)
    graph = fastdebias.load(small_dir, runtime="cuda_graph", **kw)
    gen = dict(max_new_tokens=NEW, eos_token_id=[], no_repeat_ngram_size=3, batch_size=2)
    for extra in ({}, dict(temperature=0.9, seed=2)):
        want = fastdebias.generate(eager, PROMPTS, **gen, **extra)
        got = fastdebias.generate(graph, PROMPTS, **gen, **extra)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        _free_of_repeats(got, PROMPTS, 3)
    for p, o in zip(PROMPTS, fastdebias.generate(graph, PROMPTS, **gen)):
        assert o.token_ids == hf_greedy(small_dir, p, 3)
