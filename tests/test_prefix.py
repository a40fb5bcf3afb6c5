"""A prefix that all of a call's prompts share is prefilled once (``generate._SharedPrefix``) and copied into each
row, and the runner keeps it (or a one-prompt call's prompt) for later calls whose prompts begin the same way:
tokens, logits and everything else equal the full prefill's, under every runtime, with mixed adapters, left
padding, prompts joining a running batch, and a prompt that is the prefix plus one token."""

from __future__ import annotations

import pytest
import torch

import fastdebias
from fastdebias.generate import MIN_SHARED_PREFIX, _find_prefix, _SharedPrefix, prefill
from fastdebias.lexicon import Lexicon

from .conftest import TOLERANCES, as_cuda_graph
from .test_parity import hf_greedy

SYSTEM = [1, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]  # 12 tokens every prompt opens with
PROMPTS = [SYSTEM + [17, 42, 99, 5], SYSTEM + [200], SYSTEM + [8, 9, 10, 11, 12, 13, 14], SYSTEM + [77, 78],
           SYSTEM + [60, 61, 62], SYSTEM + [90, 91, 92, 93, 94]]  # fmt: skip
NEW = 10


def outputs(results):
    return [(r.token_ids, r.finish_reason, r.interventions) for r in results]


def prefilled_tokens(model, monkeypatch) -> list[int]:
    """Prompt positions each prefill call computes (rows x slots from ``first`` on)."""
    seen: list[int] = []
    orig = model.runner.prefill

    def spy(tokens, start, cache, adapter_idx, padded=True, first=0, **kw):
        seen.append(tokens.shape[0] * (tokens.shape[1] - first))
        return orig(tokens, start, cache, adapter_idx, padded=padded, first=first, **kw)

    monkeypatch.setattr(model.runner, "prefill", spy)
    return seen


@pytest.fixture(scope="module")
def model(llama_dir, adapter_qv):
    return fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="eager", progress=False)


@pytest.fixture(autouse=True)
def no_kept_prefix(model):
    model.runner.prefix = None  # each test starts with nothing kept from another


def test_shared_prefix_found_only_where_worth_it(model):
    shared, p = _find_prefix(model, PROMPTS, [0] * 6)
    assert p == len(SYSTEM) and shared.tokens == SYSTEM and model.runner.prefix is shared
    model.runner.prefix = None
    # the shortest prompt keeps its last token to prefill (its logits choose its first token)
    assert _find_prefix(model, [SYSTEM, SYSTEM + [5]], [0, 0])[1] == len(SYSTEM) - 1
    model.runner.prefix = None
    assert _find_prefix(model, PROMPTS[:1], [0]) is None  # one prompt, nothing kept: nothing to share
    short = [SYSTEM[: MIN_SHARED_PREFIX - 1] + [5, 6], SYSTEM[: MIN_SHARED_PREFIX - 1] + [7]]
    assert _find_prefix(model, short, [0, 0]) is None


def test_prefill_with_shared_prefix_equals_full_prefill(model):
    """The logits of the last position and every prompt slot of the cache, per row, mixed adapters."""
    rows = [0, -1, 0, -1, -1, 0]
    adapter_idx = torch.tensor(rows, dtype=torch.int32)
    full = prefill(model, PROMPTS, NEW, adapter_idx)
    logits, cache = full[0].clone(), [k.clone() for k in full[1].k + full[1].v]
    shared = _SharedPrefix.compute(model, SYSTEM, [-1, 0])
    got = prefill(model, PROMPTS, NEW, adapter_idx, prefix=(shared, len(SYSTEM), rows))
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got[0], logits, rtol=rtol, atol=atol)
    t = got[3].shape[1]
    for a, b in zip(got[1].k + got[1].v, cache):
        for r, st in enumerate(got[2].tolist()):  # the real prompt slots (padding slots hold nothing read)
            torch.testing.assert_close(a[r, :, st:t], b[r, :, st:t], rtol=rtol, atol=atol)


