"""Triton logits step and fused lm_head + sample (fastdebias.ops.logits) against the reference (fastdebias.reference).

The kernels draw the reference's Philox noise, so sampled tokens are compared one for one with the reference, not
only in distribution. On a CPU-only machine the kernels run under the Triton interpreter (vocabularies 111 and
1000, fp32 and fp16); real vocabularies, bf16, 10^6-draw statistics, CUDA graphs and the no-sync check carry the
``gpu`` marker.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before fastdebias.kernels is imported: triton.jit reads it when the kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastdebias import ops  # noqa: E402
from fastdebias.errors import BackendError, FastDebiasError, GenerationError  # noqa: E402
from fastdebias.kernels.logits import LMHeadMeta, LogitsMeta, _passes, logits_meta  # noqa: E402
from fastdebias.matcher import BAN, build_matcher  # noqa: E402
from fastdebias.ops import logits as tl_logits  # noqa: E402
from fastdebias.reference import logits as ref  # noqa: E402
from fastdebias.reference.sampling import apply_repetition_penalty, filter_logits  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

# A GPU-like launch shape on the interpreter: one row per program, many tiles, three programs per row in the
# threshold passes, so the cross-tile and cross-split reductions are exercised.
SPLIT_META = LogitsMeta(block_m=1, block_n=128, split=3, pass_block_n=64, n_cand=16, n_pass=8, block_b=2, num_warps=4)

MODES = {
    "greedy": {},
    "sample": {"temperature": 0.8},
    "top_k": {"temperature": 0.8, "top_k": 7},
    "top_p": {"temperature": 1.2, "top_p": 0.6},
    "top_k_top_p": {"temperature": 1.5, "top_k": 25, "top_p": 0.8},
    "min_p": {"temperature": 0.9, "min_p": 0.05},
    "top_k_top_p_min_p": {"temperature": 1.5, "top_k": 40, "top_p": 0.95, "min_p": 0.1},
}


# ------------------------------------------------------------------------------------------------- fixtures


def make_lexicon(v: int, seed: int, n_entries: int = 120, n_ctx: int = 4):
    """A matcher whose entries share a few context tokens, so that states carry many (token, bias) pairs, and whose
    single-token entries often hit the last token of a phrase (so that pair biases include a length-1 bias).

    Returns the matcher and the context tokens.
    """
    rnd = random.Random(seed)
    ctx = rnd.sample(range(v), n_ctx)
    seqs, last = [], []
    for e in range(n_entries):
        n = rnd.randint(1, 4)
        tok = rnd.choice(last) if (n == 1 and last and rnd.random() < 0.6) else rnd.randrange(v)
        ids = tuple(rnd.choice(ctx) for _ in range(n - 1)) + (tok,)
        bias = BAN if rnd.random() < 0.3 else rnd.choice([-8.0, -4.0, -1.5, 0.5, 2.0, 5.0])
        seqs.append((ids, bias, e))
        if n > 1:
            last.append(tok)
    return build_matcher(seqs, v).to(DEVICE), ctx


def make_case(b: int, v: int, seed: int, *, lexicon: bool = True, penalty: bool = True, bans: bool = True):
    """Logits, matcher, states, counts and bans for ``b`` rows. The tokens each row's automaton state biases or bans
    are pushed towards the top of its logits, so that the lexicon decides the choice often."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g) * 2.5
    case = {}
    if lexicon:
        m, ctx = make_lexicon(v, seed)
        rnd = random.Random(seed + 1)
        hist = torch.tensor([[rnd.choice(ctx + [rnd.randrange(v)]) for _ in range(6)] for _ in range(b)])
        states = m.init_states(hist.to(DEVICE))
        for r, s in enumerate(states.tolist()):
            lo, n = m.out_start[s].item(), m.out_last[s].item() + 1
            pairs = m.out_token[lo : lo + n].cpu()
            phrase_ban = (m.out_ban_len[lo : lo + n] >= 2).cpu()
            # phrase-banned tokens highest: -inf where phrases are masked, the favourites where they are not
            logits[r, pairs] += 4.0 + torch.rand(len(pairs), generator=g) * 4 + 4.0 * phrase_ban
        rows_hf = torch.arange(b, device=DEVICE) % 3 != 1  # rows 1, 4, 7 leave phrase bans to backtracking
        case.update(matcher=m, states=states, mask_phrases=rows_hf)
    else:
        hist = torch.randint(0, v, (b, 6), generator=g)
    if penalty:
        counts = torch.zeros(b, v, dtype=torch.int32).scatter_add_(1, hist, torch.ones(b, 6, dtype=torch.int32))
        top = logits.topk(3, dim=-1).indices  # penalise some of the current favourites too
        counts.scatter_(1, top[:, :1], 2)
        case.update(counts=counts.to(DEVICE), repetition_penalty=1.35)
        # vLLM's penalties over "generated" tokens: the last 3 of the history and some favourites, 1-3 times each
        out = torch.zeros(b, v, dtype=torch.int32).scatter_add_(1, hist[:, 3:], torch.ones(b, 3, dtype=torch.int32))
        reps = torch.randint(1, 4, (len(range(1, b, 2)), 2), generator=g, dtype=torch.int32)
        out[1::2].scatter_(1, top[1::2, 1:3], reps)
        case.update(output_counts=out.to(DEVICE), presence_penalty=0.6, frequency_penalty=0.45)
    if bans:
        ids = torch.randint(0, v, (b, 3), generator=g)
        ids[::2, 0] = logits[::2].argmax(dim=-1)  # even rows lose their favourite
        ids[::2, 2] = -1
        case["banned_tokens"] = ids.to(DEVICE)
    return logits.to(DEVICE), case


