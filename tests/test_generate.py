"""generate/debias behaviour: sampling, seeds, stop strings, EOS lists, streaming, adapters, prompt formats."""

from __future__ import annotations

import pytest
import torch

import fastdebias
from fastdebias.generate import (
    CHAT_EXAMPLES,
    CHAT_SYSTEM,
    SRLLM_END,
    chat_messages,
    debias_prompt_format,
    debias_prompts,
    srllm_prompt,
)
from fastdebias.reference.sampling import apply_repetition_penalty, choose_tokens, filter_logits

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3]]


@pytest.fixture(scope="module")
def model(llama_dir):
    return fastdebias.load(llama_dir, progress=False)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    """The torch backend seeds a generator per prompt (seed, prompt index): the same tokens whether the prompts run
    together, a row at a time, or two rows with the third taking a finished row's place; prompts of one call draw
    different streams (two copies of one prompt sample differently)."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], [1, 8, 9, 10]]
    kw = dict(max_new_tokens=10, temperature=1.5, seed=11)
    whole = [r.token_ids for r in fastdebias.generate(model, prompts, **kw)]
    for bs in (1, 3):
        assert [r.token_ids for r in fastdebias.generate(model, prompts, batch_size=bs, **kw)] == whole, bs
    assert whole[0] != whole[2]
    greedy = [r.token_ids for r in fastdebias.generate(model, prompts, max_new_tokens=10)]
    assert whole != greedy


def test_same_seed_same_tokens_and_different_seed_differs(model):
    kw = dict(max_new_tokens=16, temperature=1.5)
    a = [r.token_ids for r in fastdebias.generate(model, PROMPTS, seed=7, **kw)]
    b = [r.token_ids for r in fastdebias.generate(model, PROMPTS, seed=7, **kw)]
    c = [r.token_ids for r in fastdebias.generate(model, PROMPTS, seed=8, **kw)]
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(model):
    greedy = [r.token_ids for r in fastdebias.generate(model, PROMPTS, max_new_tokens=10)]
    topk1 = [r.token_ids for r in fastdebias.generate(model, PROMPTS, max_new_tokens=10, temperature=2.0, top_k=1,
                                                       seed=3)]
    assert greedy == topk1


def test_greedy_with_repetition_penalty_matches_transformers(llama_dir, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    p = PROMPTS[0]
    ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, repetition_penalty=1.8,
                      pad_token_id=0)[0, len(p):].tolist()
    got = fastdebias.generate(model, [p], max_new_tokens=10, repetition_penalty=1.8)[0].token_ids
    assert got == ref[: len(got)]
    assert got != fastdebias.generate(model, [p], max_new_tokens=10)[0].token_ids


def test_processors_match_transformers():
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 111, generator=g) * 3
    ids = torch.randint(0, 111, (3, 9), generator=g)
    seen = torch.zeros(3, 111, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, logits))
    for k, p, mp in [(5, 1.0, 0.0), (0, 0.8, 0.0), (7, 0.5, 0.0), (200, 0.95, 0.0), (0, 1.0, 0.1), (0, 1.0, 0.02),
                     (20, 0.9, 0.05), (0, 1.0, 1.0)]:  # fmt: skip
        ref = logits
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(ids, ref)
        if mp > 0:
            ref = MinPLogitsWarper(mp)(ids, ref)
        got = filter_logits(logits, k, p, mp)
        assert torch.equal(got, ref), (k, p, mp)
    # min-p 0.1 at temperature 3 keeps several tokens and drops others in every row; 1.0 keeps the most likely alone
    kept = torch.isfinite(filter_logits(logits / 3, 0, 1.0, 0.1)).sum(-1)
    assert (kept > 1).all() and (kept < 111).all()
    assert torch.equal(torch.isfinite(filter_logits(logits, 0, 1.0, 1.0)).nonzero()[:, 1], logits.argmax(-1))


def test_sampling_frequencies_follow_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 50, generator=g).expand(20000, 50).contiguous()
    draws = choose_tokens(logits, temperature=0.7, top_k=10, generator=g)
    probs = torch.softmax(filter_logits(logits[:1] / 0.7, 10, 1.0), -1)[0]
    freq = torch.bincount(draws, minlength=50).float() / draws.numel()
    assert set(draws.unique().tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    assert torch.nn.functional.cosine_similarity(freq, probs, dim=0) > 0.99


def test_stop_strings_cut_text_and_tokens(model):
    free = fastdebias.generate(model, ["Old people"], max_new_tokens=12)[0]
    assert len(free.text) > 4
    stop = free.text[2:5]
    out = fastdebias.generate(model, ["Old people"], max_new_tokens=12, stop=stop)[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert stop not in out.text
    assert len(out.token_ids) < len(free.token_ids)
    assert free.token_ids[: len(out.token_ids)] == out.token_ids


def test_eos_list_and_finish_reasons(model):
    free = fastdebias.generate(model, PROMPTS, max_new_tokens=8)
    assert all(r.finish_reason == "length" and len(r.token_ids) == 8 for r in free)
    eos = [free[0].token_ids[3], 250]
    out = fastdebias.generate(model, PROMPTS, max_new_tokens=8, eos_token_id=eos)
    assert out[0].finish_reason == "eos" and out[0].token_ids == free[0].token_ids[:4]


def test_stream_callback_concatenates_to_text(model):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    outs = fastdebias.generate(model, ["Old people", "Women and"], max_new_tokens=10,
                               stream=lambda i, s: pieces[i].append(s))
    for i, o in enumerate(outs):
        assert "".join(pieces[i]) == o.text
        assert len(pieces[i]) > 1


def test_batched_with_batch_size_equals_single_batch(model):
    a = fastdebias.generate(model, PROMPTS * 2, max_new_tokens=6)
    b = fastdebias.generate(model, PROMPTS * 2, max_new_tokens=6, batch_size=3)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_text_prompts_are_tokenized_with_defaults(model):
    out = fastdebias.generate(model, "Old people", max_new_tokens=5)[0]
    ids = model.tokenizer("Old people")["input_ids"]
    assert ids[0] == 1  # the tiny tokenizer's BOS, added by its defaults
    assert out.token_ids == fastdebias.generate(model, [ids], max_new_tokens=5)[0].token_ids
    assert out.prompt_tokens == len(ids)


def test_adapter_selection(llama_dir, adapter_qv, adapter_all):
    m = fastdebias.load(llama_dir, [adapter_qv, adapter_all], progress=False)
    assert m.adapter_names == [adapter_qv.name, adapter_all.name]
    first = fastdebias.generate(m, PROMPTS, max_new_tokens=6)
    named = fastdebias.generate(m, PROMPTS, max_new_tokens=6, adapter=adapter_qv.name)
    none = fastdebias.generate(m, PROMPTS, max_new_tokens=6, adapter=None)
    base = fastdebias.load(llama_dir, progress=False)
    assert [r.token_ids for r in first] == [r.token_ids for r in named]
    assert [r.token_ids for r in none] == [r.token_ids for r in fastdebias.generate(base, PROMPTS, max_new_tokens=6)]


def test_srllm_prompt_format_is_exact():
    p = srllm_prompt("Some text.")
    assert p.startswith("<s>\n<<SYS>>You are a text debiasing bot")
    assert "socio-economic biases ,  without any extra outputs<</SYS>>\n" in p
    assert p.endswith("[INST] Debias this text by rephrasing it to be free of bias : Some text. [/INST]\n")
    assert SRLLM_END == "<s/>"


def test_prompt_format_rule(llama_dir, adapter_qv, embedded_dir):
    tiny = fastdebias.load(llama_dir, progress=False)
    assert debias_prompt_format(tiny) == "srllm"  # no chat template
    assert debias_prompt_format(fastdebias.load(llama_dir, adapter_qv, progress=False)) == "srllm"
    smol = fastdebias.load(embedded_dir, progress=False)
    assert debias_prompt_format(smol) == "chat"
    assert debias_prompt_format(smol, "srllm") == "srllm"


def test_chat_prompt_holds_the_worked_examples(embedded_dir):
    """The chat format: the system message, each example as a user turn answered by the assistant, then the text;
    rendered by the model's own chat template, ending where the assistant's answer begins."""
    msgs = chat_messages("Blondes are dumb.")
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * len(CHAT_EXAMPLES) + ["user"]
    assert [m["content"] for m in msgs[2:-1:2]] == [fair for _, fair in CHAT_EXAMPLES]
    assert msgs[-1]["content"].endswith("Sentence: Blondes are dumb.")
    smol = fastdebias.load(embedded_dir, progress=False)
    ids, stops = debias_prompts(smol, ["Blondes are dumb."])
    text = smol.tokenizer.decode(ids[0])
    assert stops == [] and text.endswith("Sentence: Blondes are dumb.<|im_end|>\n<|im_start|>assistant\n")
    pos = [text.index(part) for biased, fair in CHAT_EXAMPLES for part in (biased, fair)]
    assert pos == sorted(pos)


# A template in the style of Mistral's and Gemma's (written for this test): turns must alternate user / assistant
# from a user turn, and a system turn is an error raised from inside the template.
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('turns must alternate') }}{% endif %}"
    "{% if m['role'] == 'user' %}[U] {{ m['content'] }} [/U]{% else %}{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


@pytest.mark.parametrize("template,works", [(ALTERNATING_TEMPLATE, True), ("{% for m in messages %}{{", False)])
def test_chat_template_that_refuses_a_system_turn(llama_dir, tmp_path, template, works):
    """A chat template that allows only alternating user / assistant turns gets the system text at the head of the
    first user turn; one that cannot render the chat at all (here a syntax error) is a TokenizerError naming the
    way out, not the template engine's traceback."""
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    m = fastdebias.load(d, progress=False)
    assert debias_prompt_format(m) == "chat"
    if not works:
        with pytest.raises(fastdebias.TokenizerError, match=r"chat template cannot render.*prompt_format='srllm'"):
            fastdebias.debias(m, ["Old people"], max_new_tokens=2)
        return
    ids, _ = debias_prompts(m, ["Old people"])
    text = m.tokenizer.decode(ids[0])
    assert text.startswith(f"[U] {CHAT_SYSTEM}") and text.count("[U]") == len(CHAT_EXAMPLES) + 1
    assert text.endswith("Sentence: Old people [/U]")  # (673 tokens with this tiny tokenizer: past its context)