def test_generate_shares_the_prefix_and_changes_nothing(model, llama_dir, adapter_qv, monkeypatch):
    names = ["qv", None, "qv", None, None, "qv"]
    free = [r.token_ids for r in fastdebias.generate(model, PROMPTS, adapter=names, max_new_tokens=NEW)]
    lex = Lexicon.from_token_sequences({tuple(free[1][2:4]): float("-inf"), (free[2][1],): -1.0})
    kw = dict(adapter=names, max_new_tokens=NEW, lexicon=lex, repetition_penalty=1.2)
    seen = prefilled_tokens(model, monkeypatch)
    model.runner.prefix = None  # (the call above kept it)
    got = fastdebias.generate(model, PROMPTS, **kw)
    # the prefix once per adapter (2 rows), then the rest of the padded batch (from the longest prompt's)
    t = max(map(len, PROMPTS))
    assert seen == [2 * len(SYSTEM), len(PROMPTS) * (t - len(SYSTEM))], seen
    seen.clear()  # a second call: the kept prefix, nothing computed again
    assert outputs(fastdebias.generate(model, PROMPTS, **kw)) == outputs(got)
    assert seen == [len(PROMPTS) * (t - len(SYSTEM))], seen
    model.runner.share_prefix = False
    try:
        seen.clear()
        want = fastdebias.generate(model, PROMPTS, **kw)
        assert seen == [len(PROMPTS) * t]
    finally:
        model.runner.share_prefix = True
    assert outputs(got) == outputs(want)
    assert any(i.action == "rewound" for r in got for i in r.interventions)
    # and against transformers + PEFT, unmerged, per-row adapters
    adapter_names = ["qv" if a else "__base__" for a in names]
    plain = fastdebias.generate(model, PROMPTS, adapter=names, max_new_tokens=NEW)
    assert [r.token_ids for r in plain] == hf_greedy(llama_dir, PROMPTS, NEW, {"qv": adapter_qv}, adapter_names)


def test_joining_prompts_share_the_prefix(model, monkeypatch):
    """Prompts that join a running batch copy the prefix too (into their own cache, then into the row)."""
    eos_free = [r.token_ids for r in fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[])]
    eos = sorted({row[min(1 + 3 * i, NEW - 1)] for i, row in enumerate(eos_free[::2])})
    kw = dict(max_new_tokens=NEW, eos_token_id=eos)
    whole = fastdebias.generate(model, PROMPTS, **kw)
    seen = prefilled_tokens(model, monkeypatch)
    got = fastdebias.generate(model, PROMPTS, batch_size=2, **kw)
    assert outputs(got) == outputs(whole)
    assert len(seen) > 2 and all(n < 2 * 8 for n in seen[1:]), seen  # (at most 2 rows of their own tokens)


def test_shared_prefix_under_graphs(llama_dir, adapter_qv, model, emulated_graphs, monkeypatch):
    """The static runtime: the prefix is written into the runner's cache rows, and joins copy it as well."""
    static = as_cuda_graph(fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="eager", progress=False))
    names = ["qv", None, "qv", None, None, "qv"]
    kw = dict(adapter=names, max_new_tokens=NEW)
    want = fastdebias.generate(model, PROMPTS, **kw)
    seen = prefilled_tokens(static, monkeypatch)
    assert outputs(fastdebias.generate(static, PROMPTS, **kw)) == outputs(want)
    assert seen == [2 * len(SYSTEM), len(PROMPTS) * (max(map(len, PROMPTS)) - len(SYSTEM))]
    seen.clear()
    static.runner.prefix = None
    assert outputs(fastdebias.generate(static, PROMPTS, batch_size=4, **kw)) == outputs(want)
    assert len(seen) == 3 and seen[0] == 2 * len(SYSTEM), seen  # the prefix, 4 rows, then 2 rows join


def test_later_calls_reuse_the_kept_prefix(model, monkeypatch):
    """One text at a time (a pipeline): each call keeps its prompt, and the next one, beginning the same way,
    prefills only what differs; another adapter, or a prompt beginning otherwise, prefills in full."""
    seen = prefilled_tokens(model, monkeypatch)
    want = [fastdebias.generate(model, [p], max_new_tokens=NEW, adapter="qv")[0] for p in PROMPTS]
    model.runner.share_prefix = False
    try:
        assert outputs(want) == outputs([fastdebias.generate(model, [p], max_new_tokens=NEW, adapter="qv")[0]
                                         for p in PROMPTS])  # fmt: skip
    finally:
        model.runner.share_prefix = True
    full = [len(p) for p in PROMPTS]
    assert seen[: len(PROMPTS)] == full[:1] + [n - len(SYSTEM) for n in full[1:]], seen
    assert model.runner.prefix.tokens == PROMPTS[-1][:-1] and model.runner.prefix.adapters == [0]
    seen.clear()
    fastdebias.generate(model, [PROMPTS[0]], max_new_tokens=2, adapter=None)  # another adapter: in full
    other = [1, 2, 3] + SYSTEM
    fastdebias.generate(model, [other], max_new_tokens=2, adapter=None)  # begins otherwise: in full
    assert seen == [len(PROMPTS[0]), len(other)], seen
    model.runner.reset()
    assert model.runner.prefix is None