def assert_same(got: ref.LogitsStep, want: ref.LogitsStep) -> None:
    for name, a, b in zip(want._fields, got, want):
        if b is None:
            assert a is None, name
        else:
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def reference_probs(logits: torch.Tensor, **kw) -> torch.Tensor:
    """The distribution a sampled step draws from, built from the reference pieces: [B, V] fp32."""
    x = logits.float()
    if kw.get("matcher") is not None:
        x = kw["matcher"].apply(x, kw["states"], mask_phrases=kw.get("mask_phrases", True))
    if kw.get("banned_tokens") is not None:
        for r, row in enumerate(kw["banned_tokens"].tolist()):
            x[r, [t for t in row if t >= 0]] = float("-inf")
    if kw.get("counts") is not None:
        x = apply_repetition_penalty(x, kw["counts"] > 0, kw.get("repetition_penalty", 1.0))
    if kw.get("output_counts") is not None:
        c = kw["output_counts"].float()
        x = x - kw.get("frequency_penalty", 0.0) * c - kw.get("presence_penalty", 0.0) * (c > 0).float()
    x = filter_logits(x / kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    return x.softmax(dim=-1)


# ----------------------------------------------------------------------------------------------- the noise


@triton.jit
def _philox_probe_kernel(c_ptr, out_ptr, k0, k1, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    c = [tl.load(c_ptr + i * N + offs, mask=m, other=0).to(tl.uint32) for i in range(4)]
    # (triton 3.6 has no tl.to_tensor: broadcast the scalar keys through an int64 zero, like kernels/logits.py)
    zero = offs.to(tl.int64) * 0
    r = tl.philox_impl(c[0], c[1], c[2], c[3], (zero + k0).to(tl.uint32), (zero + k1).to(tl.uint32))
    for i in tl.static_range(4):
        tl.store(out_ptr + i * N + offs, r[i].to(tl.int64) & 0xFFFFFFFF, mask=m)


def test_philox_reference_matches_random123_and_triton():
    # Random123's known-answer vectors for philox4x32-10 (counter, key → output)
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for ctr, key, out in kat:
        got = ref.philox4x32(*(torch.tensor([c]) for c in ctr), *key)
        assert [int(x) for x in got] == list(out)
    # and Triton's own Philox on random counters, with keys as split_seed makes them
    g = torch.Generator().manual_seed(0)
    n = 64
    ctr = torch.randint(0, 2**32, (4, n), generator=g, dtype=torch.int64)
    for seed in (0, 1, 2**31 + 5, 2**62 - 1):
        k0, k1 = ref.split_seed(seed)
        out = torch.empty(4, n, dtype=torch.int64, device=DEVICE)
        _philox_probe_kernel[(1,)](ctr.to(DEVICE), out, k0, k1, n, BLOCK=64)
        want = torch.stack(ref.philox4x32(*ctr, k0, k1))
        assert torch.equal(out.cpu(), want)


def test_gumbel_noise_is_gumbel():
    g = ref.gumbel_noise(7, torch.arange(64), 3, 2048)
    assert torch.isfinite(g).all()
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (131072 draws: standard errors ~0.0035 and ~0.0095)
    assert abs(g.mean().item() - 0.5772) < 0.015
    assert abs(g.var().item() - math.pi**2 / 6) < 0.04
    small = g[:4, :256]
    assert not torch.equal(small, ref.gumbel_noise(8, torch.arange(4), 3, 256))
    assert not torch.equal(small, ref.gumbel_noise(7, torch.arange(4), 4, 256))
    assert torch.equal(small, ref.gumbel_noise(7, torch.arange(4), 3, 256))
    # the row id's high bits are part of the counter: ids equal below 2**32 give different noise
    assert not torch.equal(ref.gumbel_noise(7, torch.tensor([1]), 3, 256),
                           ref.gumbel_noise(7, torch.tensor([1 + (1 << 40)]), 3, 256))  # fmt: skip


def test_reference_sampler_statistics():
    """The oracle itself: 2^13 draws of one row (distinct row ids) follow softmax(z) after top-k/top-p.

    Expected cosine at this many draws: about 0.999; a wrong temperature or filter gives below 0.97.
    """
    g = torch.Generator().manual_seed(3)
    v = 111
    z = torch.randn(1, v, generator=g) * 2
    n = 1 << 13
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 12}, {"temperature": 1.3, "top_p": 0.7}):
        out = ref.logits_step(z.expand(n, v), seed=11, step=0, **kw)
        p = reference_probs(z, **kw)[0]
        freq = torch.bincount(out.next_ids, minlength=v).float() / n
        assert (freq[p == 0] == 0).all()
        assert F.cosine_similarity(freq, p, dim=0) > 0.99


# ----------------------------------------------------------------------------------- exactness vs the reference


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("v,b,meta", [(111, 5, None), (1000, 8, None), (1000, 3, SPLIT_META)])
def test_step_matches_reference(mode, v, b, meta):
    """Lexicon (pairs, per-row phrase masking) + extra bans + repetition penalty, every field exact."""
    logits, case = make_case(b, v, seed=v + b)
    m = case["matcher"]
    assert m.max_out >= 8  # states with many biased tokens, several of them in one tile
    fired = False
    for step in range(2):
        kw = {**case, **MODES[mode], "seed": 1234 + step * 2**40, "step": step}  # the key's high word too
        got = tl_logits.logits_step(logits, meta=meta, **kw)
        want = ref.logits_step(logits, **kw)
        assert_same(got, want)
        # the state advance is PhraseMatcher.step, and the lookup is PhraseMatcher.lookup
        assert torch.equal(got.states, m.step(case["states"], got.next_ids))
        bias, ban_len, entry = m.lookup(case["states"], got.next_ids, mask_phrases=case["mask_phrases"])
        assert torch.equal(got.entry, entry) and torch.equal(got.ban_len, ban_len) and torch.equal(got.bias, bias)
        fired |= bool((got.entry >= 0).any())
    assert fired


