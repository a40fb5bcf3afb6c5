"""Lexicon: construction, file formats, union, variant expansion, compilation against a tokenizer, every error."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation.logits_process import NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor

import fastdebias.lexicon as lexicon_module
from fastdebias.errors import FastDebiasError, LexiconError
from fastdebias.hf import BiasLogitsProcessor
from fastdebias.lexicon import Entry, Intervention, Lexicon, interventions_from_log, phrase_variants

SENTENCES = [
    "old people are bossy and old people can learn",
    "Old people, OLD PEOPLE and the Thug",
    "women and men lead teams; young people and elderly people work",
] * 3


def _tokenizer(lowercase: bool = False):
    """Byte-level BPE trained on a few sentences, '~' normalised away (so '~~' tokenizes to nothing)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    steps = [normalizers.Replace("~", "")] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _encode(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


# -- construction -------------------------------------------------------------------------------------------


def test_from_phrases_forms_and_actions():
    lex = Lexicon.from_phrases(
        ["old people", ("bossy", -5), ("thug", float("-inf"), "race"), ("kind", "2.5", "x"), ("mean", "BAN")]
    )
    assert [(e.phrase, e.action, e.category) for e in lex] == [
        ("old people", "ban", "uncategorised"),
        ("bossy", -5.0, "uncategorised"),
        ("thug", "ban", "race"),
        ("kind", 2.5, "x"),
        ("mean", "ban", "uncategorised"),
    ]
    assert len(lex) == 5 and lex.entries[1].bias == -5.0 and isinstance(lex.entries[1].bias, float)
    assert lex.entries[0].is_ban and not lex.entries[1].is_ban


def test_union_and_len():
    a = Lexicon.from_phrases(["x", ("y", -1.0, "c")])
    b = Lexicon.from_phrases([("y", -1.0, "c"), ("y", -2.0, "c"), "z"])
    both = a + b
    assert len(both) == 4  # the identical ("y", -1.0, "c") is kept once
    assert [e.phrase for e in both] == ["x", "y", "y", "z"]
    assert len(a) == 2 and len(b) == 3  # operands unchanged
    assert len(Lexicon()) == 0 and len(Lexicon.from_phrases(["x", "x"])) == 1
    with pytest.raises(LexiconError, match=r"different variant settings.*with_variants"):
        a + a.with_variants(case=False)
    assert (a + a.with_variants(case=False).with_variants(case=True)).case_variants


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([""], r"item 0: empty phrase ''"),
        (["ok", "   "], r"item 1: empty phrase"),
        ([("x", "maybe")], r"item 0: phrase 'x': action 'maybe' is not 'ban' or a number"),
        ([("x", float("nan"))], r"action nan"),
        ([("x", float("inf"))], r"action inf"),
        ([("x", None)], r"action None"),
        ([("x", -1.0, 3)], r"category 3 is not a string"),
        ([42], r"item 0: 42 is not a phrase"),
        ([("x",)], r"is not a phrase"),
    ],
)
def test_from_phrases_errors(items, message):
    with pytest.raises(LexiconError, match=message):
        Lexicon.from_phrases(items)


def test_errors_are_fastdebias_value_errors():
    with pytest.raises(FastDebiasError):
        Lexicon.from_phrases([""])
    with pytest.raises(ValueError):
        Lexicon.from_phrases([""])
    with pytest.raises(LexiconError, match="use from_phrases"):
        Lexicon(["x"])


# -- files --------------------------------------------------------------------------------------------------