def test_debias_srllm_stops_at_literal_marker(llama_dir, adapter_qv):
    m = fastdebias.load(llama_dir, adapter_qv, progress=False)
    raw = fastdebias.generate(m, [srllm_prompt("Old people")], max_new_tokens=20, stop=[SRLLM_END])
    out = fastdebias.debias(m, ["Old people"], max_new_tokens=20)
    assert out[0].text == raw[0].text.strip()
    assert SRLLM_END not in out[0].text


def test_debias_template_override(model):
    out = fastdebias.debias(model, ["Old people"], template="Fix: {text} ->", max_new_tokens=5)
    ref = fastdebias.generate(model, ["Fix: Old people ->"], max_new_tokens=5)
    assert out[0].text == ref[0].text.strip()


def test_embedded_debias_produces_a_rewrite(embedded_dir):
    m = fastdebias.load(embedded_dir, progress=False)
    out = fastdebias.debias(m, ["Women are too emotional to be leaders."], max_new_tokens=40)[0]
    assert out.finish_reason in ("eos", "length")
    assert len(out.text.split()) >= 3


def test_default_batch_size_fits_free_memory(model, monkeypatch):
    """Without batch_size, a job whose batch would not fit half the free memory decodes as many rows as fit, the
    other prompts joining as rows finish (prompts of similar lengths together); the results are the same, in
    order."""
    from fastdebias import runtime

    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 200, 3], PROMPTS[0], [1, 77], [1, 8, 9, 10, 11], [1, 30, 31, 32], [1, 4]]
    whole = fastdebias.generate(model, prompts, max_new_tokens=6)  # all at once (the tiny model fits)
    longest = max(len(p) for p in prompts)
    per_row = runtime.bytes_per_row(model.config, model.dtype, longest, 6)
    cache = model.runner.allocate(2, longest + 6, model.dtype, model.device)
    assert per_row > sum(t.numel() * t.element_size() for t in cache.k + cache.v) / 2  # at least its KV cache
    monkeypatch.setattr(runtime, "available_memory", lambda device: int(3.5 * per_row / runtime.BATCH_MEMORY_FRACTION))
    seen: list[list[int]] = []
    decoded: list[int] = []
    prefill, decode = model.runner.prefill, model.runner.decode

    def spy_prefill(tokens, start, *args, **kw):
        seen.append([tokens.shape[1] - s for s in start.tolist()])  # each row's prompt length
        return prefill(tokens, start, *args, **kw)

    def spy_decode(token, *args, **kw):
        decoded.append(token.shape[0])
        return decode(token, *args, **kw)

    monkeypatch.setattr(model.runner, "prefill", spy_prefill)
    monkeypatch.setattr(model.runner, "decode", spy_decode)
    pieces: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    split = fastdebias.generate(model, prompts, max_new_tokens=6, stream=lambda i, s: pieces[i].append(s))
    assert max(decoded) == 3 and seen[0] == [2, 2, 3]  # 3 fit: the shortest prompts first
    assert sorted(n for b in seen for n in b) == sorted(len(p) for p in prompts)
    assert [r.token_ids for r in split] == [r.token_ids for r in whole]
    assert all("".join(pieces[i]) == r.text for i, r in enumerate(split))
    assert model.runner.default_batch_size(7, longest, 6, model.dtype, model.device) == 3
    monkeypatch.setattr(runtime, "available_memory", lambda device: int(5.5 * per_row / runtime.BATCH_MEMORY_FRACTION))
    assert model.runner.default_batch_size(10, longest, 6, model.dtype, model.device) == 5
    assert model.runner.default_batch_size(4, longest, 6, model.dtype, model.device) == 4
    monkeypatch.setattr(model.runner, "runtime", "cuda_graph")
    assert model.runner.default_batch_size(10, longest, 6, model.dtype, model.device) == 4  # a batch bucket
    assert model.runner.default_batch_size(5, longest, 6, model.dtype, model.device) == 5  # all fit: one batch
    monkeypatch.setattr(runtime, "available_memory", lambda device: 0)
    assert model.runner.default_batch_size(10, longest, 6, model.dtype, model.device) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_min_new_tokens_matches_transformers(llama_dir, backend):
    """EOS banned until a row holds ``min_new_tokens`` tokens, as transformers' ``min_new_tokens``: greedy tokens
    equal ``model.generate``'s, on both backends (the Triton one through its per-row bans, fused lm_head included)."""
    from transformers import AutoModelForCausalLM

    model = fastdebias.load(llama_dir, backend=backend, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    free = fastdebias.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=[])
    eos = [free[0].token_ids[1], free[1].token_ids[2]]  # both rows would end early
    early = fastdebias.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    assert all(len(r.token_ids) <= 3 and r.finish_reason == "eos" for r in early)
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=eos, min_new_tokens=6)
    for p, r in zip(PROMPTS, outs):
        assert len(r.token_ids) >= 6 and not set(r.token_ids[:5]) & set(eos)
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, min_new_tokens=6, eos_token_id=eos,
                          pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
        assert r.token_ids == ref[: len(r.token_ids)] and len(r.token_ids) == len(ref)


