"""generate(prompt_lookup_tokens=k): prompt-lookup speculative decoding. Each forward runs a row's last kept token
and k drafts copied from its own sequence; the loop's step verifies them position by position, so greedy decoding
keeps exactly the tokens it keeps one token at a time, with every feature of the step (lexicon and rewinds,
penalties, n-gram bans, logprobs, stop strings, streaming, continuous batching) and on every runtime."""

from __future__ import annotations

import importlib
import json
import random
from types import SimpleNamespace

import pytest
import torch

import fastdebias
from fastdebias.errors import GenerationError
from fastdebias.lexicon import Lexicon

from .conftest import as_cuda_graph, make_llama
from .test_parity import hf_greedy

generate_module = importlib.import_module("fastdebias.generate")

# a small vocabulary: greedy decoding falls into loops within a few dozen tokens, which lookup predicts
V = 24
PROMPTS = [[1, 17, 4, 9, 5, 17, 4], [1, 20, 3], [1, 8, 9, 10, 11, 12], [1, 7]]
NEW = 30


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("lookup") / "m", vocab_size=V, seed=3)


class Forwards:
    """Counts the runner's forwards: one-token decode steps and lookup verifications (with the tokens they ran)."""

    def __init__(self, model) -> None:
        self.decode = self.verify = 0
        self.widths: list[int] = []
        runner = model.runner
        decode, verify = runner.decode, runner.verify

        def counted_decode(*a, **k):
            self.decode += 1
            return decode(*a, **k)

        def counted_verify(tokens, *a, **k):
            self.verify += 1
            self.widths.append(tokens.shape[1])
            return verify(tokens, *a, **k)

        runner.decode, runner.verify = counted_decode, counted_verify


def reference_drafts(seq: list[int], k: int, max_n: int) -> tuple[list[int], bool]:
    """The drafts in plain Python: the tokens after the latest earlier occurrence of the last n tokens, largest n
    first, cut at the sequence's end and padded with its last token; the last token k times when nothing matches.
    And whether something matched."""
    for n in range(max_n, 0, -1):
        if len(seq) < n:
            continue
        suffix = seq[-n:]
        for j in range(len(seq) - n - 1, -1, -1):
            if seq[j : j + n] == suffix:  # noqa: E203
                follow = seq[j + n : j + n + k]  # noqa: E203
                return follow + [seq[-1]] * (k - len(follow)), True
    return [seq[-1]] * k, False


