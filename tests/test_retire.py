"""Finished rows leave the batch (``generate._retire_rows``): the later steps compute only the rows still
generating, and nothing any row produces changes — tokens, finish reasons, text, streamed pieces, interventions."""

from __future__ import annotations

import pytest
import torch

import fastdebias
from fastdebias.lexicon import Lexicon

from .conftest import as_cuda_graph

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12], [1, 77], [1, 30, 31], [1, 150, 151, 152, 153]]
NEW = 14


def outputs(results):
    return [(r.token_ids, r.finish_reason, r.text, r.interventions) for r in results]


def rows_of(model, monkeypatch, method: str) -> list[int]:
    """Record the rows of every call of ``model.runner.<method>`` (its first argument's first dimension)."""
    seen: list[int] = []
    orig = getattr(model.runner, method)

    def spy(x, *args, **kw):
        seen.append(x.shape[0])
        return orig(x, *args, **kw)

    monkeypatch.setattr(model.runner, method, spy)
    return seen


def batch_sizes(model, monkeypatch):
    """The rows of every decode step of ``model``."""
    return rows_of(model, monkeypatch, "decode")


def no_retiring(model, monkeypatch):
    monkeypatch.setattr(model.runner, "min_rows_after_retiring", lambda: None)


def staggered_eos(model, prompts, **kw):
    """EOS ids that end the rows of ``prompts`` at different steps (each row's token at a different position)."""
    free = [r.token_ids for r in fastdebias.generate(model, prompts, max_new_tokens=NEW, eos_token_id=[], **kw)]
    eos = sorted({row[min(2 + 2 * i, NEW - 1)] for i, row in enumerate(free[::2])})
    ends = [min((j for j, x in enumerate(row) if x in eos), default=NEW) for row in free]
    assert len(set(ends)) >= 3, ends  # the rows end at several different steps
    return eos, free


@pytest.fixture(scope="module")
def model(llama_dir, adapter_qv):
    return fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="eager", progress=False)


def test_retired_rows_change_no_output(model, monkeypatch):
    """Mixed adapters, a lexicon that rewinds and penalises, a repetition penalty: the batch shrinks as rows end,
    and every row's result equals the one from the batch kept whole and from the prompt decoded alone."""
    names = ["qv", None, "qv", None, "qv", "qv"]
    eos, free = staggered_eos(model, PROMPTS, adapter=names)
    lex = Lexicon.from_token_sequences({tuple(free[1][3:5]): float("-inf"), (free[2][1],): -1.0,
                                        tuple(free[4][2:4]): float("-inf")})  # fmt: skip
    kw = dict(adapter=names, max_new_tokens=NEW, eos_token_id=eos, lexicon=lex, repetition_penalty=1.2)
    seen = batch_sizes(model, monkeypatch)
    got = fastdebias.generate(model, PROMPTS, **kw)
    assert seen[0] == len(PROMPTS) and min(seen) < len(PROMPTS), seen  # rows did leave
    assert seen == sorted(seen, reverse=True)
    assert {r.finish_reason for r in got} == {"eos", "length"}
    assert any(i.action == "rewound" for r in got for i in r.interventions)
    assert any(i.action == "penalised" for r in got for i in r.interventions)
    alone = [fastdebias.generate(model, [p], **dict(kw, adapter=[a]))[0] for p, a in zip(PROMPTS, names)]
    assert outputs(got) == outputs(alone)
    no_retiring(model, monkeypatch)
    seen.clear()
    whole = fastdebias.generate(model, PROMPTS, **kw)
    assert set(seen) == {len(PROMPTS)}
    assert outputs(got) == outputs(whole)


def test_retired_rows_keep_their_stream_and_stop(model, monkeypatch):
    """Streamed pieces go to the right prompt index after rows have left, and a stop string still ends its row."""
    eos, free = staggered_eos(model, PROMPTS)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in free]
    stop = texts[3][2:5]  # ends row 3 early (and any other row whose text holds it)
    pieces: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    seen = batch_sizes(model, monkeypatch)
    got = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=eos, stop=stop,
                              stream=lambda i, s: pieces[i].append(s))  # fmt: skip
    assert min(seen) < len(PROMPTS)
    assert got[3].finish_reason == "stop"
    for i, r in enumerate(got):
        assert "".join(pieces[i]) == r.text
    pieces = {i: [] for i in range(len(PROMPTS))}  # two rows at a time, the others joining: the same
    joined = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=eos, stop=stop, batch_size=2,
                                 stream=lambda i, s: pieces[i].append(s))  # fmt: skip
    assert outputs(joined) == outputs(got) and all("".join(pieces[i]) == r.text for i, r in enumerate(got))
    no_retiring(model, monkeypatch)
    assert outputs(got) == outputs(fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=eos,
                                                       stop=stop))  # fmt: skip


def test_all_rows_finishing_together_retire_nothing(model, monkeypatch):
    seen = batch_sizes(model, monkeypatch)
    got = fastdebias.generate(model, PROMPTS, max_new_tokens=6, eos_token_id=[])
    assert set(seen) == {len(PROMPTS)} and all(len(r.token_ids) == 6 for r in got)