def test_min_new_tokens_through_rewinds_sampling_and_joins(model):
    """Sampling, backtracking rewinds (a row's kept length can go back below the minimum) and prompts that join a
    running batch: no result ends with EOS before ``min_new_tokens``; without it, some do."""
    from fastdebias.lexicon import Lexicon

    prompts = PROMPTS + [[1, 8, 9, 10], [1, 77, 78]]
    free = [r.token_ids for r in fastdebias.generate(model, prompts, max_new_tokens=12, eos_token_id=[])]
    phrases = {tuple(r[1:3]) for r in free}
    lex = Lexicon.from_token_sequences({p: float("-inf") for p in phrases})
    kw = dict(max_new_tokens=12, lexicon=lex, batch_size=2)
    for extra in ({}, dict(temperature=1.2, seed=4)):
        run = fastdebias.generate(model, prompts, eos_token_id=[], **kw, **extra)
        # each row's 4th token as EOS (not one inside a phrase: that would stop the phrase, not rewind it)
        eos = sorted({r.token_ids[3] for r in run} - {t for p in phrases for t in p})
        base = fastdebias.generate(model, prompts, eos_token_id=eos, **kw, **extra)
        assert any(r.finish_reason == "eos" and len(r.token_ids) < 7 for r in base)
        outs = fastdebias.generate(model, prompts, eos_token_id=eos, min_new_tokens=7, **kw, **extra)
        if not extra:
            assert any(i.action == "rewound" for r in outs for i in r.interventions)
        for r in outs:
            assert len(r.token_ids) >= 7 or r.finish_reason == "banned", r
            assert not set(r.token_ids[:6]) & set(eos)


