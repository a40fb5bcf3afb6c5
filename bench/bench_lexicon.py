"""Per-step cost of lexicon biasing vs lexicon size, next to transformers' SequenceBiasLogitsProcessor.

    pytest bench/bench_lexicon.py --benchmark-only --benchmark-columns=min,median,mean,rounds \
        --benchmark-group-by=param:n_entries

Lexicons: ``n_entries`` random id sequences of length 1-6 over a 32000 vocabulary, random penalties in [-5, 5].
History: batch 8 × 256 random tokens, every other row ending in a lexicon prefix so that entries fire.
Three per-step costs, CPU fp32 scores [8, 32000]:

- ``matcher``: what fastdebias' decode loop pays: ``step`` by the new token, then ``apply``.
- ``processor``: ``fastdebias.hf.BiasLogitsProcessor`` (re-reads the last ``max_depth`` tokens each call).
- ``transformers``: ``SequenceBiasLogitsProcessor`` on the same lexicon and history.

Compilation (once per lexicon and tokenizer) is outside those timings; ``test_compile`` measures it.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import SequenceBiasLogitsProcessor

from fastdebias.hf import BiasLogitsProcessor
from fastdebias.lexicon import Lexicon

VOCAB = 32000
BATCH = 8
HISTORY = 256
SIZES = [10, 1_000, 10_000, 100_000]

_lexicons: dict[int, dict[tuple[int, ...], float]] = {}


def random_lexicon(n: int) -> dict[tuple[int, ...], float]:
    if n not in _lexicons:
        rng = random.Random(n)
        lex: dict[tuple[int, ...], float] = {}
        while len(lex) < n:
            lex[tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 6)))] = rng.uniform(-5, 5)
        _lexicons[n] = lex
    return _lexicons[n]


def history(lex: dict[tuple[int, ...], float]) -> torch.Tensor:
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, HISTORY), generator=g)
    keys = [k for k in lex if len(k) > 1]
    for r in range(BATCH):
        if r % 2 and keys:
            prefix = rng.choice(keys)[:-1]
            ids[r, HISTORY - len(prefix) :] = torch.tensor(prefix)
    return ids


def _print_env(benchmark, n):
    benchmark.extra_info.update(
        n_entries=n,
        batch=BATCH,
        history=HISTORY,
        vocab=VOCAB,
        dtype="float32",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )


@pytest.mark.parametrize("n_entries", SIZES)
def test_matcher(benchmark, n_entries):
    lex = random_lexicon(n_entries)
    ids, scores = history(lex), torch.randn(BATCH, VOCAB)
    m = Lexicon.from_token_sequences(lex).compile(vocab_size=VOCAB)
    states = m.init_states(ids[:, :-1])
    new = ids[:, -1]
    m.apply(scores, m.step(states, new))  # builds the fp32 tables outside the timing

    def one_step():
        return m.apply(scores, m.step(states, new))

    _print_env(benchmark, n_entries)
    out = benchmark(one_step)
    assert out.shape == scores.shape


@pytest.mark.parametrize("n_entries", SIZES)
def test_processor(benchmark, n_entries):
    lex = random_lexicon(n_entries)
    ids, scores = history(lex), torch.randn(BATCH, VOCAB)
    proc = BiasLogitsProcessor(Lexicon.from_token_sequences(lex))
    want = SequenceBiasLogitsProcessor(lex)(ids, scores)
    assert torch.equal(proc(ids, scores), want)  # same result as the baseline, and compiled before timing
    _print_env(benchmark, n_entries)
    benchmark(proc, ids, scores)


@pytest.mark.parametrize("n_entries", SIZES)
def test_transformers(benchmark, n_entries):
    lex = random_lexicon(n_entries)
    ids, scores = history(lex), torch.randn(BATCH, VOCAB)
    proc = SequenceBiasLogitsProcessor(lex)
    proc(ids, scores)  # prepares its tensors on the first call
    _print_env(benchmark, n_entries)
    benchmark(proc, ids, scores)


@pytest.mark.parametrize("n_entries", SIZES)
def test_compile(benchmark, n_entries):
    """One-off cost: ids → automaton and tables (a fresh lexicon each round, so the cache is not hit)."""
    lex = random_lexicon(n_entries)

    def fresh():
        return (Lexicon.from_token_sequences(lex),), {}

    _print_env(benchmark, n_entries)
    m = benchmark.pedantic(lambda x: x.compile(vocab_size=VOCAB), setup=fresh, rounds=3)
    benchmark.extra_info.update(states=m.num_states, transitions=m.trans_key.numel() - 1, max_out=m.max_out)