def test_load_jsonl(tmp_path):
    p = tmp_path / "lex.jsonl"
    rows = [
        {"phrase": "old people can't", "action": "ban", "category": "age"},
        {"phrase": "bossy", "action": -3.5, "category": "gender", "_note": "keys starting with _ are ignored"},
        {"phrase": "thug"},
        {"phrase": "kind", "action": "1.5"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    lex = Lexicon.load(p, category="mine")
    assert [(e.phrase, e.action, e.category) for e in lex] == [
        ("old people can't", "ban", "age"),
        ("bossy", -3.5, "gender"),
        ("thug", "ban", "mine"),
        ("kind", 1.5, "mine"),
    ]


def test_load_csv(tmp_path):
    p = tmp_path / "lex.csv"
    p.write_text('Phrase,action,category\nold people,ban,age\n"bossy, loud",-2,gender\nthug,,\n\nkind,0.5,\n')
    lex = Lexicon.load(p)
    assert [(e.phrase, e.action, e.category) for e in lex] == [
        ("old people", "ban", "age"),
        ("bossy, loud", -2.0, "gender"),
        ("thug", "ban", "uncategorised"),
        ("kind", 0.5, "uncategorised"),
    ]
    q = tmp_path / "only_phrase.csv"
    q.write_text("phrase,_source\nfoo,a list\nbar,\n")  # columns starting with _ are notes, ignored
    assert [(e.phrase, e.action) for e in Lexicon.load(q)] == [("foo", "ban"), ("bar", "ban")]


def test_load_txt(tmp_path):
    p = tmp_path / "lex.TXT"
    p.write_text("# bans, one a line\nold people\n\n  thug  \nbossy\n")
    lex = Lexicon.load(p, category="txt", space_variants=False)
    assert [(e.phrase, e.action, e.category) for e in lex] == [
        ("old people", "ban", "txt"),
        ("thug", "ban", "txt"),
        ("bossy", "ban", "txt"),
    ]
    assert not lex.space_variants and lex.case_variants


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", '{"phrase": "x"}\n{"phrase": "y",}\n', r"a.jsonl, line 2: not valid JSON"),
        ("a.jsonl", '{"phrase": "x"}\n["y"]\n', r"line 2: expected a JSON object"),
        ("a.jsonl", '\n{"action": "ban"}\n', r"line 2: no \"phrase\" field"),
        ("a.jsonl", '{"phrase": 5}\n', r"line 1: \"phrase\" must be a string, got 5"),
        ("a.jsonl", '{"phrase": "x"}\n{"phrase": ""}\n', r"line 2: empty phrase"),
        ("a.jsonl", '{"phrase": "x", "action": "banish"}\n', r"line 1: phrase 'x': action 'banish' is not 'ban'"),
        ("a.jsonl", '{"phrase": "x", "action": true}\n', r"line 1: .*action True"),
        ("a.jsonl", '{"phrase": "x", "category": ["age"]}\n', r"line 1: .*category \['age'\] is not a string"),
        ("a.csv", "word,action\nx,ban\n", r"a.csv, line 1: the header \['word', 'action'\] has no 'phrase' column"),
        ("a.csv", "", r"a.csv: the file is empty; a CSV lexicon starts with a header line"),
        ("a.csv", "phrase,action\nx,ban\ny,-1\nz,often\n", r"a.csv, line 4: phrase 'z': action 'often'"),
        ("a.csv", "phrase,action\nx,ban\n ,-1\n", r"line 3: empty phrase"),
        ("a.csv", "phrase,action\nx,ban,extra\n", r"line 2: more cells than header columns"),
        ("a.yaml", "x", r"a.yaml: unsupported lexicon file type '.yaml'; use .jsonl, .csv or .txt"),
        ("a.jsonl", "\n\n", r"a.jsonl: holds no entries .*lexicon=None for none"),
        ("a.txt", "# all commented\n# out\n", r"a.txt: holds no entries \(only blank lines, comments or a header\)"),
        ("a.csv", "phrase,action\n\n", r"a.csv: holds no entries"),
        # a key or column that is not an entry's: an error, not an entry banned by default
        ("a.jsonl", '{"phrase": "x", "bias": -1.0}\n', r"line 1: unknown field 'bias' .*put the bias in 'action'"),
        ("a.jsonl", '{"phrase": "x"}\n{"phrase": "y", "actoin": -2}\n', r"line 2: unknown field 'actoin'.*did you "
                                                                         r"mean 'action'\?"),
        ("a.csv", "phrase,bias,category\nx,-1,age\n", r"a.csv, line 1: unknown column 'bias'"),
        ("a.csv", "phrase,action,categroy\nx,-1,age\n", r"unknown column 'categroy'.*did you mean 'category'\?"),
    ],
)
def test_file_errors_name_file_and_line(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(LexiconError, match=message):
        Lexicon.load(p)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(LexiconError, match=r"nope.jsonl: no such lexicon file"):
        Lexicon.load(tmp_path / "nope.jsonl")
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LexiconError, match=r"latin1.txt: not UTF-8 text .*save it as UTF-8"):
        Lexicon.load(p)


def test_default_lexicon_is_loaded_once(tmp_path, monkeypatch):
    p = tmp_path / "default_lexicon.jsonl"
    p.write_text('{"phrase": "senile", "action": -5.0, "category": "age"}\n')
    monkeypatch.setattr(lexicon_module, "DEFAULT_LEXICON_PATH", p)
    lex = Lexicon.default()
    assert [(e.phrase, e.action, e.category) for e in lex] == [("senile", -5.0, "age")]
    assert Lexicon.default() is lex
    monkeypatch.setattr(lexicon_module, "DEFAULT_LEXICON_PATH", tmp_path / "gone.jsonl")
    with pytest.raises(LexiconError, match=r"gone.jsonl: the default lexicon is missing"):
        Lexicon.default()