@pytest.mark.parametrize("bad", [-1, 11, 2.0, "3", True])
def test_min_new_tokens_bad_values_are_named(model, bad):
    from fastdebias.errors import GenerationError

    with pytest.raises(GenerationError, match=r"min_new_tokens must be an integer from 0 to max_new_tokens=10"):
        fastdebias.generate(model, PROMPTS, max_new_tokens=10, min_new_tokens=bad)


class _VllmPenalties:
    """vLLM's presence/frequency penalties as a transformers logits processor (after its repetition penalty):
    counts of the tokens generated after ``prompt_len``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len:]
        c = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * c - self.presence * (c > 0).to(scores.dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("presence,frequency,rep",
                         [(1.5, 0.0, 1.0), (0.0, 2.0, 1.0), (0.7, 0.9, 1.05), (-1.5, -0.5, 1.5)])  # fmt: skip
def test_presence_frequency_penalties_match_a_transformers_processor(llama_dir, backend, presence, frequency, rep):
    """Greedy tokens equal transformers' ``generate`` with the repetition penalty and vLLM's formula as a processor
    after it, on both backends (the Triton one in its fused lm_head + step and the unfused step)."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = fastdebias.load(llama_dir, backend=backend, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    kw = dict(max_new_tokens=16, eos_token_id=[], repetition_penalty=rep)
    plain = [r.token_ids for r in fastdebias.generate(model, PROMPTS, **kw)]
    got = [r.token_ids for r in fastdebias.generate(model, PROMPTS, presence_penalty=presence,
                                                    frequency_penalty=frequency, **kw)]  # fmt: skip
    assert got != plain
    for p, row in zip(PROMPTS, got):
        procs = LogitsProcessorList([_VllmPenalties(len(p), presence, frequency)])
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16, repetition_penalty=rep,
                          logits_processor=procs, pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
        assert row == ref