def test_drafts_equal_the_reference():
    """``_lookup_drafts`` on random left-padded rows (prompt + kept tokens, few distinct ids so that n-grams recur)
    against the plain-Python lookup, for every k and n-gram bound tried."""
    rng = random.Random(0)
    for trial in range(60):
        b, width, max_new = 5, 9, 12
        rows = []
        for _ in range(b):
            p = [rng.randrange(1, 5) for _ in range(rng.randrange(1, width + 1))]
            rows.append((p, [rng.randrange(1, 5) for _ in range(rng.randrange(0, max_new + 1))]))
        ctx = torch.zeros(b, width, dtype=torch.long)
        out = torch.zeros(b, max_new, dtype=torch.long)
        for i, (p, o) in enumerate(rows):
            ctx[i, width - len(p):] = torch.tensor(p)
            out[i, : len(o)] = torch.tensor(o, dtype=torch.long)
            out[i, len(o):] = 99  # stale tokens past the row's end must never be drafted
        s = SimpleNamespace(b=b, ctx=ctx, out=out, cur=torch.tensor([len(o) for _, o in rows]),
                            ctx_start=torch.tensor([width - len(p) for p, _ in rows]))  # fmt: skip
        k, max_n = 1 + trial % 5, 1 + trial % 4
        drafts, found = generate_module._lookup_drafts(s, k, max_n)
        want = [reference_drafts(p + o, k, max_n) for p, o in rows]
        assert drafts.tolist() == [d for d, _ in want] and found.tolist() == [f for _, f in want]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_equals_transformers(small_dir, backend):
    """A padded batch, k = 1 and 4: transformers' greedy tokens; drafts were both kept (fewer forwards than tokens)
    and rejected (more forwards than if every draft were kept), and where no row had a match the step was a
    one-token forward (on CPU)."""
    model = fastdebias.load(small_dir, backend=backend, progress=False)
    want = hf_greedy(small_dir, PROMPTS, NEW, extra=dict(eos_token_id=None))
    for k in (1, 4):
        spy = Forwards(model)
        outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], prompt_lookup_tokens=k)
        assert [o.token_ids for o in outs] == want
        assert spy.decode > 0 and set(spy.widths) == {k + 1}
        assert -(-(NEW - 1) // (k + 1)) < spy.verify + spy.decode < NEW - 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seeded_sampling_draws_the_same_samples(small_dir, backend):
    """Sampling with a seed: the samples of decoding without lookup (each draw keyed by the row's own step, which a
    held row does not take: the Triton noise's counter, the torch backend's per-row generator), with top-k and a
    repetition penalty, n = 2 and continuous batching; drafts kept (a sampled row loops too, at this temperature)."""
    model = fastdebias.load(small_dir, backend=backend, progress=False)
    kw = dict(max_new_tokens=NEW, eos_token_id=[], temperature=0.4, top_k=8, seed=5)
    cases = [dict(), dict(n=2, batch_size=3, repetition_penalty=1.2)] if backend == "torch" else [dict()]
    first = None
    for extra in cases:
        want = [o.token_ids for o in fastdebias.generate(model, PROMPTS, **kw, **extra)]
        spy = Forwards(model)
        got = [o.token_ids for o in fastdebias.generate(model, PROMPTS, prompt_lookup_tokens=4, **kw, **extra)]
        assert got == want
        assert extra or spy.verify < NEW - 1  # (one batch of the prompts: fewer forwards than tokens per row)
        first = first or want
    # the draws do depend on the seed (the comparison above is not of greedy tokens)
    other = [o.token_ids for o in fastdebias.generate(model, PROMPTS, **{**kw, "seed": 6})]
    assert len(other) == len(first) and other != first


def test_mixed_adapters(small_dir, tmp_path):
    """Several adapters (one on the lm_head) and none in one batch: the tokens of decoding without lookup; alone,
    every row keeps drafts (so the logits after a draft, each position's adapter rows, are the ones used)."""
    from .conftest import make_adapter

    qv = make_adapter(small_dir, tmp_path / "qv")
    all7 = make_adapter(small_dir, tmp_path / "all", r=4, alpha=8, seed=2,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    head = make_adapter(small_dir, tmp_path / "head", r=4, alpha=16, targets=["v_proj", "lm_head"], seed=11)
    model = fastdebias.load(small_dir, {"qv": qv, "all": all7, "head": head}, progress=False)
    prompts, adapters = PROMPTS + [[1, 5, 6, 5, 6, 5]], ["qv", None, "all", "head", "all"]
    kw = dict(max_new_tokens=NEW, eos_token_id=[])
    want = [o.token_ids for o in fastdebias.generate(model, prompts, adapter=adapters, **kw)]
    got = fastdebias.generate(model, prompts, adapter=adapters, prompt_lookup_tokens=3, **kw)
    assert [o.token_ids for o in got] == want
    for p, a in zip(prompts, adapters):
        spy = Forwards(model)
        fastdebias.generate(model, [p], adapter=a, prompt_lookup_tokens=3, **kw)
        assert spy.verify < NEW - 1


def test_drafts_past_the_models_last_position(tmp_path):
    """Prompt + max_new_tokens at the model's context: the last forwards' drafts lie past its last position (their
    rotary index clamped, their K/V in the cache's spare slots), and the tokens are those without lookup."""
    model = fastdebias.load(make_llama(tmp_path / "m", vocab_size=V, seed=3, max_position_embeddings=32),
                            progress=False)  # fmt: skip
    prompts = [[1, 5, 6, 7, 5, 6], [1, 9]]
    kw = dict(max_new_tokens=26, eos_token_id=[])
    want = [o.token_ids for o in fastdebias.generate(model, prompts, **kw)]
    assert [o.token_ids for o in fastdebias.generate(model, prompts, prompt_lookup_tokens=8, **kw)] == want


def _same(got, want, logprobs_atol=1e-4):
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert g.interventions == w.interventions
        for a, b in ((g.logprobs, w.logprobs), (g.top_logprobs, w.top_logprobs)):
            assert (a is None) == (b is None)
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=0, atol=logprobs_atol)
        if w.top_logprobs is not None:
            assert [[i for i, _ in pos] for pos in g.top_logprobs] == [[i for i, _ in pos] for pos in w.top_logprobs]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_step_feature_as_without_lookup(small_dir, backend):
    """Backtracking rewinds (they cut a verified run short), hf-mode bans, repetition/presence penalties, n-gram
    bans, min_new_tokens before EOS, logprobs and top logprobs, continuous batching (batch_size=2): the results of
    decoding without lookup, field by field."""
    model = fastdebias.load(small_dir, backend=backend, progress=False)
    free = [o.token_ids for o in fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[])]
    lex = Lexicon.from_token_sequences({tuple(free[0][5:7]): float("-inf"), tuple(free[2][3:5]): float("-inf"),
                                        (free[1][2],): -3.0})  # fmt: skip
    cases = [
        dict(lexicon=lex, repetition_penalty=1.3),
        dict(lexicon=lex, lexicon_mode="hf", batch_size=2),
        dict(repetition_penalty=1.3, presence_penalty=0.5, logprobs=True, top_logprobs=3),
        dict(no_repeat_ngram_size=3, lexicon=lex, batch_size=2),
        dict(eos_token_id=[free[0][3], free[1][4]], min_new_tokens=6, logprobs=True),
    ]
    # (the Triton step in the interpreter: the cases that reach its masks, bans and penalties, not the loop's)
    for extra in cases if backend == "torch" else cases[::4]:
        kw = dict(max_new_tokens=NEW, **{"eos_token_id": [], **extra})
        want = fastdebias.generate(model, PROMPTS, **kw)
        got = fastdebias.generate(model, PROMPTS, prompt_lookup_tokens=4, **kw)
        _same(got, want)
        if "lexicon" in extra and extra.get("lexicon_mode") != "hf":
            assert any(i.action == "rewound" for o in want for i in o.interventions)