def test_runtimes_say_how_far_a_batch_may_shrink(llama_dir, model):
    assert model.runner.min_rows_after_retiring() == 1
    comp = fastdebias.load(llama_dir, runtime="compile", progress=False)
    assert comp.runner.min_rows_after_retiring() == 3  # batches of 1 and 2 rows would each compile a graph
    comp.runner.runtime = "cuda_graph"  # (its static buffers and graphs are bound to the batch: no retiring)
    assert comp.runner.min_rows_after_retiring() is None


def test_compiled_runtime_retires_down_to_three_rows(llama_dir, adapter_qv, model, monkeypatch):
    comp = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="compile", progress=False)
    names = ["qv", None, "qv", None, "qv", "qv"]
    eos, _ = staggered_eos(model, PROMPTS, adapter=names)
    kw = dict(adapter=names, max_new_tokens=NEW, eos_token_id=eos)
    seen = batch_sizes(comp, monkeypatch)
    got = fastdebias.generate(comp, PROMPTS, **kw)
    assert min(seen) == 3 and max(seen) == len(PROMPTS), seen
    assert outputs(got) == outputs(fastdebias.generate(model, PROMPTS, **kw))
    # other prompts, other departures: the batch sizes they pass through compile nothing new (dynamic batch)
    graphs = dict(torch._dynamo.utils.counters["stats"])
    other = [p[:1] + p[:0:-1] for p in PROMPTS[::-1]] + [[1, 9, 9]]
    names = names[::-1] + [None]
    eos, _ = staggered_eos(model, other, adapter=names)
    seen.clear()
    got = fastdebias.generate(comp, other, **dict(kw, adapter=names, eos_token_id=eos))
    assert len(set(seen)) >= 3 and min(seen) >= 3, seen
    assert outputs(got) == outputs(fastdebias.generate(model, other, **dict(kw, adapter=names, eos_token_id=eos)))
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs


def test_triton_sampling_unchanged_by_retiring(llama_dir, adapter_qv, model, monkeypatch):
    """The Triton step's noise is keyed by (seed, prompt row, step), so sampled tokens do not depend on which
    rows are still in the batch."""
    tri = fastdebias.load(llama_dir, {"qv": adapter_qv}, backend="triton", device=model.device, dtype=model.dtype,
                          progress=False)  # fmt: skip
    prompts = PROMPTS[:4]
    sampling = dict(temperature=0.9, top_k=50, seed=11)
    eos, _ = staggered_eos(tri, prompts, **sampling)  # (ends its own sampled rows at different steps)
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, **sampling)
    seen = batch_sizes(tri, monkeypatch)
    got = fastdebias.generate(tri, prompts, **kw)
    assert min(seen) < len(prompts), seen
    no_retiring(tri, monkeypatch)
    assert outputs(got) == outputs(fastdebias.generate(tri, prompts, **kw))


# ----------------------------------------------------------------------------------- prompts joining a batch

JOB = PROMPTS + [[1, 60, 61, 62, 63, 64, 65], [1, 90], [1, 120, 121]]


def prefill_sizes(model, monkeypatch):
    """The rows of every prefill of ``model`` (the first batch, then each group of joining prompts)."""
    return rows_of(model, monkeypatch, "prefill")


def test_prompts_join_as_rows_leave(model, monkeypatch):
    """batch_size=3 over 9 prompts: 3 rows decode at a time and the next prompts join as rows finish (continuous
    batching); every result equals the one from all 9 in one batch — tokens, reasons, text, interventions, streamed
    pieces — with mixed adapters, a lexicon that rewinds and a repetition penalty."""
    names = ["qv", None, "qv", None, "qv", "qv", None, "qv", None]
    eos, free = staggered_eos(model, JOB, adapter=names)
    lex = Lexicon.from_token_sequences({tuple(free[i][1:3]): float("-inf") for i in (0, 3, 6)} | {(free[2][1],): -1.0})
    kw = dict(adapter=names, max_new_tokens=NEW, eos_token_id=eos, lexicon=lex, repetition_penalty=1.2)
    whole = fastdebias.generate(model, JOB, **kw)
    pieces: dict[int, list[str]] = {i: [] for i in range(len(JOB))}
    joins, rows = prefill_sizes(model, monkeypatch), batch_sizes(model, monkeypatch)
    got = fastdebias.generate(model, JOB, batch_size=3, stream=lambda i, s: pieces[i].append(s), **kw)
    assert outputs(got) == outputs(whole)
    assert all("".join(pieces[i]) == r.text for i, r in enumerate(got))
    assert joins[0] == 3 and sum(joins) == len(JOB) and len(joins) > 3, joins  # joined in several groups
    assert max(rows) == 3 and rows.count(3) > NEW, rows  # kept full while prompts were waiting
    assert any(i.action == "rewound" for r in got for i in r.interventions)


