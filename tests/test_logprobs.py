"""generate(logprobs=True): each kept token's log-probability under the model's raw logits, checked against
transformers (+PEFT) scoring the returned tokens in one forward pass (teacher forcing). Rewinds, continuous batching,
the lexicon, penalties and sampling change which tokens are chosen, never what their log-probabilities are."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

import fastdebias
from fastdebias.errors import GenerationError
from fastdebias.lexicon import Lexicon

from .conftest import as_cuda_graph, make_llama

generate_module = importlib.import_module("fastdebias.generate")  # (fastdebias.generate is the function)

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12], [1, 77]]
NEW = 12


@pytest.fixture(scope="module")
def hf_model(llama_dir, adapter_qv):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_qv)).eval()


def distributions(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: log p(· | prompt + tokens[:j]) under ``hf``, every j in one forward."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def teacher_forced(hf, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[j] | prompt + tokens[:j]) under ``hf``."""
    return distributions(hf, prompt, tokens).gather(1, torch.tensor(tokens).view(-1, 1)).squeeze(1).tolist()


def check(outs, hf, prompts=PROMPTS):
    for prompt, o in zip(prompts, outs):
        assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids) > 0
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(teacher_forced(hf, prompt, o.token_ids)),
                                   rtol=0, atol=2e-4)  # fmt: skip
        assert all(x <= 0.0 for x in o.logprobs)
        if o.top_logprobs is not None:
            check_top(o, distributions(hf, prompt, o.token_ids))


def check_top(o, dist: torch.Tensor, atol: float = 2e-4) -> None:
    """``o.top_logprobs`` holds, at each returned position, the N most likely tokens of ``dist`` [len, V] (the
    reference's log-probabilities), most likely first, with their log-probabilities."""
    assert len(o.top_logprobs) == len(o.token_ids)
    n = len(o.top_logprobs[0])
    assert n > 0 and all(len(pos) == n for pos in o.top_logprobs)
    for j, pos in enumerate(o.top_logprobs):
        ids, vals = [i for i, _ in pos], torch.tensor([lp for _, lp in pos])
        want_vals, want_ids = torch.topk(dist[j], n)
        torch.testing.assert_close(vals, want_vals, rtol=0, atol=atol)
        assert vals.tolist() == sorted(vals.tolist(), reverse=True)
        # the same tokens, wherever the reference separates them from the next one (near-ties may swap)
        gaps = torch.cat([want_vals[:-1] - want_vals[1:], torch.tensor([1.0])]) > 10 * atol
        clear = [k for k in range(n) if gaps[k] and (k == 0 or gaps[k - 1])]
        assert [ids[k] for k in clear] == [want_ids[k].item() for k in clear]
        torch.testing.assert_close(dist[j][ids], vals, rtol=0, atol=atol)  # each pair's value is its token's
        # the returned token is among them exactly when it is at least as likely as the N-th
        if o.logprobs[j] > vals[-1] + atol:
            assert o.token_ids[j] in ids


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_logprobs_equal_transformers(llama_dir, adapter_qv, hf_model, backend):
    """Greedy, prompts of different lengths in one padded batch, the adapter applied unmerged; the Triton backend
    (whose greedy path would otherwise fuse the lm_head and never form the logits) gives the same."""
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], logprobs=True)
    check(outs, hf_model)
    # greedy picks each step's most likely token: its log-probability is the row's maximum
    plain = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[])
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.logprobs is None for o in plain)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_top_logprobs_equal_transformers(llama_dir, adapter_qv, hf_model, backend):
    """top_logprobs=N: the N most likely tokens at each position, against transformers + PEFT's distributions;
    under greedy the first of them is the returned token. It implies ``logprobs``."""
    model = fastdebias.load(llama_dir, adapter_qv, backend=backend, progress=False)
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], top_logprobs=5)
    check(outs, hf_model)
    for o in outs:
        assert len(o.top_logprobs[0]) == 5
        assert [pos[0][0] for pos in o.top_logprobs] == o.token_ids
        assert [pos[0][1] for pos in o.top_logprobs] == o.logprobs
    plain = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], logprobs=True)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.top_logprobs is None for o in plain)