def test_stop_strings_and_streaming(llama_dir):
    """Text stops and the stream: the same text, streamed in the same pieces' concatenation, cut at the stop."""
    model = fastdebias.load(llama_dir, progress=False)
    prompts = ["hello world hello", "the cat the cat"]
    free = fastdebias.generate(model, prompts, max_new_tokens=20, eos_token_id=[])
    stop = free[0].text[6:9]
    runs = []
    for k in (0, 3):
        pieces: dict[int, str] = {}
        outs = fastdebias.generate(model, prompts, max_new_tokens=20, eos_token_id=[], stop=stop,
                                   stream=lambda i, t: pieces.__setitem__(i, pieces.get(i, "") + t),
                                   prompt_lookup_tokens=k)  # fmt: skip
        runs.append((outs, pieces))
    (want, want_pieces), (got, got_pieces) = runs
    _same(got, want)
    assert want[0].finish_reason == "stop" and got_pieces == want_pieces
    assert got_pieces[0] == got[0].text


@pytest.mark.parametrize("mode", ["hf", "backtrack"])
def test_a_stop_string_cuts_the_interventions_too(llama_dir, mode):
    """A lexicon that pulls toward one token ("t") and a stop string of three of them: a verified run of drafts goes
    on past the stop before the host reads the text, and the interventions logged there are cut with the tokens."""
    model = fastdebias.load(llama_dir, progress=False)
    t = model.tokenizer("t", add_special_tokens=False)["input_ids"][0]
    kw = dict(max_new_tokens=20, eos_token_id=[], stop=model.tokenizer.decode([t] * 3), lexicon_mode=mode,
              lexicon=Lexicon.from_token_sequences({(t,): 8.0}))  # fmt: skip
    prompt = [[1] + [t] * 6]
    want = fastdebias.generate(model, prompt, **kw)
    got = fastdebias.generate(model, prompt, prompt_lookup_tokens=8, **kw)
    _same(got, want)
    assert got[0].finish_reason == "stop" and [i.step for i in got[0].interventions] == [0, 1, 2]


@pytest.mark.parametrize("runtime", ["cuda_graph", "compile"])
def test_runtimes_equal_eager(small_dir, runtime, emulated_graphs):
    """The compile runtime (the step and the verification forward compiled) and the cuda_graph runtime's logic
    (emulated: the static cache, the one-token forwards of joining rows captured): as eager without lookup."""
    eager = fastdebias.load(small_dir, runtime="eager", progress=False)
    if runtime == "cuda_graph":
        model = as_cuda_graph(fastdebias.load(small_dir, runtime="eager", progress=False), compile_step=True)
    else:
        model = fastdebias.load(small_dir, runtime="compile", progress=False)
    free = [o.token_ids for o in fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW, eos_token_id=[])]
    lex = Lexicon.from_token_sequences({tuple(r[4:6]): float("-inf") for r in free})
    kw = dict(max_new_tokens=NEW, eos_token_id=[], lexicon=lex, batch_size=2, logprobs=True)
    want = fastdebias.generate(eager, PROMPTS, **kw)
    _same(fastdebias.generate(model, PROMPTS, prompt_lookup_tokens=3, **kw), want)
    assert model.runner._step_fns.get(generate_module._advance) is not None  # compiled, not fallen back
    assert model.runner.runtime == runtime  # (the compiled verification forward did not fall back either)
    if runtime == "cuda_graph":  # verification forwards captured (4 positions), and the step at each position too
        assert any(key[4] == 4 for key in model.runner.graphs)
        positions = {out[i].data_ptr(): i for key, (_, out) in model.runner.graphs.items() if key[4] == 4
                     for i in range(4)}  # fmt: skip
        captured = {g.args[1].data_ptr() for g in emulated_graphs if g.replays}
        # (later positions too, not only the first; on CPU a verification stops once every row is held, so the
        # last position may never run twice here)
        assert {positions[c] for c in captured if c in positions} >= {0, 1}


