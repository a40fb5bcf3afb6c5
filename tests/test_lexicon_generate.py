"""The lexicon inside generate: "hf" parity with transformers, "backtrack" guarantees, interventions."""

from __future__ import annotations

import pytest
import torch

import fastdebias
from fastdebias.lexicon import Lexicon

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12], [1, 77]]
NEW = 12


@pytest.fixture(scope="module")
def model(llama_dir):
    return fastdebias.load(llama_dir, progress=False)


def free_run(model, prompts=PROMPTS, **kw):
    return [r.token_ids for r in fastdebias.generate(model, prompts, max_new_tokens=NEW, **kw)]


def contains(seq, phrase):
    n = len(phrase)
    return any(tuple(seq[i:i + n]) == tuple(phrase) for i in range(len(seq) - n + 1))


def test_hf_mode_matches_transformers_sequence_bias(llama_dir, model):
    from transformers import AutoModelForCausalLM

    free = free_run(model)
    row = free[0]
    lex = Lexicon.from_token_sequences({(row[2], row[3]): float("-inf"), (row[5],): -2.5, (row[1], row[7]): 1.5})
    got = [r.token_ids for r in fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, lexicon=lex,
                                                    lexicon_mode="hf")]
    m = lex.compile(model.tokenizer, vocab_size=model.config.vocab_size, eos_token_id=model.eos_token_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    ref = hf.generate(torch.tensor(PROMPTS[:1]), do_sample=False, max_new_tokens=NEW, pad_token_id=0,
                      sequence_bias=m.hf_sequence_bias(), bad_words_ids=m.hf_bad_words_ids() or None)
    ref = ref[0, len(PROMPTS[0]):].tolist()
    assert got[0] == ref[: len(got[0])]
    assert got[0] != row  # the lexicon changed the output


def test_backtrack_never_emits_a_banned_phrase_and_hf_can_garble(model):
    free = free_run(model)
    phrases = {tuple(r[3:5]) for r in free} | {tuple(r[6:9]) for r in free}
    lex = Lexicon.from_token_sequences({p: float("-inf") for p in phrases})
    for seed in range(20):
        kw = dict(temperature=0.0) if seed == 0 else dict(temperature=1.0, seed=seed)
        outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, lexicon=lex, **kw)
        for o in outs:
            assert not any(contains(o.token_ids, p) for p in phrases), (o.token_ids, phrases)
    greedy = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, lexicon=lex)
    assert any(i.action == "rewound" for o in greedy for i in o.interventions)
    for o in greedy:
        for i in o.interventions:
            if i.action == "rewound":
                assert o.token_ids[i.step] != i.token_id  # the phrase's first token is banned at that position


def test_backtrack_identical_when_no_entry_is_reachable(model):
    free = free_run(model)
    seen = {t for r in free for t in r}
    unused = [t for t in range(3, 251) if t not in seen][:3]
    lex = Lexicon.from_token_sequences({(unused[0], unused[1]): float("-inf"), (unused[2], 5, 6): float("-inf")})
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, lexicon=lex)
    assert [o.token_ids for o in outs] == free
    assert all(o.interventions == [] for o in outs)


def test_rows_that_never_rewind_are_unaffected(model):
    free = free_run(model)
    lex = Lexicon.from_token_sequences({tuple(free[1][2:4]): float("-inf")})
    outs = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, lexicon=lex)
    rewound = [any(i.action == "rewound" for i in o.interventions) for o in outs]
    assert rewound[1]
    for i, o in enumerate(outs):
        if not rewound[i] and not contains(free[i], free[1][2:4]):
            assert o.token_ids == free[i]


def test_rewind_budget_falls_back_to_hf_masking(model):
    free = free_run(model)
    phrase = tuple(free[0][2:4])
    lex = Lexicon.from_token_sequences({phrase: float("-inf")})
    hf = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, lexicon=lex, lexicon_mode="hf")[0]
    zero = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, lexicon=lex, max_rewinds=0)[0]
    assert zero.token_ids == hf.token_ids
    assert not any(i.action == "rewound" for i in zero.interventions)
    assert hf.token_ids[:2] == free[0][:2] and hf.token_ids[3] != free[0][3]  # only the last token masked