def test_penalty_counts_follow_rewinds_and_joins(model, monkeypatch):
    """Backtracking rewinds take their tokens back out of the counts, and rows that join a running batch start from
    their own prompt: whenever rows are read out, each row's context counts equal its prompt's plus its kept
    tokens', and its output counts its kept tokens' alone."""
    import importlib

    from fastdebias.lexicon import Lexicon

    gen = importlib.import_module("fastdebias.generate")  # (fastdebias.generate is the function)

    prompts = PROMPTS + [[1, 8, 9, 10], [1, 77, 78], [1, 5, 6, 7, 8, 9]]
    free = [r.token_ids for r in fastdebias.generate(model, prompts, max_new_tokens=12, eos_token_id=[])]
    lex = Lexicon.from_token_sequences({tuple(r[2:4]): float("-inf") for r in free})
    checked = []
    real = gen._harvest

    def harvest(s, live, finished, rows):
        for i in rows:
            kept = s.out[i, : s.cur[i]]
            v = s.out_counts.shape[1]
            want_out = torch.bincount(kept, minlength=v)
            assert torch.equal(s.out_counts[i].long(), want_out), i
            # (``live`` indexes the call's prompts sorted by length: find the row's prompt by its counts)
            ctx = (s.counts[i] - s.out_counts[i]).long()
            match = [j for j, q in enumerate(prompts) if torch.equal(ctx, torch.bincount(torch.tensor(q), minlength=v))]
            assert len(match) == 1, i
            checked.append(match[0])
        return real(s, live, finished, rows)

    monkeypatch.setattr(gen, "_harvest", harvest)
    outs = fastdebias.generate(model, prompts, max_new_tokens=12, eos_token_id=[], lexicon=lex, batch_size=2,
                               repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5)  # fmt: skip
    assert any(i.action == "rewound" for r in outs for i in r.interventions)
    assert sorted(checked) == list(range(len(prompts)))


@pytest.mark.parametrize("name,bad", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("presence_penalty", "1"),
                                      ("frequency_penalty", float("nan")), ("presence_penalty", True)])
def test_presence_frequency_bad_values_are_named(model, name, bad):
    from fastdebias.errors import GenerationError

    with pytest.raises(GenerationError, match=rf"{name} must be a number in \[-2, 2\]"):
        fastdebias.generate(model, PROMPTS, max_new_tokens=4, **{name: bad})