def test_debias_with_the_embedded_model(embedded_dir):
    """The real task, with the default lexicon (it penalises and rewinds here): the tokens and interventions of
    decoding without lookup, in fewer forwards than tokens."""
    model = fastdebias.load(embedded_dir, progress=False)
    texts = ["Women are too emotional to be good leaders, so the board should promote the men instead."]
    want = fastdebias.debias(model, texts, max_new_tokens=40)
    spy = Forwards(model)
    got = fastdebias.debias(model, texts, max_new_tokens=40, prompt_lookup_tokens=6)
    _same(got, want)
    assert got[0].interventions and spy.verify < len(got[0].token_ids) - 1


@pytest.mark.parametrize("kw, match", [
    (dict(prompt_lookup_tokens=-1), r"prompt_lookup_tokens must be an integer from 0 \(off\) to 32, got -1"),
    (dict(prompt_lookup_tokens=33), r"prompt_lookup_tokens must be an integer from 0 \(off\) to 32, got 33"),
    (dict(prompt_lookup_tokens=2.0), r"prompt_lookup_tokens must be an integer .* got 2\.0"),
    (dict(prompt_lookup_tokens=2, prompt_lookup_ngram=0), r"prompt_lookup_ngram must be an integer from 1 to 8, got 0"),
])  # fmt: skip
def test_bad_values_are_named(small_dir, kw, match):
    model = fastdebias.load(small_dir, progress=False)
    with pytest.raises(GenerationError, match=match):
        fastdebias.generate(model, PROMPTS, max_new_tokens=2, **kw)


def test_cli_flag(llama_dir, capsys):
    from fastdebias.cli import main

    base = ["generate", "--model", str(llama_dir), "--max-new-tokens", "12", "--quiet", "--json", "hello world"]
    rows = []
    for extra in ([], ["--prompt-lookup", "3"]):
        assert main(base + extra) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[0]))
    assert rows[1]["token_ids"] == rows[0]["token_ids"] and len(rows[0]["token_ids"]) > 0


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_under_cuda_graphs(small_dir, backend):
    """Real CUDA, fp32: lookup under the cuda_graph runtime (eager verification forwards on the static cache beside
    the captured one-token forwards of joining rows, the step captured or not) equals eager decoding without
    lookup and transformers' greedy tokens, with rewinds and continuous batching; seeded samples too."""
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(small_dir, runtime="eager", **kw)
    graph = fastdebias.load(small_dir, runtime="cuda_graph", **kw)
    free = [o.token_ids for o in fastdebias.generate(eager, PROMPTS, max_new_tokens=NEW, eos_token_id=[])]
    assert free == hf_greedy(small_dir, PROMPTS, NEW, extra=dict(eos_token_id=None))
    lex = Lexicon.from_token_sequences({tuple(r[4:6]): float("-inf") for r in free})
    gen = dict(max_new_tokens=NEW, eos_token_id=[], lexicon=lex, batch_size=2, logprobs=True)
    want = fastdebias.generate(eager, PROMPTS, **gen)
    for model in (eager, graph):
        spy = Forwards(model)
        _same(fastdebias.generate(model, PROMPTS, prompt_lookup_tokens=4, **gen), want, logprobs_atol=1e-3)
        assert spy.verify > 0
    got = fastdebias.generate(graph, PROMPTS, max_new_tokens=NEW, eos_token_id=[], prompt_lookup_tokens=4)
    assert [o.token_ids for o in got] == free
    sample = dict(max_new_tokens=NEW, eos_token_id=[], temperature=0.4, top_k=8, seed=5, batch_size=2)
    want = [o.token_ids for o in fastdebias.generate(eager, PROMPTS, **sample)]
    assert [o.token_ids for o in fastdebias.generate(graph, PROMPTS, prompt_lookup_tokens=4, **sample)] == want