def test_triton_sampling_unchanged_by_joining(llama_dir, adapter_qv, model, monkeypatch):
    """Each row's step counter starts at 0 when it joins, so its sampled tokens do not depend on when it joined."""
    tri = fastdebias.load(llama_dir, {"qv": adapter_qv}, backend="triton", device=model.device, dtype=model.dtype,
                          progress=False)  # fmt: skip
    job = JOB[:5]
    sampling = dict(temperature=0.9, top_k=50, seed=5)
    eos, _ = staggered_eos(tri, job, **sampling)
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, **sampling)
    whole = fastdebias.generate(tri, job, **kw)
    joins = prefill_sizes(tri, monkeypatch)
    got = fastdebias.generate(tri, job, batch_size=2, **kw)
    assert len(joins) > 2, joins
    assert outputs(got) == outputs(whole)


def test_compiled_runtime_joins_prompts(llama_dir, adapter_qv, model, monkeypatch):
    comp = fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="compile", progress=False)
    eos, _ = staggered_eos(model, JOB)
    kw = dict(max_new_tokens=NEW, eos_token_id=eos)
    rows = batch_sizes(comp, monkeypatch)
    got = fastdebias.generate(comp, JOB, batch_size=4, **kw)
    assert outputs(got) == outputs(fastdebias.generate(model, JOB, **kw))
    assert max(rows) == 4 and min(rows) >= 3, rows  # (at the end, 3 rows at least: the compile runtime's floor)
    rows.clear()  # a batch below that floor: rows still leave for the prompts waiting (and all end together here)
    kw = dict(max_new_tokens=5, eos_token_id=[])
    assert outputs(fastdebias.generate(comp, JOB, batch_size=2, **kw)) == outputs(fastdebias.generate(model, JOB, **kw))
    assert set(rows) == {2}, rows


def test_cuda_graph_runtime_joins_prompts_in_place(llama_dir, adapter_qv, model, emulated_graphs, monkeypatch):
    """Under CUDA graphs (emulated on CPU) prompts take finished rows' places in place: the batch keeps its rows
    and every loop tensor its address (``_ReplayStep`` asserts it at each replay), the forward and step graphs go on
    replaying across joins, and every result equals the whole job in one eager batch — with mixed adapters, a
    lexicon that rewinds and a repetition penalty."""
    static = as_cuda_graph(fastdebias.load(llama_dir, {"qv": adapter_qv}, runtime="eager", progress=False))
    names = ["qv", None, "qv", None, "qv", "qv", None, "qv", None]
    eos, free = staggered_eos(model, JOB, adapter=names)
    lex = Lexicon.from_token_sequences({tuple(free[i][1:3]): float("-inf") for i in (0, 3, 6)} | {(free[2][1],): -1.0})
    kw = dict(adapter=names, max_new_tokens=NEW, eos_token_id=eos, lexicon=lex, repetition_penalty=1.2)
    whole = fastdebias.generate(model, JOB, **kw)
    joins, rows = prefill_sizes(static, monkeypatch), batch_sizes(static, monkeypatch)
    got = fastdebias.generate(static, JOB, batch_size=4, **kw)
    assert outputs(got) == outputs(whole)
    assert any(i.action == "rewound" for r in got for i in r.interventions)
    assert joins[0] == 4 and sum(joins) == len(JOB) and len(joins) > 2, joins  # joined in several groups
    assert set(rows) == {4}, rows  # the batch kept its rows
    assert sum(g.replays for g in emulated_graphs) > NEW  # the step graphs replayed through the joins
    captured = len(emulated_graphs)
    # streaming and a stop string: each piece goes to its prompt, whichever row it decoded in
    texts = [model.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in whole]
    stop = texts[3][2:5]
    pieces: dict[int, list[str]] = {i: [] for i in range(len(JOB))}
    got = fastdebias.generate(static, JOB, batch_size=3, stop=stop, stream=lambda i, s: pieces[i].append(s), **kw)
    assert outputs(got) == outputs(fastdebias.generate(model, JOB, stop=stop, **kw))
    assert got[3].finish_reason == "stop" and all("".join(pieces[i]) == r.text for i, r in enumerate(got))
    assert len(emulated_graphs) > captured


def test_triton_sampling_under_graphs_unchanged_by_joining(llama_dir, adapter_qv, model, emulated_graphs, monkeypatch):
    """Triton step under (emulated) CUDA graphs, prompts joining in place: sampled tokens as in one batch."""
    tri = fastdebias.load(llama_dir, {"qv": adapter_qv}, backend="triton", device=model.device, dtype=model.dtype,
                          progress=False)  # fmt: skip
    static = as_cuda_graph(fastdebias.load(llama_dir, {"qv": adapter_qv}, backend="triton", device=model.device,
                                           dtype=model.dtype, runtime="eager", progress=False))  # fmt: skip
    job = JOB[:5]
    sampling = dict(temperature=0.9, top_k=50, seed=5)
    eos, _ = staggered_eos(tri, job, **sampling)
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, **sampling)
    joins = prefill_sizes(static, monkeypatch)
    got = fastdebias.generate(static, job, batch_size=2, **kw)
    assert len(joins) > 2, joins
    assert outputs(got) == outputs(fastdebias.generate(tri, job, **kw))
    assert sum(g.replays for g in emulated_graphs) > 0