@pytest.mark.parametrize("lexicon,penalty,bans", [(False, False, False), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("mode", ["greedy", "sample", "top_p"])
def test_step_optional_inputs(lexicon, penalty, bans, mode):
    logits, case = make_case(4, 111, seed=5, lexicon=lexicon, penalty=penalty, bans=bans)
    if lexicon:
        case["mask_phrases"] = False  # one table for every row
    kw = {**case, **MODES[mode], "seed": 9, "step": 1}
    assert_same(tl_logits.logits_step(logits, **kw), ref.logits_step(logits, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_step_half_and_strided_logits(dtype):
    """16-bit logits are upcast once; a non-contiguous [B, V] view (every other column of a wider tensor) works."""
    logits, case = make_case(3, 111, seed=8)
    wide = torch.stack([logits, -logits], dim=-1).reshape(3, 222).to(dtype)  # logits at even columns
    view = wide[:, ::2]
    for mode in ("greedy", "top_k"):
        kw = {**case, **MODES[mode], "seed": 4, "step": 0}
        assert_same(tl_logits.logits_step(view, **kw), ref.logits_step(view.contiguous(), **kw))


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_per_row_phrase_masking(mode):
    """mask_phrases per row: a phrase ban (7, 9) masks 9 after 7 in "hf" rows; "backtrack" rows may choose it and
    learn the phrase's length (2) from ban_len, while its length-1 penalty (-1) and a plain ban still apply."""
    v = 111
    m = build_matcher([((7, 9), BAN, 0), ((9,), -1.0, 1), ((4,), BAN, 2)], v).to(DEVICE)
    states = m.step(torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.tensor([7, 7], device=DEVICE))
    logits = torch.zeros(2, v, device=DEVICE)
    logits[:, 9], logits[:, 4], logits[:, 20] = 30.0, 40.0, 10.0
    kw = {"matcher": m, "states": states, "mask_phrases": torch.tensor([True, False], device=DEVICE),
          **MODES[mode], "seed": 0, "step": 0}  # fmt: skip
    got = tl_logits.logits_step(logits, **kw)
    assert_same(got, ref.logits_step(logits, **kw))
    assert got.next_ids.tolist() == [20, 9]
    assert got.ban_len.tolist() == [0, 2] and got.entry.tolist() == [-1, 0] and got.bias.tolist() == [0.0, -1.0]


def test_repetition_penalty_after_lexicon():
    """transformers' order: the lexicon's bias first, then the penalty; here the other order would change the winner."""
    v = 111
    m = build_matcher([((5,), 3.0, 0)], v).to(DEVICE)
    logits = torch.zeros(1, v, device=DEVICE)
    logits[0, 5], logits[0, 9] = 4.0, 4.0
    states = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    counts = torch.zeros(1, v, dtype=torch.int32, device=DEVICE)
    kw = {"matcher": m, "states": states, "repetition_penalty": 2.0}
    got = tl_logits.logits_step(logits, counts=counts, **kw)  # token 5 unseen: 4 + 3 = 7 beats 4
    assert got.next_ids.tolist() == [5] and got.entry.tolist() == [0] and got.bias.tolist() == [3.0]
    counts[0, 5] = 1
    got = tl_logits.logits_step(logits, counts=counts, **kw)  # seen: (4 + 3) / 2 = 3.5 < 4 (4 / 2 + 3 = 5 would win)
    assert got.next_ids.tolist() == [9] and got.entry.tolist() == [-1] and got.bias.tolist() == [0.0]
    logits[0, 5] = -1.0
    m_down = build_matcher([((5,), -2.0, 0)], v).to(DEVICE)
    logits[0, 9] = -5.0
    logits[0, 10:] = -10.0
    logits[0, :5] = -10.0
    logits[0, 6:9] = -10.0
    got = tl_logits.logits_step(logits, counts=counts, **{**kw, "matcher": m_down})  # (-1 - 2) · 2 = -6 < -5
    assert got.next_ids.tolist() == [9]


def test_presence_frequency_after_repetition_penalty():
    """vLLM's order and formula: the repetition penalty (over the context), then ``- frequency·count`` and
    ``- presence·[count > 0]`` over the generated tokens; negative values reward repeats."""
    v = 111
    logits = torch.full((1, v), -10.0, device=DEVICE)
    logits[0, 5], logits[0, 9], logits[0, 12] = 6.0, 4.5, 3.0
    counts = torch.zeros(1, v, dtype=torch.int32, device=DEVICE)
    counts[0, 5] = 1  # in the context: 6 / 1.2 = 5 before the others
    out = torch.zeros(1, v, dtype=torch.int32, device=DEVICE)
    out[0, 5], out[0, 9] = 2, 1
    kw = dict(counts=counts, repetition_penalty=1.2, output_counts=out)
    for fn in (tl_logits.logits_step, ref.logits_step):
        pick = lambda **p: fn(logits, **kw, **p).next_ids.item()  # noqa: E731
        assert pick() == 5  # 6 / 1.2 = 5 > 4.5 > 3
        # 5 - 2 · 0.6 = 3.8 < 4.5 - 0.6 = 3.9 (before the repetition penalty: (6 - 1.2) / 1.2 = 4 would win)
        assert pick(frequency_penalty=0.6) == 9
        assert pick(frequency_penalty=0.6, presence_penalty=1.0) == 12  # 2.8 and 2.9 < 3
        assert pick(frequency_penalty=0.6, presence_penalty=-1.0) == 9  # 4.8 < 4.9
        assert pick(presence_penalty=-2.0) == 5  # 7 > 6.5
    for mode in ("greedy", "sample", "top_k_top_p"):
        p = dict(presence_penalty=0.25, frequency_penalty=-0.5, **MODES[mode], seed=3)
        assert_same(tl_logits.logits_step(logits, **kw, **p), ref.logits_step(logits, **kw, **p))


@triton.jit
def _key_probe_kernel(z_ptr, out_ptr, N, BLOCK: tl.constexpr):
    from fastdebias.kernels.logits import _ordered_key

    offs = tl.arange(0, BLOCK)
    m = offs < N
    tl.store(out_ptr + offs, _ordered_key(tl.load(z_ptr + offs, mask=m, other=0.0)), mask=m)


def test_ordered_key_preserves_float_order():
    """The threshold search compares int32 keys of fp32 values: their order must be the floats' (both signs,
    subnormals, ±0 as one value, ±inf)."""
    z = torch.tensor([float("-inf"), -3e38, -1e30, -2.0, -1.0, -1e-30, -1e-42, -0.0, 0.0, 1e-42, 1e-30, 1.0, 2.0,
                      1e30, 3e38, float("inf")])  # fmt: skip
    z = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(1))].to(DEVICE)
    keys = torch.empty(len(z), dtype=torch.int32, device=DEVICE)
    _key_probe_kernel[(1,)](z, keys, len(z), BLOCK=32)
    zs, ks = z.cpu().tolist(), keys.cpu().tolist()
    for i in range(len(z)):
        for j in range(len(z)):
            assert (ks[i] < ks[j]) == (zs[i] < zs[j]) and (ks[i] == ks[j]) == (zs[i] == zs[j]), (zs[i], zs[j])


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (3, 1.0), (7, 1.0), (0, 0.3), (0, 0.999), (5, 0.9)])
def test_threshold_search_over_the_whole_float_range(top_k, top_p):
    """Values of both signs from subnormals to 1e30 and -inf (banned), and rows of negative logits only (where the
    threshold is negative): the kept set, hence the draws, are the reference's."""
    v = 111
    g = torch.Generator().manual_seed(97)
    special = torch.tensor([-1e30, -3e4, -1.0, -1e-30, -1e-42, -0.0, 0.0, 1e-42, 1e-30, 0.5, 1.0, 2.0, 3e4, 1e30])
    for r in range(5):
        x = torch.randn(v, generator=g) * 10.0 ** (r - 1)
        if r < 4:
            x[torch.randperm(v, generator=g)[: len(special)]] = special if r % 2 else -special.abs() - 5.0
        else:  # negative only, like log-probabilities (no ties: a top-p boundary tie is the documented exception)
            x = -x.abs() * 3.0 - 1.0
        x[torch.randperm(v, generator=g)[:9]] = float("-inf")
        logits = x.view(1, v).to(DEVICE)
        for step in range(6):
            kw = dict(temperature=0.7, top_k=top_k, top_p=top_p, seed=11, step=step)
            assert_same(tl_logits.logits_step(logits, **kw), ref.logits_step(logits, **kw))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="numpy's error flags: the interpreter only")
