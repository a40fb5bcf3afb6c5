"""The compiled phrase matcher and BiasLogitsProcessor against transformers' own processors, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor

from fastdebias.errors import LexiconError
from fastdebias.hf import BiasLogitsProcessor
from fastdebias.lexicon import Lexicon
from fastdebias.matcher import build_matcher

V = 7  # a tiny vocabulary so that random entries share prefixes, overlap and repeat tokens
EOS = 2
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tokens = st.integers(0, V - 1)
sequences = st.lists(tokens, min_size=1, max_size=6).map(tuple)


@st.composite
def token_lexicons(draw, min_size: int = 1) -> list[tuple[int, ...]]:
    """Distinct id sequences of length 1-6 with suffixes, prefixes, extensions and runs of one token mixed in."""
    base = draw(st.lists(sequences, min_size=min_size, max_size=10, unique=True))
    derived = []
    for s in base:
        kind = draw(st.sampled_from(["none", "suffix", "prefix", "extend", "repeat"]))
        if kind == "suffix" and len(s) > 1:
            derived.append(s[draw(st.integers(1, len(s) - 1)) :])
        elif kind == "prefix" and len(s) > 1:
            derived.append(s[: draw(st.integers(1, len(s) - 1))])
        elif kind == "extend" and len(s) < 6:
            derived.append(s + (draw(tokens),))
        elif kind == "repeat":
            derived.append((draw(tokens),) * draw(st.integers(1, 6)))
    return list(dict.fromkeys(base + derived))


@st.composite
def histories(draw, lexicon: list[tuple[int, ...]]) -> torch.Tensor:
    """[B, T] ids built from lexicon sequences and random tokens, so that entries match often."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 12))
    rows = []
    for _ in range(b):
        row: list[int] = []
        while len(row) < t:
            row += list(draw(st.sampled_from(lexicon))) if draw(st.booleans()) else [draw(tokens)]
        rows.append(row[-t:])
    return torch.tensor(rows)