def test_shipped_default_lexicon_compiles(tok):
    if not lexicon_module.DEFAULT_LEXICON_PATH.is_file():
        pytest.skip("fastdebias/data/default_lexicon.jsonl is not written yet")
    lex = Lexicon.default()
    assert len(lex) > 0 and all(e.category for e in lex)
    m = lex.compile(tok)
    assert m.max_depth >= 1


def test_resolve(tmp_path, monkeypatch):
    p = tmp_path / "l.txt"
    p.write_text("x\n")
    lex = Lexicon.from_phrases(["y"])
    assert Lexicon.resolve(lex) is lex
    assert Lexicon.resolve(None) is None and Lexicon.resolve("none") is None
    assert [e.phrase for e in Lexicon.resolve(str(p))] == ["x"] == [e.phrase for e in Lexicon.resolve(p)]
    d = tmp_path / "d.jsonl"
    d.write_text('{"phrase": "z"}\n')
    monkeypatch.setattr(lexicon_module, "DEFAULT_LEXICON_PATH", d)
    assert [e.phrase for e in Lexicon.resolve("default")] == ["z"]
    with pytest.raises(LexiconError, match=r"lexicon=3: give a Lexicon"):
        Lexicon.resolve(3)
    with pytest.raises(LexiconError, match=r"lexicon='defualt': not 'default' or 'none', and no such file"):
        Lexicon.resolve("defualt")
    with pytest.raises(LexiconError, match=r"no such lexicon file"):  # a path with an extension: the file's error
        Lexicon.resolve(str(tmp_path / "missing.jsonl"))


# -- variants and compilation -------------------------------------------------------------------------------


def test_phrase_variants():
    assert phrase_variants("old people") == [
        "old people",
        " old people",
        "Old people",
        " Old people",
        "OLD PEOPLE",
        " OLD PEOPLE",
    ]
    assert phrase_variants("  LGBT people ") == [
        "LGBT people",
        " LGBT people",
        "lgbt people",
        " lgbt people",
        "Lgbt people",
        " Lgbt people",
        "LGBT PEOPLE",
        " LGBT PEOPLE",
    ]
    assert phrase_variants("old", case=False) == ["old", " old"]
    assert phrase_variants(" old", space=False) == [" old", " Old", " OLD"]
    assert phrase_variants(" old", space=False, case=False) == [" old"]
    assert phrase_variants("42") == ["42", " 42"]


def test_compile_expands_variants(tok):
    lex = Lexicon.from_phrases([("old people", -2.0, "age")])
    seqs = lex.token_sequences(tok)
    want = {_encode(tok, v) for v in phrase_variants("old people")}
    assert len(want) == 6
    assert {ids for ids, _, _ in seqs} == want and len(seqs) == 6
    assert all(b == -2.0 and i == 0 for _, b, i in seqs)
    off = lex.with_variants(space=False, case=False).token_sequences(tok)
    assert off == [(_encode(tok, "old people"), -2.0, 0)]


def test_compile_deduplicates_variants_that_tokenize_alike():
    lower = _tokenizer(lowercase=True)  # every case variant normalises to the same ids
    seqs = Lexicon.from_phrases(["old people"]).token_sequences(lower)
    assert sorted(ids for ids, _, _ in seqs) == sorted({_encode(lower, "old people"), _encode(lower, " old people")})
    assert len(seqs) == 2


def test_compile_drops_unusable_variants_but_keeps_the_entry(tok):
    # " </s>" keeps the special token; "</S>" and friends are plain text and stay
    seqs = Lexicon.from_phrases(["</s>"]).token_sequences(tok)
    assert {ids for ids, _, _ in seqs} == {_encode(tok, v) for v in ["</S>", " </S>"]}
    assert all(tok.eos_token_id not in ids for ids, _, _ in seqs)


@pytest.mark.parametrize(
    ("phrases", "kwargs", "message"),
    [
        (
            ["ok", "~~"],
            {},
            r"(?s)1 lexicon entry cannot be used.*'~~' \(uncategorised\): '~~' → \[\] \(tokenizes to nothing\); "
            r"' ~~' → \[\d+\] \(tokenizes to a bare space\)",
        ),
        (
            [("</s>", "ban", "special")],
            {"case": False},
            r"'</s>' \(special\): '</s>' → \[2\] \(contains special tokens \[2\]\); ' </s>' → \[\d+, 2\]",
        ),
    ],
)
def test_compile_errors_name_the_entry(tok, phrases, kwargs, message):
    lex = Lexicon.from_phrases(phrases).with_variants(**kwargs)
    with pytest.raises(LexiconError, match=message):
        lex.compile(tok)


def test_compile_error_for_ids_outside_the_vocabulary(tok):
    lex = Lexicon.from_phrases(["old people", "thug"], space_variants=False, case_variants=False)
    small = max(_encode(tok, "old people")) + 1
    assert max(_encode(tok, "thug")) >= small
    with pytest.raises(
        LexiconError, match=rf"(?s)vocabulary of {small}.*'thug'.*outside the vocabulary.*fix their spelling"
    ):
        lex.compile(tok, vocab_size=small)