def test_threshold_search_reads_no_stale_workspace(monkeypatch):
    """The threshold passes' workspace is allocated uninitialised; no pass may compute with a part of it that no
    earlier pass of the step wrote. Poisoned here with +inf and -inf (what stale memory may hold), a sum over
    unwritten partials is inf - inf, which numpy raises on under ``errstate(invalid="raise")``. (The first launch
    once summed the other half of the workspace and discarded the result: exact outputs, an intermittent numpy
    warning in CI.)"""
    import numpy as np

    real_empty = torch.empty

    def poisoned(*args, **kwargs):  # +inf and -inf in alternate runs of 16 (a partial's candidates): splits differ
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.numel():
            i = torch.arange(t.numel(), device=t.device)
            t.view(-1).copy_(torch.where(i // 16 % 2 == 0, float("inf"), float("-inf")))
        return t

    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    settings = [dict(top_k=5), dict(top_p=0.7), dict(top_k=9, top_p=0.8)]
    want = [ref.logits_step(logits, temperature=0.8, seed=5, step=1, **kw) for kw in settings]
    monkeypatch.setattr(torch, "empty", poisoned)
    with np.errstate(invalid="raise"):  # three programs per row: sums across splits
        got = [tl_logits.logits_step(logits, temperature=0.8, seed=5, step=1, meta=SPLIT_META, **kw) for kw in settings]
    monkeypatch.undo()
    for a, b in zip(got, want):
        assert_same(a, b)


@pytest.mark.parametrize("n_cand", [4, 8])
def test_threshold_search_with_fewer_candidates_per_pass(n_cand):
    """The metas ``bench_logits.py --filter-sweep`` times besides the rule's: fewer candidates per pass (more
    passes), rows split in chunks of several tiles; the kept set, hence the draws, are the reference's."""
    meta = SPLIT_META._replace(n_cand=n_cand, n_pass=_passes(n_cand))
    g = torch.Generator().manual_seed(n_cand)
    logits = (torch.randn(2, 400, generator=g) * 4).to(DEVICE)
    logits[0, 50:90] = float("-inf")
    for step, (top_k, top_p) in enumerate([(5, 1.0), (0, 0.7), (30, 0.9)]):
        kw = dict(temperature=0.9, top_k=top_k, top_p=top_p, seed=5, step=step)
        assert_same(tl_logits.logits_step(logits, meta=meta, **kw), ref.logits_step(logits, **kw))


def test_top_k_keeps_ties_and_top_p_keeps_the_top_token():
    v = 111
    logits = torch.full((2, v), -5.0, device=DEVICE)
    logits[0, [3, 7, 11, 40]] = 2.0  # four-way tie at the top: top_k=2 keeps all four (transformers' rule)
    logits[1, 17] = 30.0  # one token holds all the mass: any top_p keeps exactly it
    seen = {0: set(), 1: set()}
    for step in range(12):
        for kw in ({"top_k": 2}, {"top_p": 0.5}):
            out = tl_logits.logits_step(logits, temperature=1.0, seed=3, step=step, **kw)
            if "top_k" in kw:
                assert_same(out, ref.logits_step(logits, temperature=1.0, seed=3, step=step, **kw))
            for r in (0, 1):
                seen[r].add(out.next_ids[r].item())
    # top_p=0.5 over four equal tokens: the kernel keeps every token tied at the boundary (transformers' sort keeps
    # two of them, whichever its sort puts last), so all four are drawn either way
    assert seen[0] == {3, 7, 11, 40}
    assert seen[1] == {17}


# ------------------------------------------------------------------------------------------------ sampling


def test_sampling_statistics():
    """Plain sampling: 5120 draws of one row (distinct row ids); banned ids never drawn, frequency ~ probability."""
    v, n = 111, 512
    logits, case = make_case(1, v, seed=21)
    case["mask_phrases"] = True
    kw = {**case, "temperature": 1.1}
    rows = {k: (x.expand(n, *x.shape[1:]) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    p = reference_probs(logits, **kw)[0]
    meta = LogitsMeta(block_m=n, block_n=128, split=1, pass_block_n=128, n_cand=16, n_pass=8, block_b=n, num_warps=4)
    counts = torch.zeros(v)
    for step in range(10):
        out = tl_logits.logits_step(logits.expand(n, v), **rows, seed=77, step=step, meta=meta)
        assert not out.all_banned.any()
        counts += torch.bincount(out.next_ids.cpu(), minlength=v)
    assert counts[(p == 0).cpu()].sum() == 0  # lexicon bans, extra bans
    assert (p == 0).sum() >= 4
    freq = counts / counts.sum()
    assert F.cosine_similarity(freq, p.cpu(), dim=0) > 0.99


@pytest.mark.parametrize("mode", ["top_k", "top_p", "top_k_top_p", "min_p", "top_k_top_p_min_p"])
def test_filtered_sampling_stays_in_the_kept_set(mode):
    """top-k/top-p/min-p: every draw (8 rows × 6 steps) inside the reference's kept set, and equal to the
    reference's."""
    logits, case = make_case(8, 1000, seed=31)
    kw = {**case, **MODES[mode]}
    kept = reference_probs(logits, **kw) > 0
    assert (kept.sum(dim=-1) < 1000 - 100).all()  # the filter removes most of the vocabulary
    drawn = set()
    for step in range(6):
        out = tl_logits.logits_step(logits, **kw, seed=5, step=step)
        assert_same(out, ref.logits_step(logits, **kw, seed=5, step=step))
        assert kept.gather(1, out.next_ids.view(-1, 1)).all()
        drawn |= set(zip(range(8), out.next_ids.tolist()))
    assert len(drawn) > 8 * 2  # rows draw several different tokens across steps (48 draws)


def test_same_seed_same_tokens():
    logits, case = make_case(8, 1000, seed=41)
    for mode in ("sample", "top_p"):
        kw = {**case, **MODES[mode]}
        a = tl_logits.logits_step(logits, **kw, seed=99, step=5)
        assert_same(tl_logits.logits_step(logits, **kw, seed=99, step=5), a)
        assert not torch.equal(tl_logits.logits_step(logits, **kw, seed=100, step=5).next_ids, a.next_ids)
        assert not torch.equal(tl_logits.logits_step(logits, **kw, seed=99, step=6).next_ids, a.next_ids)
    big = {**case, **MODES["top_p"], "seed": 2**62 - 1, "step": 2**32 - 3}  # the largest seed, a step past 2**31
    assert_same(tl_logits.logits_step(logits, **big), ref.logits_step(logits, **big))
    # step as an int, a [1] tensor and a [B] tensor; row ids make a row's draw independent of its batch position
    kw = {**case, **MODES["sample"], "seed": 99}
    a = tl_logits.logits_step(logits, **kw, step=5)
    assert_same(tl_logits.logits_step(logits, **kw, step=torch.tensor([5], device=DEVICE)), a)
    assert_same(tl_logits.logits_step(logits, **kw, step=torch.full((8,), 5, device=DEVICE)), a)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4], device=DEVICE)
    permuted = {k: (x[perm] if isinstance(x, torch.Tensor) and x.shape[0] == 8 else x) for k, x in kw.items()}
    b = tl_logits.logits_step(logits[perm], **permuted, step=5, row_ids=perm)
    assert torch.equal(b.next_ids, a.next_ids[perm]) and torch.equal(b.states, a.states[perm])
    # 62-bit row ids (generate's per-prompt seeds): the high word keys the noise too, as in the reference
    wide = torch.tensor([5 + (1 << 32) * k for k in range(8)], device=DEVICE)  # one low word, eight high words
    top = (2**62 - 1) - torch.arange(8, device=DEVICE)
    for ids in (wide, top):
        got = tl_logits.logits_step(logits, **kw, step=5, row_ids=ids)
        assert_same(got, ref.logits_step(logits, **kw, step=5, row_ids=ids))
    low = tl_logits.logits_step(logits, **kw, step=5, row_ids=torch.full((8,), 5, device=DEVICE))
    assert not torch.equal(tl_logits.logits_step(logits, **kw, step=5, row_ids=wide).next_ids, low.next_ids)


def test_all_banned_rows():
    """Rows with every token banned: token -1, flagged, state kept, nothing NaN; the other rows are unaffected."""
    v = 111
    logits, case = make_case(4, v, seed=51)
    logits[1] = float("-inf")  # nothing left before the lexicon
    finite = [2, 5, 8]
    logits[3] = float("-inf")
    logits[3, finite] = 1.0
    case["banned_tokens"][3] = torch.tensor(finite)  # the extra bans remove the last three
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, generator=g).to(DEVICE)
    w = torch.randn(v, 16, generator=g).to(DEVICE)
    for mode in MODES:
        kw = {**case, **MODES[mode], "seed": 2, "step": 0}
        out = tl_logits.logits_step(logits, **kw)
        assert_same(out, ref.logits_step(logits, **kw))
        assert out.all_banned.tolist() == [False, True, False, True]
        assert out.next_ids[[1, 3]].tolist() == [-1, -1]
        assert torch.equal(out.states[[1, 3]], case["states"][[1, 3]])
        assert out.entry[[1, 3]].tolist() == [-1, -1] and out.bias[[1, 3]].tolist() == [0.0, 0.0]
        assert (out.next_ids[[0, 2]] >= 0).all()
    # the fused path: a lexicon that bans every token of the vocabulary
    all_banned = build_matcher([((t,), BAN, t) for t in range(v)], v).to(DEVICE)
    states = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    for mode in ("greedy", "sample"):
        out = tl_logits.lm_head_step(hidden, w, matcher=all_banned, states=states, **MODES[mode])
        assert out.all_banned.all() and (out.next_ids == -1).all() and torch.isfinite(out.bias).all()


# ---------------------------------------------------------------------------------------------- fused lm_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["greedy", "sample", "top_k_top_p"])
def test_lm_head_step_equals_unfused(dtype, mode):
    """Fused (greedy, sample) or its documented fallback (top-k/top-p: F.linear + logits_step) equals unfused."""
    b, k, v = (20 if mode != "top_k_top_p" else 4), 64, 1000
    g = torch.Generator().manual_seed(61)
    hidden = torch.randn(b, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(v, k, generator=g) * 3 / k**0.5).to(DEVICE, dtype)
    _, case = make_case(b, v, seed=61)
    kw = {**case, **MODES[mode], "seed": 8, "step": 2}
    want = tl_logits.logits_step(F.linear(hidden, w), **kw)
    # interpreter meta: one M-block; a GPU-like one: two M-blocks of 16 rows and 16 column tiles
    for meta in (None, LMHeadMeta(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2)):
        assert_same(tl_logits.lm_head_step(hidden, w, **kw, meta=meta), want)
    assert_same(ref.lm_head_step(hidden, w, **kw), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [5, 20])  # padded to BLOCK_R = 16 and 32 (masked ranks)
def test_lm_head_step_with_lora_equals_reference(dtype, rank):
    """The lm_head LoRA added inside the fused tiles: rows of two adapters and rows without one, in one batch."""
    b, k, v, n = 6, 32, 111, 2
    g = torch.Generator().manual_seed(83)
    hidden = torch.randn(b, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(v, k, generator=g) * 2 / k**0.5).to(DEVICE, dtype)
    # LoRA large enough to change the argmax of most rows (checked below), so the test sees the adapter
    lora = (torch.randn(n, rank, k, generator=g).to(DEVICE, dtype) / k**0.5,
            torch.randn(n, v, rank, generator=g).to(DEVICE, dtype),
            torch.tensor([1.5, 0.75], device=DEVICE))
    idx = torch.tensor([0, -1, 1, 1, -1, 0], dtype=torch.int32, device=DEVICE)
    _, case = make_case(b, v, seed=83)
    for mode in ("greedy", "sample"):
        kw = {**case, **MODES[mode], "seed": 2, "step": 1}
        want = ref.lm_head_step(hidden, w, lora=lora, adapter_idx=idx, **kw)
        assert_same(tl_logits.lm_head_step(hidden, w, lora=lora, adapter_idx=idx, **kw), want)
        assert_same(ops.logits_step(hidden=hidden, lm_head=w, lm_head_lora=lora, adapter_idx=idx, **kw,
                                    backend="triton"), want)  # fmt: skip
        plain = ref.lm_head_step(hidden, w, **kw)
        assert torch.equal(want.next_ids[idx < 0], plain.next_ids[idx < 0])  # no adapter: the base lm_head
    assert (want.top[idx >= 0] != plain.top[idx >= 0]).any()  # the adapter changed the model's own choice
    with pytest.raises(GenerationError, match="lora shapes"):
        tl_logits.lm_head_step(hidden, w, lora=(lora[0], lora[1][:, :5], lora[2]), adapter_idx=idx)
    with pytest.raises(GenerationError, match="adapter_idx"):
        ref.lm_head_step(hidden, w, lora=lora, adapter_idx=idx[:3])


# ------------------------------------------------------------------------------------------- dispatch, errors


def test_dispatch_picks_backend():
    logits, case = make_case(3, 111, seed=71)
    kw = {**case, **MODES["sample"], "seed": 1, "step": 0}
    want = ref.logits_step(logits, **kw)
    assert_same(ops.logits_step(logits, **kw, backend="torch"), want)
    assert_same(ops.logits_step(logits, **kw, backend="triton"), want)
    g = torch.Generator().manual_seed(0)
    hidden, w = torch.randn(3, 16, generator=g).to(DEVICE), torch.randn(111, 16, generator=g).to(DEVICE)
    want = ref.lm_head_step(hidden, w, **kw)
    assert_same(ops.logits_step(hidden=hidden, lm_head=w, **kw, backend="torch"), want)
    assert_same(ops.logits_step(hidden=hidden, lm_head=w, **kw, backend="triton"), want)
    with pytest.raises(GenerationError, match="either logits, or hidden and lm_head"):
        ops.logits_step(logits, hidden=hidden, lm_head=w)
    with pytest.raises(GenerationError, match="either logits, or hidden and lm_head"):
        ops.logits_step(hidden=hidden)


def _bad_calls(logits, case):
    b, v = logits.shape
    m = case["matcher"]
    yield "logits", lambda f: f(logits[0], **case)
    yield "dtype", lambda f: f(logits.long(), **case)
    yield "vocabulary of", lambda f: f(logits[:, :-1], **case)
    yield "states were given without a matcher", lambda f: f(logits, states=case["states"])
    yield "states", lambda f: f(logits, matcher=m, states=None)
    yield "states", lambda f: f(logits, matcher=m, states=case["states"].int())
    yield "mask_phrases", lambda f: f(logits, **{**case, "mask_phrases": torch.ones(b + 1, dtype=torch.bool)})
    yield "mask_phrases", lambda f: f(logits, **{**case, "mask_phrases": 1})
    yield "banned_tokens", lambda f: f(logits, **{**case, "banned_tokens": torch.zeros(b, dtype=torch.long)})
    yield "counts", lambda f: f(logits, **{**case, "counts": torch.zeros(b, v - 1, dtype=torch.int32)})
    yield "counts", lambda f: f(logits, **{**case, "counts": torch.zeros(b, v)})
    yield "repetition_penalty", lambda f: f(logits, **{**case, "repetition_penalty": 0.0})
    yield "output_counts", lambda f: f(logits, **{**case, "output_counts": torch.zeros(b, v, device=DEVICE)})
    yield "output_counts", lambda f: f(logits, **{**case, "output_counts": case["counts"][:, :-1]})
    yield "need output_counts", lambda f: f(logits, **{**case, "output_counts": None})
    yield "presence_penalty", lambda f: f(logits, **{**case, "presence_penalty": float("inf")})
    yield "frequency_penalty", lambda f: f(logits, **{**case, "frequency_penalty": "0.5"})
    yield "temperature", lambda f: f(logits, **case, temperature=-1.0)
    yield "temperature", lambda f: f(logits, **case, temperature=float("nan"))
    yield "top_k", lambda f: f(logits, **case, top_k=-1)
    yield "top_k", lambda f: f(logits, **case, top_k=2.0)
    yield "top_p", lambda f: f(logits, **case, top_p=0.0)
    yield "top_p", lambda f: f(logits, **case, top_p=1.5)
    yield "min_p", lambda f: f(logits, **case, min_p=-0.1)
    yield "min_p", lambda f: f(logits, **case, min_p=1.5)
    yield "min_p", lambda f: f(logits, **case, min_p=float("nan"))
    yield "seed", lambda f: f(logits, **case, seed=-1)
    yield "seed", lambda f: f(logits, **case, seed=2**62)
    yield "step", lambda f: f(logits, **case, step=-1)
    yield "step", lambda f: f(logits, **case, step=torch.zeros(b + 1, dtype=torch.long, device=DEVICE))
    yield "step", lambda f: f(logits, **case, step=torch.zeros(1, device=DEVICE))
    yield "row_ids", lambda f: f(logits, **case, row_ids=torch.arange(b + 1, device=DEVICE))


def test_bad_arguments_name_the_argument():
    logits, case = make_case(3, 111, seed=81)
    for word, call in _bad_calls(logits, case):
        for f in (tl_logits.logits_step, ref.logits_step):
            with pytest.raises(GenerationError, match=word):
                call(f)
    hidden = torch.zeros(3, 16, device=DEVICE)
    for bad_w in (torch.zeros(111, 8, device=DEVICE), torch.zeros(111, 16, dtype=torch.float16, device=DEVICE)):
        for f in (tl_logits.lm_head_step, ref.lm_head_step):
            with pytest.raises(GenerationError, match="lm_head"):
                f(hidden, bad_w)
    with pytest.raises(GenerationError, match="vocabulary of"):
        tl_logits.lm_head_step(hidden, torch.zeros(110, 16, device=DEVICE), **case)
    assert issubclass(GenerationError, FastDebiasError)


def test_cpu_without_interpreter_is_a_backend_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="backend='torch'"):
        tl_logits.logits_step(torch.zeros(1, 111))