def test_penalties_logged_and_equal_in_both_modes(model):
    free = free_run(model)
    lex = Lexicon.from_token_sequences({(free[0][1],): -0.01})  # tiny: the token is still chosen
    a = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, lexicon=lex)[0]
    b = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, lexicon=lex, lexicon_mode="hf")[0]
    assert a.token_ids == b.token_ids == free[0]
    assert [i.step for i in a.interventions if i.action == "penalised"] == [
        j for j, t in enumerate(free[0]) if t == free[0][1]
    ]


@pytest.mark.parametrize("mode", ["backtrack", "hf"])
def test_displaced_first_choice_logged_at_its_step(model, mode):
    """A ban that displaces the model's own first choice is logged at the step where it did, with that token."""
    free = free_run(model)
    j = 2
    lex = Lexicon.from_token_sequences({(free[0][j],): float("-inf")})
    out = fastdebias.generate(model, PROMPTS[:1], max_new_tokens=NEW, lexicon=lex, lexicon_mode=mode)[0]
    assert out.token_ids[:j] == free[0][:j] and out.token_ids[j] != free[0][j]
    first = [i for i in out.interventions if i.action == "banned"][0]
    assert (first.step, first.token_id) == (j, free[0][j])


def test_all_banned_row_finishes_with_reason(model):
    lex = Lexicon.from_token_sequences({(t,): float("-inf") for t in range(251)})
    outs = fastdebias.generate(model, PROMPTS[:2], max_new_tokens=5, lexicon=lex, eos_token_id=[])
    assert all(o.finish_reason == "banned" and o.token_ids == [] for o in outs)


def test_repetition_penalty_with_lexicon_and_rewinds(model):
    free = free_run(model, repetition_penalty=1.3)
    phrase = tuple(free[2][1:3])
    lex = Lexicon.from_token_sequences({phrase: float("-inf")})
    out = fastdebias.generate(model, PROMPTS, max_new_tokens=NEW, lexicon=lex, repetition_penalty=1.3)
    assert all(not contains(o.token_ids, phrase) for o in out)


def test_lexicon_argument_forms(model, tmp_path):
    f = tmp_path / "lex.txt"
    f.write_text("people\n")
    a = fastdebias.generate(model, ["Old"], max_new_tokens=4, lexicon=str(f))
    b = fastdebias.generate(model, ["Old"], max_new_tokens=4, lexicon=Lexicon.load(f))
    assert a[0].token_ids == b[0].token_ids
    with pytest.raises(fastdebias.GenerationError, match="lexicon_mode"):
        fastdebias.generate(model, ["Old"], lexicon=str(f), lexicon_mode="mask")


def test_embedded_debias_reports_interventions(embedded_dir):
    m = fastdebias.load(embedded_dir, progress=False)
    out = fastdebias.debias(m, ["Poor people are lazy and do not want to work."], max_new_tokens=40)[0]
    assert out.interventions, "the default lexicon should fire on this sentence"
    lex = Lexicon.default()
    assert all(i.category in {e.category for e in lex} for i in out.interventions)
    assert "poor people are lazy" not in out.text.lower()


def test_embedded_hf_mode_matches_transformers_with_default_lexicon(embedded_dir):
    from transformers import AutoModelForCausalLM

    m = fastdebias.load(embedded_dir, progress=False)
    tok = m.tokenizer
    from fastdebias.generate import debias_prompts

    ids = debias_prompts(m, ["Poor people are lazy and do not want to work."])[0][0]
    lex = Lexicon.default()
    got = fastdebias.generate(m, [ids], max_new_tokens=24, lexicon=lex, lexicon_mode="hf")[0]
    matcher = lex.compile(tok, vocab_size=m.config.vocab_size, eos_token_id=m.eos_token_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, pad_token_id=2,
                      sequence_bias=matcher.hf_sequence_bias(), bad_words_ids=matcher.hf_bad_words_ids())
    ref = ref[0, len(ids):].tolist()
    assert got.token_ids == ref[: len(got.token_ids)]
    free = fastdebias.generate(m, [ids], max_new_tokens=24)[0]
    assert got.token_ids != free.token_ids and got.interventions  # the lexicon took part