def test_top_logprobs_bounds(llama_dir, tmp_path):
    """Up to 20 (OpenAI's bound; more is a named error); a vocabulary smaller than N gives all of it."""
    model = fastdebias.load(llama_dir, progress=False)
    for bad in (-1, 21, 2.0, "3", True):
        with pytest.raises(GenerationError, match=r"top_logprobs must be an integer from 0 \(off\) to 20, got"):
            fastdebias.generate(model, PROMPTS[:1], max_new_tokens=2, top_logprobs=bad)
    small = fastdebias.load(make_llama(tmp_path / "v12", vocab_size=12), progress=False)
    out = fastdebias.generate(small, [[1, 5, 7]], max_new_tokens=3, eos_token_id=[], top_logprobs=20)[0]
    for pos in out.top_logprobs:
        assert sorted(i for i, _ in pos) == list(range(12))
        assert abs(sum(math.exp(lp) for _, lp in pos) - 1.0) < 1e-5


def test_logprobs_through_rewinds_sampling_and_continuous_batching(llama_dir, adapter_qv, hf_model):
    """Backtracking rewinds (the log-probabilities of discarded tokens must not survive), a penalty entry, the
    repetition penalty, sampling with top-k, and two rows for four prompts (prompts join finished rows' places):
    every returned log-probability is still the raw model's for the token kept at that position."""
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    free = [o.token_ids for o in fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[])]
    lex = Lexicon.from_token_sequences({tuple(free[0][2:4]): float("-inf"), tuple(free[2][3:5]): float("-inf"),
                                        (free[1][1],): -3.0})  # fmt: skip
    greedy = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], lexicon=lex, batch_size=2,
                                 repetition_penalty=1.3, logprobs=True, top_logprobs=4)  # fmt: skip
    rewinds = [(p, o, i) for p, o in zip(PROMPTS, greedy) for i in o.interventions if i.action == "rewound"]
    assert rewinds
    check(greedy, hf_model)
    for prompt, o, i in rewinds:  # where a rewind banned the model's first choice, what was kept is less likely
        dist = distributions(hf_model, prompt, o.token_ids)[i.step]
        assert o.logprobs[i.step] < dist[i.token_id].item()
        assert o.top_logprobs[i.step][0][0] != o.token_ids[i.step]  # and the first choice shows above it
    sampled = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], lexicon=lex, batch_size=2,
                                  temperature=1.5, top_k=20, seed=5, logprobs=True, top_logprobs=3)  # fmt: skip
    check(sampled, hf_model)
    assert [o.token_ids for o in sampled] != [o.token_ids for o in greedy]


def test_logprobs_cut_with_the_tokens_at_eos_and_stop(llama_dir):
    """An EOS or a stop string shortens ``token_ids``; ``logprobs`` stays one per returned token."""
    model = fastdebias.load(llama_dir, progress=False)
    full = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, eos_token_id=[], logprobs=True)[0]
    n = full.token_ids.index(full.token_ids[4]) + 1  # where that token first appears
    eos = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, eos_token_id=full.token_ids[4], logprobs=True)[0]
    assert eos.finish_reason == "eos" and len(eos.token_ids) == len(eos.logprobs) == n
    assert eos.logprobs == full.logprobs[:n]
    text = model.tokenizer.decode(full.token_ids[:6], skip_special_tokens=True)
    stop = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, eos_token_id=[], stop=text[-3:],
                               logprobs=True)[0]  # fmt: skip
    assert stop.finish_reason == "stop" and len(stop.logprobs) == len(stop.token_ids) <= 6
    assert stop.logprobs == full.logprobs[: len(stop.token_ids)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_of_rows_with_every_token_banned(llama_dir, backend):
    """A row in which every token is banned (here: the lexicon bans all but EOS, and min_new_tokens bans EOS) ends
    "banned" with no tokens and no log-probabilities, on both backends (the Triton step's token is -1 there)."""
    model = fastdebias.load(llama_dir, backend=backend, progress=False)
    v = model.config.vocab_size
    lex = Lexicon.from_token_sequences({(t,): float("-inf") for t in range(v) if t != 2})
    out = fastdebias.generate(model, PROMPTS[:2], max_new_tokens=4, eos_token_id=[2], min_new_tokens=2, lexicon=lex,
                              logprobs=True)  # fmt: skip
    assert [(o.token_ids, o.finish_reason, o.logprobs) for o in out] == [([], "banned", [])] * 2


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_logprobs_must_be_a_bool(llama_dir, bad):
    model = fastdebias.load(llama_dir, progress=False)
    with pytest.raises(GenerationError, match=r"logprobs must be True or False, got"):
        fastdebias.generate(model, PROMPTS[:1], max_new_tokens=2, logprobs=bad)


def test_cli_json_carries_logprobs(llama_dir, capsys):
    from fastdebias.cli import main

    args = ["generate", "--model", str(llama_dir), "--max-new-tokens", "4", "--quiet", "--json", "--logprobs",
            "hello world"]  # fmt: skip
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert len(row["token_ids"]) == len(row["logprobs"]) > 0 and all(x <= 0 for x in row["logprobs"])


def _lexicon_with_rewinds(model, **kw) -> Lexicon:
    free = [o.token_ids for o in fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], **kw)]
    return Lexicon.from_token_sequences({tuple(r[3:5]): float("-inf") for r in free} | {(free[1][2],): -1.5})