def test_meta_rules():
    """The GPU rule fills the SMs at B = 1 and keeps tiles wide at large B; the interpreter rule, few programs."""
    small = logits_meta(1, 128256, 132)
    assert small.block_m == 1 and small.block_n == 512 and triton.cdiv(128256, small.block_n) >= 132
    assert small.split >= 2 * 132
    big = logits_meta(256, 128256, 132)
    assert big.block_n == 4096 and big.split == 2
    assert logits_meta(8, 1000, 132, interpret=True)[:3] == (8, 1024, 1)
    assert small.n_pass * (small.n_cand.bit_length() - 1) >= 32  # enough passes to pin any fp32 key


# --------------------------------------------------------------------------------------------------- GPU


def _gpu_case(b: int, v: int, dtype: torch.dtype, seed: int):
    logits, case = make_case(b, v, seed=seed)
    return logits.to(dtype), case


@pytest.mark.parametrize("v", [32000, 32064, 49152, 128256])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_step_matches_reference(v, mode, dtype):
    """Real vocabularies: greedy exact; sampled tokens equal the reference's except at ulp-level near-ties."""
    logits, case = _gpu_case(64, v, dtype, seed=v)
    mism = 0
    for step in range(8):
        kw = {**case, **MODES[mode], "seed": 17, "step": step}
        got, want = tl_logits.logits_step(logits, **kw), ref.logits_step(logits, **kw)
        if mode == "greedy":
            assert_same(got, want)
        mism += (got.next_ids != want.next_ids).sum().item()
        assert torch.equal(got.all_banned, want.all_banned)
    assert mism <= 1