def random_scores(shape: tuple[int, int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g) * 4
    scores[torch.rand(shape, generator=g) < 0.1] = float("-inf")
    return scores.to(dtype)


def _transformers_matches_by_prefix() -> bool:
    """Whether the installed transformers applies a sequence_bias entry once the context holds the entry's prefix
    (and sums the entries grouped by prefix length), as 5.23 does and fastdebias' "hf" mode reproduces. Older 5.x
    releases (5.17, on the GPU machine) wait for a context as long as the whole entry, and sum entry by entry."""
    out = SequenceBiasLogitsProcessor({(5, 6): -1.0})(torch.tensor([[5]]), torch.zeros(1, V))
    return out[0, 6].item() == -1.0


# bit-for-bit comparisons with transformers' sequence_bias / bad_words_ids: against the rule fastdebias follows
SAME_RULE = pytest.mark.skipif(
    not _transformers_matches_by_prefix(),
    reason="this transformers matches sequence_bias entries by whole length (an older 5.x; 5.23 matches by prefix)",
)

biases = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
# quarters: every sum of a few of them is exact in fp32, whatever the order of the additions
dyadic = st.integers(-40, 40).map(lambda i: i / 4)


@SAME_RULE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@SETTINGS
@given(data=st.data())
def test_penalties_equal_sequence_bias(dtype, data):
    lex = data.draw(token_lexicons())
    seq_bias = {ids: data.draw(biases) for ids in lex}
    ids = data.draw(histories(lex))
    scores = random_scores((ids.shape[0], V), data.draw(st.integers(0, 2**31)), dtype)
    want = SequenceBiasLogitsProcessor(seq_bias)(ids, scores)
    got = BiasLogitsProcessor(Lexicon.from_token_sequences(seq_bias))(ids, scores)
    assert got.dtype == dtype
    assert torch.equal(got, want)


@SAME_RULE
def test_overlapping_penalties_are_summed_in_transformers_order():
    """Nested suffixes that all fire on one token: fp32 sums of 3+ terms depend on the order of the additions,
    which transformers fixes (length-1 first, prefix-length groups in first-seen order, dict order within)."""
    rng = random.Random(0)
    for _ in range(200):
        chain = [rng.randrange(V) for _ in range(6)]  # entries chain[k:] are suffixes of one another
        seqs = [tuple(chain[k:]) for k in range(6)] + [tuple(chain[k:-1]) + (rng.randrange(V),) for k in range(5)]
        rng.shuffle(seqs)
        seq_bias = {s: rng.uniform(-10, 10) for s in seqs}
        ids = torch.tensor([chain[:-1], [rng.randrange(V) for _ in range(5)]])
        scores = random_scores((2, V), rng.randrange(2**31))
        want = SequenceBiasLogitsProcessor(seq_bias)(ids, scores)
        assert torch.equal(BiasLogitsProcessor(Lexicon.from_token_sequences(seq_bias))(ids, scores), want)


@SAME_RULE
@SETTINGS
@given(data=st.data(), eos=st.sampled_from([None, EOS, [EOS, 3]]))
def test_bans_equal_no_bad_words(data, eos):
    lex = data.draw(token_lexicons())
    bad_words = [list(s) for s in lex] + [[EOS]] + data.draw(st.lists(st.sampled_from(lex).map(list), max_size=3))
    ids = data.draw(histories(lex))
    scores = random_scores((ids.shape[0], V), data.draw(st.integers(0, 2**31)))
    want = NoBadWordsLogitsProcessor(bad_words, eos_token_id=eos)(ids, scores)
    proc = BiasLogitsProcessor(Lexicon.from_token_sequences(bad_words), eos_token_id=eos if eos is not None else ())
    assert torch.equal(proc(ids, scores), want)


@SAME_RULE
@SETTINGS
@given(data=st.data())
def test_penalties_and_bans_equal_generate_chain(data):
    """generate(sequence_bias=..., bad_words_ids=...) runs SequenceBias then NoBadWords: one matcher does both."""
    lex = data.draw(token_lexicons(min_size=2))
    split = data.draw(st.integers(1, len(lex) - 1))
    seq_bias = {ids: data.draw(biases) for ids in lex[:split]}
    # bans overlap the penalties too: the same ids may be both penalised and banned
    bad_words = [list(s) for s in lex[split:]] + data.draw(st.lists(st.sampled_from(lex[:split]).map(list)))
    ids = data.draw(histories(lex))
    scores = random_scores((ids.shape[0], V), data.draw(st.integers(0, 2**31)))
    want = NoBadWordsLogitsProcessor(bad_words, eos_token_id=EOS)(
        ids, SequenceBiasLogitsProcessor(seq_bias)(ids, scores)
    )
    lexicon = Lexicon.from_token_sequences(seq_bias) + Lexicon.from_token_sequences(bad_words)
    proc = BiasLogitsProcessor(lexicon, eos_token_id=EOS)
    assert torch.equal(proc(ids, scores), want)
    m = proc.matcher(V)
    assert m.hf_sequence_bias() == seq_bias
    assert {tuple(b) for b in m.hf_bad_words_ids()} == {tuple(b) for b in bad_words if b != [EOS]}


@SAME_RULE
@SETTINGS
@given(data=st.data())
def test_sequence_bias_with_infinite_entries(data):
    """A sequence_bias dict holding -inf values: the -inf entries ban, as in transformers (no EOS to drop)."""
    lex = data.draw(token_lexicons())
    seq_bias = {ids: data.draw(st.one_of(dyadic, st.just(float("-inf")))) for ids in lex}
    ids = data.draw(histories(lex))
    scores = random_scores((ids.shape[0], V), data.draw(st.integers(0, 2**31)))
    want = SequenceBiasLogitsProcessor(seq_bias)(ids, scores)
    assert torch.equal(BiasLogitsProcessor(Lexicon.from_token_sequences(seq_bias))(ids, scores), want)


def _longest_state_suffix(history: list[int], lex: list[tuple[int, ...]]) -> int:
    """Oracle: length of the longest suffix of the history that is a prefix of some entry's prefix."""
    prefixes = {s[:k] for s in lex if len(s) > 1 for k in range(1, len(s))}
    return max((k for k in range(1, len(history) + 1) if tuple(history[-k:]) in prefixes), default=0)


@SETTINGS
@given(data=st.data())
def test_incremental_steps_equal_from_scratch(data):
    lex = data.draw(token_lexicons())
    m = Lexicon.from_token_sequences(lex).compile(vocab_size=V)
    ids = data.draw(histories(lex))
    states = torch.zeros(ids.shape[0], dtype=torch.int64)
    for j in range(ids.shape[1]):
        states = m.step(states, ids[:, j])
        assert torch.equal(states, m.init_states(ids[:, : j + 1]))
        for r in range(ids.shape[0]):
            assert m.depth[states[r]] == _longest_state_suffix(ids[r, : j + 1].tolist(), lex)


@SETTINGS
@given(data=st.data())
def test_left_padding_is_skipped(data):
    lex = data.draw(token_lexicons())
    m = Lexicon.from_token_sequences(lex).compile(vocab_size=V)
    ids = data.draw(histories(lex))
    pads = data.draw(st.lists(st.integers(0, ids.shape[1] - 1), min_size=ids.shape[0], max_size=ids.shape[0]))
    padded, mask = ids.clone(), torch.ones_like(ids)
    for r, n in enumerate(pads):
        # row r holds its last T - n tokens after n padding positions, whose ids would change the state if read
        padded[r, :n] = data.draw(tokens)
        mask[r, :n] = 0
    got = m.init_states(padded, mask)
    for r, n in enumerate(pads):
        assert got[r] == m.init_states(ids[r : r + 1, n:])[0]


def _firing(history: list[int], seqs: list[tuple[int, ...]], token: int) -> list[int]:
    """Oracle: indices of the sequences that bias ``token`` after ``history``."""
    return [
        i
        for i, s in enumerate(seqs)
        if s[-1] == token and len(s) - 1 <= len(history) and tuple(history[len(history) - len(s) + 1 :]) == s[:-1]
    ]


@SETTINGS
@given(data=st.data())
def test_lookup_bias_ban_length_and_entry(data):
    lex = data.draw(token_lexicons())
    kinds = [data.draw(st.sampled_from(["ban", "pen"])) for _ in lex]
    table = {ids: (float("-inf") if k == "ban" else data.draw(biases)) for ids, k in zip(lex, kinds)}
    m = Lexicon.from_token_sequences(table).compile(vocab_size=V, eos_token_id=())
    ids = data.draw(histories(lex))
    states = m.init_states(ids)
    applied = m.apply(torch.zeros(ids.shape[0], V), states)
    for t in range(V):
        bias, ban_len, entry = m.lookup(states, torch.full((ids.shape[0],), t))
        assert torch.equal(bias, applied[:, t])
        for r in range(ids.shape[0]):
            fired = _firing(ids[r].tolist(), lex, t)
            bans = [i for i in fired if kinds[i] == "ban"]
            if bans:
                want_len, want_entry = min((len(lex[i]), i) for i in bans)
            elif fired:
                want_len, want_entry = 0, max(fired, key=lambda i: len(lex[i]))
            else:
                want_len, want_entry = 0, -1
            assert (ban_len[r].item(), entry[r].item()) == (want_len, want_entry)


@SAME_RULE
@SETTINGS
@given(data=st.data())
def test_mask_phrases_false_keeps_penalties_and_single_token_bans(data):
    lex = data.draw(token_lexicons(min_size=2))
    split = data.draw(st.integers(1, len(lex) - 1))
    seq_bias = {s: data.draw(biases) for s in lex[:split]}
    bans = lex[split:]
    m = (Lexicon.from_token_sequences(seq_bias) + Lexicon.from_token_sequences([list(s) for s in bans])).compile(
        vocab_size=V, eos_token_id=()
    )
    ids = data.draw(histories(lex))
    scores = random_scores((ids.shape[0], V), data.draw(st.integers(0, 2**31)))
    want = SequenceBiasLogitsProcessor(seq_bias)(ids, scores)
    single = [list(s) for s in bans if len(s) == 1]
    if single:
        want = NoBadWordsLogitsProcessor(single)(ids, want)
    states = m.init_states(ids)
    soft = m.apply(scores, states, mask_phrases=False)
    assert torch.equal(soft, want)
    # per row: a [B] bool picks "hf" masking for some rows and leaves the others alone
    rows = torch.tensor(data.draw(st.lists(st.booleans(), min_size=ids.shape[0], max_size=ids.shape[0])))
    hf = m.apply(scores, states)
    assert torch.equal(m.apply(scores, states, mask_phrases=rows), torch.where(rows[:, None], hf, soft))
    zeros = torch.zeros_like(scores)
    hf0, soft0 = m.apply(zeros, states), m.apply(zeros, states, mask_phrases=False)
    for t in range(V):
        bias = m.lookup(states, torch.full((ids.shape[0],), t), mask_phrases=rows)[0]
        assert torch.equal(bias, torch.where(rows, hf0[:, t], soft0[:, t]))


def test_real_vocabulary_and_large_lexicon():
    """32000 ids, 3000 entries with shared prefixes and overlaps, histories seeded with entries."""
    rng = random.Random(0)
    vocab = 32000
    common = [rng.randrange(vocab) for _ in range(40)]  # a few frequent ids make prefixes shared
    lex: dict[tuple[int, ...], float] = {}
    while len(lex) < 3000:
        n = rng.randint(1, 6)
        lex[tuple(rng.choice(common) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(n))] = rng.uniform(
            -6, 6
        )
    keys = list(lex)
    bad = [list(k) for k in keys[::7]]
    pen = {k: lex[k] for i, k in enumerate(keys) if i % 7}
    rows = []
    for _ in range(5):
        row: list[int] = []
        while len(row) < 40:
            row += list(rng.choice(keys)) if rng.random() < 0.5 else [rng.choice(common)]
        rows.append(row[-40:])
    ids = torch.tensor(rows)
    proc = BiasLogitsProcessor(Lexicon.from_token_sequences(pen) + Lexicon.from_token_sequences(bad), eos_token_id=EOS)
    for t in range(30, 41):
        scores = random_scores((5, vocab), t)
        want = NoBadWordsLogitsProcessor(bad, EOS)(ids[:, :t], SequenceBiasLogitsProcessor(pen)(ids[:, :t], scores))
        got = proc(ids[:, :t], scores)
        assert torch.equal(got, want)
        assert not torch.equal(got, scores)


def test_ids_outside_vocabulary_send_rows_to_root():
    m = Lexicon.from_token_sequences({(1, 2): -1.0}).compile(vocab_size=V)
    s = m.step(torch.zeros(3, dtype=torch.int64), torch.tensor([1, 1, 1]))
    assert torch.equal(m.depth[s], torch.tensor([1, 1, 1]))
    s = m.step(s, torch.tensor([-1, V, 10**9]))
    assert torch.equal(s, torch.zeros(3, dtype=torch.int64))
    bias, ban_len, entry = m.lookup(s, torch.tensor([-1, V, 2]))
    assert bias.tolist() == [0.0, 0.0, 0.0] and ban_len.tolist() == [0, 0, 0] and entry.tolist() == [-1, -1, -1]


def test_lexicon_without_multi_token_entries():
    m = Lexicon.from_token_sequences({(3,): -2.0, (4,): "ban"}).compile(vocab_size=V)
    assert m.max_depth == 0 and m.max_out == 0 and m.num_states == 1
    ids = torch.tensor([[3, 4, 3]])
    assert torch.equal(m.init_states(ids), torch.zeros(1, dtype=torch.int64))
    out = m.apply(torch.zeros(1, V), m.init_states(ids))
    assert out[0].tolist() == [0, 0, 0, -2.0, float("-inf"), 0, 0]


def test_empty_lexicon_is_identity():
    scores = random_scores((2, V), 0)
    out = BiasLogitsProcessor(Lexicon())(torch.tensor([[1, 2], [3, 4]]), scores)
    assert torch.equal(out, scores) and out is not scores


def test_scores_of_another_vocabulary_raise():
    m = Lexicon.from_token_sequences({(1, 2): -1.0}).compile(vocab_size=V)
    with pytest.raises(LexiconError, match=rf"compiled for a vocabulary of {V}.*vocab_size=9"):
        m.apply(torch.zeros(1, 9), torch.zeros(1, dtype=torch.int64))


def test_ids_outside_vocabulary_raise_naming_the_entry():
    lex = Lexicon.from_token_sequences({(1, 2): -1.0, (3, 70000): -2.0})
    with pytest.raises(LexiconError, match=r"\(3, 70000\).*\[70000\] are outside the vocabulary of 32000"):
        lex.compile(vocab_size=32000)
    proc = BiasLogitsProcessor(lex)
    with pytest.raises(ValueError, match="70000"):  # at the first call, like transformers
        proc(torch.tensor([[1]]), torch.zeros(1, 100))


@pytest.mark.parametrize(
    ("sequences", "message"),
    [
        ({(): -1.0}, r"item 0: empty token sequence"),
        ({(1, -2): -1.0}, r"item 0: .*\[-2\] are not non-negative integer token ids"),
        ({(1, 2): float("nan")}, r"item 0: .*action nan is not 'ban' or a number"),
        ({(1, 2): float("inf")}, r"action inf"),
        ({(1, 2): "bann"}, r"action 'bann'"),
        ({(1, 2): True}, r"action True"),
        ([[1, 2], [[3], -1.0]], r"mixes \[\[ids\], bias\] pairs with plain id lists"),
        ([[1, "a"]], r"\['a'\] are not non-negative integer token ids"),
        ({"ab": -1.0}, r"'ab' is not a tuple or list of token ids"),
        ("ab", r"str is neither a dict"),
    ],
)
def test_token_sequence_errors(sequences, message):
    with pytest.raises(LexiconError, match=message):
        Lexicon.from_token_sequences(sequences)


def test_sequence_bias_list_form_keeps_the_last_value_like_transformers():
    pairs = [[[1, 2], -1.0], [[3], -2.0], [[1, 2], -5.0]]
    lex = Lexicon.from_token_sequences(pairs)
    assert [(e.phrase, e.bias) for e in lex] == [((1, 2), -5.0), ((3,), -2.0)]
    ids, scores = torch.tensor([[4, 1]]), random_scores((1, V), 1)
    assert torch.equal(BiasLogitsProcessor(lex)(ids, scores), SequenceBiasLogitsProcessor(pairs)(ids, scores))


def test_build_matcher_sums_duplicate_penalties_in_order():
    seqs = [((1, 2), -1.5, 0), ((1, 2), -2.25, 1), ((2,), float("-inf"), 2), ((EOS,), float("-inf"), 3)]
    m = build_matcher(seqs, V, eos_token_ids=[EOS], entry_phrases=["a", "b", "c", "d"])
    assert m.hf_sequence_bias() == {(1, 2): -3.75}
    assert m.hf_bad_words_ids() == []  # (2,) == (EOS,) is dropped: transformers drops EOS-only bans


def test_matcher_moves_to_device_once():
    m = Lexicon.from_token_sequences({(1, 2): -1.0}).compile(vocab_size=V)
    moved = m.to("cpu")
    assert moved is not m and moved.trans_key.device.type == "cpu"
    assert torch.equal(
        moved.apply(torch.zeros(1, V), moved.init_states(torch.tensor([[1]]))),
        m.apply(torch.zeros(1, V), m.init_states(torch.tensor([[1]]))),
    )


def test_inside_model_generate_matches_sequence_bias_and_bad_words():
    """Greedy model.generate with the processor == generate(sequence_bias=..., bad_words_ids=...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.tensor([[5, 9, 11, 13], [7, 7, 8, 3]])
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False)
    gen = plain[:, 4:].tolist()
    # entries that the unconstrained continuation would complete, so that they change the output
    seq_bias = {tuple(gen[0][2:4]): -30.0, (gen[1][5],): -1.5, tuple(gen[1][0:3]): 4.0}
    bad = [gen[0][6:9], gen[1][1:2], [2]]
    want = model.generate(prompt, max_new_tokens=12, do_sample=False, sequence_bias=seq_bias, bad_words_ids=bad)
    lex = Lexicon.from_token_sequences(seq_bias) + Lexicon.from_token_sequences(bad)
    got = model.generate(
        prompt, max_new_tokens=12, do_sample=False, logits_processor=[BiasLogitsProcessor(lex, eos_token_id=2)]
    )
    assert not torch.equal(want, plain)
    assert torch.equal(got, want)