def _same_logprobs(eager, model, atol: float, hf=None):
    """``model`` (another runtime) keeps the tokens, interventions and log-probabilities of ``eager``: two rows for
    four prompts, rewinds, a penalty entry and the repetition penalty, greedy and seeded sampling; and (``hf``)
    those of transformers + PEFT."""
    lex = _lexicon_with_rewinds(eager, repetition_penalty=1.2)
    kw = dict(max_new_tokens=NEW, eos_token_id=[], lexicon=lex, repetition_penalty=1.2, batch_size=2, logprobs=True,
              top_logprobs=3)
    for extra in ({}, dict(temperature=0.9, seed=5)):
        a = fastdebias.generate(eager, PROMPTS, **kw, **extra)
        b = fastdebias.generate(model, PROMPTS, **kw, **extra)
        assert [o.token_ids for o in b] == [o.token_ids for o in a]
        assert [o.interventions for o in b] == [o.interventions for o in a]
        assert extra or any(i.action == "rewound" for o in b for i in o.interventions)
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), rtol=0, atol=atol)
            torch.testing.assert_close(torch.tensor([[lp for _, lp in p] for p in y.top_logprobs]),
                                       torch.tensor([[lp for _, lp in p] for p in x.top_logprobs]), rtol=0, atol=atol)
        if hf is not None:
            check(b, hf)


def test_logprobs_under_graphs_with_the_step_compiled(llama_dir, adapter_qv, hf_model, emulated_graphs):
    """The cuda_graph runtime's logic (graphs emulated on CPU, the loop's step compiled by a real torch.compile and
    replayed): the log-probabilities are written inside the captured step, and follow rows that join the batch.
    (The Triton backend computes them by the same lines of ``_advance``, beside its opaque logits step: its
    interpreted run is in ``test_greedy_logprobs_equal_transformers``, its real graphs in the GPU test below.)"""
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", progress=False)
    model = as_cuda_graph(fastdebias.load(llama_dir, adapter_qv, runtime="eager", progress=False), compile_step=True)
    _same_logprobs(eager, model, atol=1e-5, hf=hf_model)
    assert sum(g.replays for g in emulated_graphs) > 0
    assert model.runner._step_fns.get(generate_module._advance) is not None  # compiled, not fallen back


def test_logprobs_under_the_compile_runtime(llama_dir, adapter_qv, hf_model):
    """runtime="compile" on CPU: the compiled forward's logits (one compiled layer for all) and the compiled step."""
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", progress=False)
    comp = fastdebias.load(llama_dir, adapter_qv, runtime="compile", progress=False)
    _same_logprobs(eager, comp, atol=1e-4, hf=hf_model)
    assert comp.runner.regions is not None and comp.runtime == "compile"
    assert comp.runner._step_fns.get(generate_module._advance) is not None


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:fastdebias:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_logprobs_under_cuda_graphs(llama_dir, adapter_qv, backend):
    """Real CUDA graphs (the host reads the flags every 8 steps), fp32: as eager."""
    kw = dict(device="cuda", dtype="float32", backend=backend, progress=False)
    eager = fastdebias.load(llama_dir, adapter_qv, runtime="eager", **kw)
    graph = fastdebias.load(llama_dir, adapter_qv, runtime="cuda_graph", **kw)
    _same_logprobs(eager, graph, atol=1e-4)