@pytest.mark.parametrize("v", [32000, 32064, 49152, 128256])
@pytest.mark.parametrize("mode", ["sample", "top_k", "top_p", "top_k_top_p", "min_p"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_sampling_statistics_million_draws(v, mode):
    """10^6 draws of one row: banned ids never drawn, nothing outside the kept set, cosine(freq, p) > 0.99."""
    n_rows, n_steps = 4096, 245  # 1,003,520 draws
    logits, case = make_case(1, v, seed=v + 1)
    case["mask_phrases"] = True
    kw = {**case, **MODES[mode]}
    p = reference_probs(logits, **kw)[0]
    rows = {k: (x.expand(n_rows, *x.shape[1:]) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    counts = torch.zeros(v, device=DEVICE)
    for step in range(n_steps):
        out = tl_logits.logits_step(logits.expand(n_rows, v), **rows, seed=123, step=step)
        counts += torch.bincount(out.next_ids, minlength=v)
    assert counts.sum().item() == n_rows * n_steps
    assert counts[p == 0].sum().item() == 0
    assert F.cosine_similarity(counts / counts.sum(), p, dim=0).item() > 0.99


@pytest.mark.parametrize("v,k", [(32000, 4096), (128256, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_lm_head_step_equals_unfused(v, k, dtype):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(8, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(v, k, generator=g) / k**0.5 * 4).to(DEVICE, dtype)
    _, case = make_case(8, v, seed=5)
    for mode in ("greedy", "sample"):
        kw = {**case, **MODES[mode], "seed": 3, "step": 0}
        got = tl_logits.lm_head_step(hidden, w, **kw)
        want = tl_logits.logits_step(F.linear(hidden, w), **kw)
        # the kernel's fp32 accumulation order differs from cuBLAS: allow a rare flip between near-equal logits
        assert (got.next_ids != want.next_ids).sum().item() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_lm_head_lora_step_equals_unfused():
    """SR-LLM-sized head (32064 x 4096, bf16) with a rank-64 LoRA on two adapters and rows without one."""
    g = torch.Generator().manual_seed(6)
    b, k, v, r = 8, 4096, 32064, 64
    hidden = torch.randn(b, k, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(v, k, generator=g) / k**0.5 * 4).to(DEVICE, torch.bfloat16)
    lora = ((torch.randn(2, r, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16),
            (torch.randn(2, v, r, generator=g) / r**0.5).to(DEVICE, torch.bfloat16),
            torch.tensor([0.25, 0.5], device=DEVICE))
    idx = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1], dtype=torch.int32, device=DEVICE)
    _, case = make_case(b, v, seed=6)
    for mode in ("greedy", "sample"):
        kw = {**case, **MODES[mode], "seed": 3, "step": 0}
        got = tl_logits.lm_head_step(hidden, w, lora=lora, adapter_idx=idx, **kw)
        want = ref.lm_head_step(hidden, w, lora=lora, adapter_idx=idx, **kw)
        # fp32 accumulation order (and the unrounded LoRA term) differ from cuBLAS: allow one near-tie flip
        assert (got.next_ids != want.next_ids).sum().item() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_and_no_host_sync():
    """The whole step (top-k + top-p, the longest path) captured once and replayed with a device step counter."""
    logits, case = make_case(16, 32000, seed=9)
    kw = {**case, **MODES["top_k_top_p"], "seed": 4}
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    tl_logits.logits_step(logits, **kw, step=step)  # compile, build the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tl_logits.logits_step(logits, **kw, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tl_logits.logits_step(logits, **kw, step=step)
    for s in range(3):
        step.fill_(s)
        graph.replay()
        assert_same(out, tl_logits.logits_step(logits, **kw, step=s))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_no_recompile_for_new_seed_or_step():
    logits, case = make_case(4, 32000, seed=2)
    kw = {**case, **MODES["top_p"]}
    tl_logits.logits_step(logits, **kw, seed=1, step=1)
    kernels = [tl_logits._logits_tile_kernel, tl_logits._threshold_pass_kernel, tl_logits._finalize_kernel]

    def compiled() -> list[int]:  # Triton's per-device caches of compiled specialisations
        return [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels]

    before = compiled()
    for seed, step in ((2, 16), (2**40, 1), (7, 2**31 + 1)):
        tl_logits.logits_step(logits, **kw, seed=seed, step=step)
    assert compiled() == before


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_int64_row_offsets():
    """Row offsets past 2**31 elements: 16800 rows × 128256 fp16 logits (4.3 GB)."""
    b, v = 16800, 128256
    try:
        logits = torch.randn(b, v, device=DEVICE, dtype=torch.float16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a [16800, 128256] tensor")
    logits[-1, 12345] = 100.0
    out = tl_logits.logits_step(logits)
    assert out.next_ids[-1].item() == 12345
    assert torch.equal(out.next_ids, logits.float().argmax(dim=-1))


def test_tiny_temperature_is_greedy():
    """The step itself: a temperature below 1e-5 chooses the argmax (both implementations), never NaN's token."""
    logits, case = make_case(4, 111, seed=91)
    want = ref.logits_step(logits, **case)
    for t in (1e-40, 1e-20):
        for f in (ref.logits_step, tl_logits.logits_step):
            assert_same(f(logits, **case, temperature=t, seed=3), want)