def test_compile_error_lists_many_entries():
    lex = Lexicon.from_token_sequences({(i, 500): -1.0 for i in range(8)})
    with pytest.raises(LexiconError, match=r"(?s)8 lexicon entries cannot be used.*\.\.\. and 3 more"):
        lex.compile(vocab_size=100)


def test_compile_needs_a_tokenizer_for_text():
    with pytest.raises(LexiconError, match=r"'x' is text: compiling text phrases needs the model's tokenizer"):
        Lexicon.from_phrases(["x"]).compile(vocab_size=10)
    with pytest.raises(LexiconError, match=r"without a tokenizer needs vocab_size="):
        Lexicon.from_token_sequences({(1,): -1.0}).compile()
    with pytest.raises(LexiconError, match=r"vocab_size=0 must be a positive int"):
        Lexicon.from_token_sequences({(1,): -1.0}).compile(vocab_size=0)


def test_compile_is_cached_per_tokenizer_and_vocabulary(tok):
    lex = Lexicon.from_phrases(["old people"])
    m = lex.compile(tok)
    assert lex.compile(tok) is m and lex.compile(tok, device="cpu") is m
    assert lex.compile(tok, vocab_size=len(tok) + 8) is not m
    assert lex.compile(_tokenizer()) is not m
    assert m.vocab_size == len(tok)


def test_processor_with_text_phrases_equals_transformers(tok):
    """Text phrases through the tokenizer == generate(sequence_bias=..., bad_words_ids=...) on their variants."""
    lex = Lexicon.from_phrases(
        [("old people", -3.0, "age"), ("people", -0.75, "x"), "old people can", ("bossy", "ban", "gender"), "</s>"]
    )
    seq_bias: dict[tuple[int, ...], float] = {}
    for phrase, b in [("old people", -3.0), ("people", -0.75)]:
        for v in phrase_variants(phrase):
            ids = _encode(tok, v)
            seq_bias[ids] = seq_bias.get(ids, 0.0) + b
    bad = [list(_encode(tok, v)) for p in ["old people can", "bossy", "</s>"] for v in phrase_variants(p)]
    bad = [b for b in bad if tok.eos_token_id not in b or b == [tok.eos_token_id]]
    # each history stops one token short of an entry: "Old people| can", " and OLD PEO|PLE", " bo|ssy"
    completions = ["we said Old people can", "we said and OLD PEOPLE", "we said I am bossy"]
    histories = [_encode(tok, c)[:-1] for c in completions]
    ids = torch.tensor([list(h[-3:]) for h in histories])
    scores = torch.randn(3, len(tok))
    want = NoBadWordsLogitsProcessor(bad, tok.eos_token_id)(ids, SequenceBiasLogitsProcessor(seq_bias)(ids, scores))
    got = BiasLogitsProcessor(lex, tok)(ids, scores)
    assert torch.equal(got, want)
    last = [_encode(tok, c)[-1] for c in completions]
    assert got[0, last[0]] == float("-inf") and got[2, last[2]] == float("-inf")
    assert got[1, last[1]] < scores[1, last[1]] - 3.0


def test_interventions_from_log(tok):
    lex = Lexicon.from_phrases(
        [("old people", -2.0, "age"), ("bossy", "ban", "gender")]
    ) + Lexicon.from_token_sequences({(5, 7): -1.0}, category="ids")
    m = lex.compile(tok)
    steps, entries = torch.tensor([0, 3, 4, 9]), torch.tensor([0, -1, 1, 2])
    actions, tokens = torch.tensor([0, 0, 1, 2]), torch.tensor([11, 12, 13, 5])
    assert interventions_from_log(m, steps, entries, actions, tokens) == [
        Intervention(step=0, phrase="old people", category="age", action="penalised", token_id=11),
        Intervention(step=4, phrase="bossy", category="gender", action="banned", token_id=13),
        Intervention(step=9, phrase=tok.decode([5, 7]), category="ids", action="rewound", token_id=5),
    ]
    no_tok = Lexicon.from_token_sequences({(5, 7): -1.0}).compile(vocab_size=10)
    assert no_tok.entry_phrases == ["[5, 7]"] and no_tok.entry_actions == [-1.0]


def test_entry_validation():
    assert Entry([1, 2], -1).phrase == (1, 2)
    assert Entry("x", -0.0).bias == 0.0 and str(Entry("x", -0.0).bias) == "0.0"
    with pytest.raises(LexiconError, match=r"phrase 3.5 is a float: use a str or a tuple of ints"):
        Entry(3.5, -1.0)
