"""Prompt log-probabilities: ``generate(prompt_logprobs=True)`` and ``score``. Each prompt token's log-probability
given the tokens before it is checked against transformers (+PEFT) scoring the prompt in one forward pass, through
padding, chunked prefill, the blocked lm_head, mixed adapters (an lm_head adapter too), duplicate prompts, shared
prefixes, continuous batching and every runtime."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastdebias
from fastdebias import model as model_module
from fastdebias import runtime
from fastdebias.errors import GenerationError

from .conftest import as_cuda_graph, make_adapter
from .test_logprobs import check_top
from .test_prefix import prefilled_tokens

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [1, 77]]
ATOL = 2e-4


def hf_with(base_dir, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return (PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base).eval()


@pytest.fixture(scope="module")
def hf_qv(llama_dir, adapter_qv):
    return hf_with(llama_dir, adapter_qv)


def hf_dist(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: log p(· | prompt[:j+1]) under ``hf``, in one forward."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def check(prompt: list[int], lps, tops, hf, atol: float = ATOL) -> None:
    """``lps`` (None first, then each token's) and ``tops`` (None first, or None throughout) against ``hf``."""
    assert len(lps) == len(prompt) and lps[0] is None
    dist = hf_dist(hf, prompt)
    want = dist.gather(1, torch.tensor(prompt[1:]).view(-1, 1))[:, 0]
    torch.testing.assert_close(torch.tensor(lps[1:], dtype=torch.float32), want, rtol=0, atol=atol)
    if tops is not None:
        assert len(tops) == len(prompt) and tops[0] is None

        class Scored:  # the shape check_top reads: a result whose "tokens" are the prompt's scored ones
            token_ids, logprobs, top_logprobs = prompt[1:], lps[1:], tops[1:]

        check_top(Scored, dist, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prompt_logprobs_equal_transformers(llama_dir, adapter_qv, hf_qv, backend):
    """Prompts of different lengths in one left-padded batch, the adapter unmerged; the top 5 too. The generated
    tokens and their logprobs are those of the same call without prompt_logprobs."""
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=6, prompt_logprobs=True, top_logprobs=5)
    plain = fastdebias.generate(model, PROMPTS, max_new_tokens=6, top_logprobs=5)
    for p, o, q in zip(PROMPTS, outs, plain):
        check(p, o.prompt_logprobs, o.prompt_top_logprobs, hf_qv)
        assert o.token_ids == q.token_ids and o.logprobs == pytest.approx(q.logprobs, abs=1e-4)
        assert q.prompt_logprobs is None and q.prompt_top_logprobs is None
    only = fastdebias.generate(model, PROMPTS, max_new_tokens=2, prompt_logprobs=True)  # no top_logprobs
    assert all(o.prompt_top_logprobs is None and o.logprobs is None for o in only)
    for a, b in zip(only, outs):
        assert a.prompt_logprobs[0] is None and a.prompt_logprobs[1:] == pytest.approx(b.prompt_logprobs[1:], abs=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_score_equals_transformers_and_generate(llama_dir, adapter_qv, hf_qv, backend):
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    got = fastdebias.score(model, PROMPTS, top_logprobs=3)
    for p, s in zip(PROMPTS, got):
        assert s.token_ids == p
        check(p, s.logprobs, s.top_logprobs, hf_qv)
        assert s.total == pytest.approx(sum(s.logprobs[1:]))
        assert s.perplexity == pytest.approx(math.exp(-s.total / (len(p) - 1)))
    # one text at a time (no padding) and in batches of 2 (sorted by length) give the same
    for bs in (1, 2):
        again = fastdebias.score(model, PROMPTS, top_logprobs=3, batch_size=bs, progress=False)
        for a, b in zip(got, again):
            assert b.logprobs[1:] == pytest.approx(a.logprobs[1:], abs=1e-4)
            assert [[i for i, _ in pos] for pos in b.top_logprobs[1:]] == [[i for i, _ in pos] for pos in
                                                                          a.top_logprobs[1:]]  # fmt: skip
    one = fastdebias.score(model, [[5]])[0]  # one token: nothing to score
    assert one.logprobs == [None] and one.total == 0.0 and math.isnan(one.perplexity)
    huge = fastdebias.ScoreResult(token_ids=[1, 2], logprobs=[None, -800.0])  # exp(800) is past the largest float
    assert huge.perplexity == math.inf and huge.total == -800.0


def test_chunked_prefill_and_blocked_head(llama_dir, adapter_qv, hf_qv, monkeypatch):
    """Prefill chunks of 3 tokens (a prompt token's target in the next chunk) and lm_head blocks of one position:
    the same log-probabilities, and the same generated tokens."""
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    want = fastdebias.generate(model, PROMPTS, max_new_tokens=6, prompt_logprobs=True, top_logprobs=2)
    monkeypatch.setattr(runtime, "PREFILL_CHUNK", 3)
    blocks = []
    real = model_module.LlamaDecoder.token_logprobs

    def small_blocks(self, h, rows, targets, top=0, budget=0):
        blocks.append(h.shape[1])
        return real(self, h, rows, targets, top, budget=1)  # one position per block

    monkeypatch.setattr(model_module.LlamaDecoder, "token_logprobs", small_blocks)
    got = fastdebias.generate(model, PROMPTS, max_new_tokens=6, prompt_logprobs=True, top_logprobs=2)
    assert blocks == [3, 3, 3, 1]  # 11 padded slots: chunks 0-2, 3-5, 6-8 score all, 9-10 scores slot 9 only
    for p, a, b in zip(PROMPTS, want, got):
        check(p, b.prompt_logprobs, b.prompt_top_logprobs, hf_qv)
        assert b.prompt_logprobs[1:] == pytest.approx(a.prompt_logprobs[1:], abs=1e-4)
        assert b.token_ids == a.token_ids


def test_mixed_adapters_and_lm_head_adapter(llama_dir, adapter_qv, adapter_all, tmp_path):
    """One batch: the q/v adapter, none, all seven projections, an adapter on the lm_head; each prompt against
    transformers with its own adapter. Both entry points, one batch of each."""
    head = make_adapter(llama_dir, tmp_path / "head", r=4, alpha=16, targets=["v_proj", "lm_head"], seed=11)
    model = fastdebias.load(llama_dir, {"qv": adapter_qv, "all": adapter_all, "head": head}, progress=False)
    which = ["qv", None, "all", "head"]
    refs = {"qv": hf_with(llama_dir, adapter_qv), None: hf_with(llama_dir), "all": hf_with(llama_dir, adapter_all),
            "head": hf_with(llama_dir, head)}  # fmt: skip
    outs = fastdebias.generate(model, PROMPTS, adapter=which, max_new_tokens=3, prompt_logprobs=True)
    scores = fastdebias.score(model, PROMPTS, adapter=which)
    for p, a, o, s in zip(PROMPTS, which, outs, scores):
        check(p, o.prompt_logprobs, None, refs[a])
        check(p, s.logprobs, None, refs[a])
    # the adapters matter here: the same prompt under two of them scores differently
    assert scores[0].logprobs[1:] != pytest.approx(fastdebias.score(model, PROMPTS[:1], adapter=None)[0].logprobs[1:],
                                                   abs=1e-3)  # fmt: skip


def test_shared_prefix_and_duplicates(llama_dir, adapter_qv, hf_qv):
    """Prompts sharing a long prefix (which generate otherwise prefills once and copies in, and keeps for the next
    call) and n samples of one prompt (prefilled once): every prompt token is still scored, each sample carries its
    prompt's log-probabilities, and the samples are those of the same call without prompt_logprobs."""
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    system = list(range(20, 40))
    prompts = [system + [5, 6], system + [7]]
    fastdebias.generate(model, [system + [9, 9, 9]], max_new_tokens=2)  # a one-prompt call: its prefix kept
    assert model.runner.prefix is not None
    outs = fastdebias.generate(model, prompts, max_new_tokens=4, prompt_logprobs=True)
    for p, o in zip(prompts, outs):
        check(p, o.prompt_logprobs, None, hf_qv)
    kw = dict(max_new_tokens=5, temperature=1.0, seed=3, n=3)
    samples = fastdebias.generate(model, prompts, prompt_logprobs=True, **kw)
    plain = fastdebias.generate(model, prompts, **kw)
    assert [o.token_ids for o in samples] == [o.token_ids for o in plain]
    for k, o in enumerate(samples):
        check(prompts[k // 3], o.prompt_logprobs, None, hf_qv)
    assert samples[0].prompt_logprobs is not samples[1].prompt_logprobs  # each result its own list


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_continuous_batching(llama_dir, adapter_qv, hf_qv, backend):
    """Two rows for four prompts: the later ones join the running batch (a prefill of their own)."""
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=5, batch_size=2, prompt_logprobs=True, top_logprobs=2)
    for p, o in zip(PROMPTS, outs):
        check(p, o.prompt_logprobs, o.prompt_top_logprobs, hf_qv)
    assert [o.token_ids for o in outs] == [o.token_ids for o in
                                           fastdebias.generate(model, PROMPTS, max_new_tokens=5)]  # fmt: skip


def test_graph_and_compile_runtimes(llama_dir, adapter_qv, hf_qv, emulated_graphs):
    """The cuda_graph runtime's logic (emulated on CPU) and the compile runtime: prefill runs eagerly in both, so
    the prompt log-probabilities are eager's, beside their captured or compiled decode."""
    eager = fastdebias.load(llama_dir, adapter_qv, progress=False)
    want = fastdebias.generate(eager, PROMPTS, max_new_tokens=5, prompt_logprobs=True)
    graphs = as_cuda_graph(fastdebias.load(llama_dir, adapter_qv, progress=False), compile_step=True)
    comp = fastdebias.load(llama_dir, adapter_qv, runtime="compile", progress=False)
    for m in (graphs, comp):
        got = fastdebias.generate(m, PROMPTS, max_new_tokens=5, prompt_logprobs=True)
        for p, a, b in zip(PROMPTS, want, got):
            check(p, b.prompt_logprobs, None, hf_qv)
            assert b.token_ids == a.token_ids


def test_text_prompts_and_debias(llama_dir, adapter_qv, hf_qv):
    """Text is scored as generate encodes it (BOS included); debias passes prompt_logprobs through."""
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    text = "the cat sat on the mat"
    ids = model.tokenizer(text)["input_ids"]
    s = fastdebias.score(model, text)[0]
    assert s.token_ids == ids
    check(ids, s.logprobs, None, hf_qv)
    out = fastdebias.debias(model, [text], max_new_tokens=2, prompt_logprobs=True, lexicon=None)[0]
    assert len(out.prompt_logprobs) == out.prompt_tokens and out.prompt_logprobs[0] is None


def test_embedded_model_equals_transformers(embedded_dir):
    """The real SmolLM2 (49152 tokens, tied embeddings): a sentence pair, each scored as transformers scores it;
    the pair's comparison (which phrasing the model finds more likely) is the same."""
    from transformers import AutoModelForCausalLM

    m = fastdebias.load(embedded_dir, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32).eval()
    pair = ["The nurse said she would be late.", "The nurse said he would be late."]
    got = fastdebias.score(m, pair, top_logprobs=2)
    for text, s in zip(pair, got):
        check(m.tokenizer(text)["input_ids"], s.logprobs, s.top_logprobs, hf, atol=1e-3)
    ref = [sum(x for x in fastdebias.score(m, t, batch_size=1)[0].logprobs[1:]) for t in pair]
    assert (got[0].total > got[1].total) == (ref[0] > ref[1])


def test_bad_arguments(llama_dir, adapter_qv):
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    with pytest.raises(GenerationError, match="prompt_logprobs must be True or False"):
        fastdebias.generate(model, PROMPTS, max_new_tokens=2, prompt_logprobs=2)
    with pytest.raises(GenerationError, match="top_logprobs must be an integer from 0"):
        fastdebias.score(model, PROMPTS, top_logprobs=21)
    with pytest.raises(GenerationError, match=r"texts\[1\] is empty"):
        fastdebias.score(model, [[1, 2], []])
    with pytest.raises(GenerationError, match="texts: expected a non-empty"):
        fastdebias.score(model, [])
    with pytest.raises(GenerationError, match="batch_size must be an integer >= 1"):
        fastdebias.score(model, PROMPTS, batch_size=0)
    with pytest.raises(GenerationError, match=r"texts\[0\] has 600 tokens, more than the model's context"):
        fastdebias.score(model, [[1] * 600])
    with pytest.raises(GenerationError, match="adapter=.nope. is not a loaded adapter"):
        fastdebias.score(model, PROMPTS, adapter="nope")
    with pytest.raises(GenerationError, match="a list of 1 names for 4 texts; give one per text"):
        fastdebias.score(model, PROMPTS, adapter=["qv"])


def test_cli_score_and_prompt_logprobs(llama_dir, adapter_qv, hf_qv, capsys):
    from fastdebias.cli import main

    assert main(["score", "--model", str(llama_dir), "--adapter", str(adapter_qv), "--json", "-q",
                 "--top-logprobs", "2", "the cat sat", "a dog"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["the cat sat", "a dog"]
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    for r in rows:
        s = fastdebias.score(model, r["input"], top_logprobs=2)[0]
        assert [t[1] for t in r["tokens"]] == s.token_ids
        assert r["tokens"][0][2] is None
        assert [t[2] for t in r["tokens"][1:]] == pytest.approx(s.logprobs[1:], abs=1e-4)
        assert r["logprob"] == pytest.approx(s.total, abs=1e-4) and r["perplexity"] == pytest.approx(s.perplexity)
        assert r["top_logprobs"][0] is None and [i for _, i, _ in r["top_logprobs"][1]] == [
            i for i, _ in s.top_logprobs[1]]  # fmt: skip
    assert main(["score", "--model", str(llama_dir), "--use-adapter", "none", "-q", "the cat sat"]) == 0
    out = capsys.readouterr().out
    assert "the cat sat" in out and "perplexity" in out
    assert len(model.tokenizer("a", add_special_tokens=False)["input_ids"]) == 1
    assert main(["score", "--model", str(llama_dir), "-q", "--context", "the cat", "a"]) == 0
    assert "over 1 token, perplexity" in capsys.readouterr().out
    assert main(["generate", "--model", str(llama_dir), "--adapter", str(adapter_qv), "--json", "-q",
                 "--max-new-tokens", "2", "--prompt-logprobs", "--top-logprobs", "3", "the cat sat"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out)
    want = fastdebias.generate(model, "the cat sat", max_new_tokens=2, prompt_logprobs=True, top_logprobs=3)[0]
    assert row["prompt_top_logprobs"][0] is None and len(row["prompt_top_logprobs"]) == len(want.prompt_token_ids)
    assert [[i for _, i, _ in pos] for pos in row["prompt_top_logprobs"][1:]] == [
        [i for i, _ in pos] for pos in want.prompt_top_logprobs[1:]]  # fmt: skip
    assert row["prompt_logprobs"][0][2] is None
    assert [t[2] for t in row["prompt_logprobs"][1:]] == pytest.approx(want.prompt_logprobs[1:], abs=1e-4)
    assert [t[1] for t in row["prompt_logprobs"]] == model.tokenizer("the cat sat")["input_ids"]


def test_context(llama_dir, adapter_qv, adapter_all, hf_qv):
    """score(context=...): each text scored as the continuation of its context (one for all, or one per text, of
    different lengths, with mixed adapters): every text token against transformers scoring context + text in one
    forward, and equal to scoring the joined ids and keeping the text's part."""
    model = fastdebias.load(llama_dir, {"qv": adapter_qv, "all": adapter_all}, progress=False)
    tok = model.tokenizer
    texts = ["sat on the mat", "ran", "is a cat"]
    ctx_ids = tok("the cat")["input_ids"]
    got = fastdebias.score(model, texts, context="the cat", adapter="qv", top_logprobs=2)
    for text, s in zip(texts, got):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert s.token_ids == ids and s.context_tokens == len(ctx_ids) and None not in s.logprobs
        full = ctx_ids + ids
        dist = hf_dist(hf_qv, full)[len(ctx_ids) - 1 :]
        want = dist.gather(1, torch.tensor(ids).view(-1, 1))[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, rtol=0, atol=ATOL)

        class Scored:
            token_ids, logprobs, top_logprobs = ids, s.logprobs, s.top_logprobs

        check_top(Scored, dist)
        assert s.total == pytest.approx(sum(s.logprobs)) and s.perplexity == pytest.approx(
            math.exp(-s.total / len(ids)))  # fmt: skip
        whole = fastdebias.score(model, [full], adapter="qv")[0]
        assert s.logprobs == pytest.approx(whole.logprobs[len(ctx_ids):], abs=1e-4)
    # one context per text (ids and text, of different lengths), one adapter per text
    contexts = [[1, 17, 42], "the dog", [1, 8, 9, 10, 11, 12, 13, 14]]
    which = ["qv", None, "all"]
    per = fastdebias.score(model, [[5, 6], [7], [9, 9, 3]], context=contexts, adapter=which)
    for c, x, a, s in zip(contexts, [[5, 6], [7], [9, 9, 3]], which, per):
        c = tok(c)["input_ids"] if isinstance(c, str) else c
        assert s.token_ids == x and s.context_tokens == len(c)
        alone = fastdebias.score(model, [c + x], adapter=a)[0]
        assert s.logprobs == pytest.approx(alone.logprobs[len(c):], abs=1e-4)
    # one id list: every text's context (the default adapter is the first loaded, "qv", as per[0]'s)
    same = fastdebias.score(model, [[5, 6], [7]], context=[1, 17, 42])
    assert [s.context_tokens for s in same] == [3, 3]
    assert same[0].logprobs == pytest.approx(per[0].logprobs, abs=1e-4)


def test_context_errors_and_cli(llama_dir, adapter_qv, capsys):
    from fastdebias.cli import main

    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    with pytest.raises(GenerationError, match="context: expected a str or token-id list .* or a list of 2"):
        fastdebias.score(model, ["a", "b"], context=["x", "y", "z"])
    with pytest.raises(GenerationError, match=r"context\[0\] is an empty string"):
        fastdebias.score(model, ["a"], context="")
    # a list of numbers is one context of token ids, checked as such
    with pytest.raises(GenerationError, match=r"context\[0\]: token ids must be integers, got 1.5"):
        fastdebias.score(model, ["a", "b"], context=[1, 1.5])
    with pytest.raises(GenerationError, match=r"context\[0\]: token ids must be integers, got True"):
        fastdebias.score(model, ["a", "b"], context=[True, 1])
    with pytest.raises(GenerationError, match=r"texts\[0\] has 601 tokens with its context, more than"):
        fastdebias.score(model, [[5]], context=[[1] * 600])
    assert main(["score", "--model", str(llama_dir), "--adapter", str(adapter_qv), "--json", "-q",
                 "--context", "the cat", "sat", "ran"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = fastdebias.score(model, ["sat", "ran"], context="the cat")
    for r, s in zip(rows, want):
        assert [t[1] for t in r["tokens"]] == s.token_ids
        assert [t[2] for t in r["tokens"]] == pytest.approx(s.logprobs, abs=1e-4)
        assert r["context_tokens"] == s.context_tokens > 0 and r["logprob"] == pytest.approx(s.total, abs=1e-4)


def test_context_prefix_prefilled_once(llama_dir, adapter_qv, adapter_all, hf_qv, monkeypatch):
    """Texts after contexts that share a long beginning (candidate rewrites after one instruction): that
    beginning is prefilled once per adapter and copied in, and a one-text call keeps its context for the next
    call. Each score equals transformers' and the same call without sharing."""
    model = fastdebias.load(llama_dir, {"qv": adapter_qv, "all": adapter_all}, progress=False)
    instruction = [1] + list(range(20, 45))  # 26 tokens
    texts = [[5, 6, 7], [8], [9, 10]]
    computed = prefilled_tokens(model, monkeypatch)
    which = ["qv", "all", "qv"]
    got = fastdebias.score(model, texts, context=instruction, adapter=which, top_logprobs=2)
    # the shared 25 tokens once per adapter, then the 3 rows from slot 25 on (3 + the context's last token + pad)
    assert computed == [2 * 25, 3 * (26 + 3 - 25)]
    model.runner.share_prefix = False
    model.runner.prefix = None
    plain = fastdebias.score(model, texts, context=instruction, adapter=which, top_logprobs=2)
    model.runner.share_prefix = True
    for x, a, s, p in zip(texts, which, got, plain):
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)
        assert [[i for i, _ in pos] for pos in s.top_logprobs] == [[i for i, _ in pos] for pos in p.top_logprobs]
        if a == "qv":
            full = instruction + x
            want = hf_dist(hf_qv, full)[len(instruction) - 1 :].gather(1, torch.tensor(x).view(-1, 1))[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs), want, rtol=0, atol=ATOL)
    # one text at a time: the first call keeps its context, the second prefills only its own tokens (and the
    # context's last one)
    model.runner.prefix = None
    computed.clear()
    one = [fastdebias.score(model, [x], context=instruction, adapter="qv")[0] for x in ([5, 6, 7], [9, 10])]
    assert computed == [26 + 3, 1 + 2]
    assert one[0].logprobs == pytest.approx(got[0].logprobs, abs=1e-4)
    assert one[1].logprobs == pytest.approx(got[2].logprobs, abs=1e-4)
