"""Prefill, one-token decode, token choice and stopping: the decode path, plus SR-LLM-style ``debias``.

A batch of prompts is left-padded into one static KV cache; rows finish independently (EOS, a stop string, or
the length limit). Token choice and the finished flags stay on the device; the host reads them only every
``check_every`` steps (every step when it must decode text: stop strings or streaming). There, a prompt waiting
for a place takes a finished row's (continuous batching, in place under every runtime); once none waits, where
the runtime allows it (eager and compile, not CUDA graphs), finished rows leave the batch (``_retire_rows``), so
that a batch whose outputs end at different lengths stops paying for the rows that are done.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdebias import ops
from fastdebias.errors import GenerationError, TokenizerError, check_unicode, token_id_list
from fastdebias.model import KVCache
from fastdebias.reference.sampling import (
    apply_presence_frequency,
    apply_repetition_penalty,
    choose_tokens,
    effective_temperature,
)


class _FirstAdapter:
    def __repr__(self) -> str:
        return "<first adapter>"


FIRST_ADAPTER = _FirstAdapter()
"""Default of ``adapter=``: the first adapter loaded (or none if none was). ``None`` means no adapter."""


@dataclass
class GenerationResult:
    """One generated sequence (one per prompt, or ``n`` per prompt with ``generate(n=...)``). ``token_ids`` are the
    generated ids (an EOS that ended the row included)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "banned" (every token was banned)
    prompt_tokens: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)  # the prompt as the model read it
    interventions: list = field(default_factory=list)
    # with ``generate(logprobs=True)``: the model's log-probability of each of ``token_ids`` (raw logits, before the
    # lexicon, penalties, temperature and filters); None otherwise
    logprobs: list[float] | None = None
    # with ``generate(top_logprobs=N)``: for each of ``token_ids``, the N most likely tokens at that position under
    # the same raw logits, as (token id, log-probability) pairs, most likely first; None otherwise
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # with ``generate(prompt_logprobs=True)``: each prompt token's log-probability given the tokens before it (the
    # model's raw logits; None for the first token, which has nothing before it), and with ``top_logprobs=N`` the
    # N most likely tokens at each prompt position, as in ``top_logprobs``; None otherwise
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class ScoreResult:
    """What ``score`` gives for one text: its tokens as the model reads them and each token's log-probability
    given the tokens before it: None for a text's first token, unless a context comes before the text."""

    token_ids: list[int]
    logprobs: list[float | None]
    # with ``score(top_logprobs=N)``: the N most likely tokens at each position (None where ``logprobs`` is), as
    # (token id, log-probability) pairs, most likely first; None otherwise
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    context_tokens: int = 0  # with ``score(context=...)``: the tokens of the context the text followed

    @property
    def total(self) -> float:
        """The sum of the log-probabilities: the text's log-likelihood (given its context, or its first token)."""
        return float(sum(x for x in self.logprobs if x is not None))

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-probability over the scored tokens; nan where none was scored (a text of
        one token and no context), inf past the largest float."""
        n = sum(x is not None for x in self.logprobs)
        if not n:
            return math.nan
        try:
            return math.exp(-self.total / n)
        except OverflowError:  # a mean above ~709 nats: past the largest float
            return math.inf


# ----------------------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    """A real number (int, float, numpy's), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_model(model) -> None:
    from fastdebias.pipeline import FastDebiasModel

    if not isinstance(model, FastDebiasModel):
        raise GenerationError(
            f"model: expected a model from fastdebias.load(), got {type(model).__name__}; load it first: "
            "model = fastdebias.load(model_path, adapter)"
        )


def _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_p) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_real(top_p) or not (0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if not _is_real(min_p) or not (0.0 <= min_p <= 1.0):
        raise GenerationError(f"min_p must be in [0, 1] (0.0 = off), got {min_p!r}")
    rp = repetition_penalty
    if not _is_real(rp) or not (rp > 0 and math.isfinite(rp)):
        raise GenerationError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}")


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise GenerationError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_top_logprobs(top_logprobs) -> None:
    if not _is_int(top_logprobs) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationError(
            f"top_logprobs must be an integer from 0 (off) to {MAX_TOP_LOGPROBS}, got {top_logprobs!r}"
        )


def _check_seed(seed, n: int) -> list[int] | None:
    """``seed``: None, an int, or one int per prompt (``n``) → the per-prompt seeds in [0, 2**62), or None."""
    if seed is None or _is_int(seed):
        return None
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise GenerationError(
                f"seed: got a list of {len(seed)} seeds for {n} prompt{'s' if n != 1 else ''}; give one per prompt"
            )
        wrong = [x for x in seed if not _is_int(x)]
        if wrong:
            raise GenerationError(f"seed: a list of seeds must hold integers, got {wrong[0]!r}")
        return [int(x) % 2**62 for x in seed]
    raise GenerationError(f"seed: expected an integer, a list of integers (one per prompt) or None, got {seed!r}")


def _row_seed(seed: int, index: int) -> int:
    """The torch generator seed of prompt ``index`` under ``seed``: both mixed by numpy's SeedSequence (well spread,
    and the same on every platform and numpy version), so that neighbouring prompts get unrelated streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _check_stream(stream) -> None:
    """``stream`` must be callable as ``stream(index, new_text)`` (checked before decoding, not by a
    TypeError from inside the loop)."""
    if not callable(stream):
        raise GenerationError(f"stream: expected a callable stream(index, new_text), got {stream!r}")
    try:
        inspect.signature(stream).bind(0, "")
    except TypeError:
        raise GenerationError(
            f"stream: {stream!r} cannot be called as stream(index, new_text); give it two parameters (the index is "
            "the prompt's, or with n > 1 the result's)"
        ) from None
    except ValueError:  # no signature to read (some builtins): it will be called as it is
        pass


def check_text(text: str, where: str) -> None:
    """Text the tokenizer can take (``errors.check_unicode``), or a GenerationError naming ``where``."""
    check_unicode(text, where, GenerationError)


def _normalize_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or s == "" for s in stops):
        raise GenerationError(f"stop: expected a non-empty string or a list of them, got {stop!r}")
    for i, s in enumerate(stops):
        check_text(s, f"stop[{i}]")
    return list(stops)


def encode_prompts(model, prompts, name: str = "prompts", special_tokens: bool = True) -> list[list[int]]:
    """str | list[str] | list[list[int]] → token ids (strings use the tokenizer's defaults, or none of its special
    tokens with ``special_tokens=False``; ids used as given). ``name``: the argument's name in errors."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise GenerationError(f"{name}: expected a non-empty str, list of str, or list of token-id lists")
    vocab = model.config.vocab_size
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if p == "":
                raise GenerationError(f"{name}[{i}] is an empty string; give at least one character")
            if model.tokenizer is None:
                raise TokenizerError(f"{name}[{i}] is text but {model.path} has no tokenizer; pass token ids")
            check_text(p, f"{name}[{i}]")
            ids = model.tokenizer(p, add_special_tokens=special_tokens)["input_ids"]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise TokenizerError(
                    f"{name}[{i}]: the tokenizer gave id(s) {bad[:5]}, outside the model's vocabulary [0, {vocab}) "
                    f"(config.json vocab_size): the tokenizer files in {model.path} do not belong to these weights"
                )
        elif isinstance(p, (list, tuple)) or (isinstance(p, torch.Tensor) and p.dim() == 1):
            if isinstance(p, torch.Tensor):
                if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
                    raise GenerationError(f"{name}[{i}]: a tensor of token ids must hold integers, got {p.dtype}")
                p = p.tolist()
            wrong = [t for t in p if not _is_int(t)]
            if wrong:
                raise GenerationError(
                    f"{name}[{i}]: token ids must be integers, got {wrong[0]!r} ({type(wrong[0]).__name__}); "
                    "pass text as a str, or a list of int ids"
                )
            ids = [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GenerationError(f"{name}[{i}] holds token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        else:
            raise GenerationError(f"{name}[{i}]: expected str or a list of token ids, got {type(p).__name__}")
        if len(ids) == 0:
            raise GenerationError(f"{name}[{i}] is empty; give at least one token")
        out.append(list(ids))
    return out


def resolve_adapter_rows(model, adapter, n: int, unit: str = "prompt") -> list[int]:
    """adapter=FIRST/None/name/list → per-prompt adapter index (-1 = no adapter)."""
    names = model.adapter_names
    if model.merged_adapter is not None:
        per_row = isinstance(adapter, (list, tuple)) and len(adapter) == n
        if adapter is FIRST_ADAPTER or adapter == model.merged_adapter or (
            per_row and all(a == model.merged_adapter for a in adapter)
        ):
            return [-1] * n
        raise GenerationError(
            f"adapter={adapter!r}: this model was loaded with merge=True, so only the merged adapter "
            f"{model.merged_adapter!r} is available; load with merge=False to switch adapters per prompt"
        )
    if adapter is FIRST_ADAPTER:
        return [0 if names else -1] * n

    def one(a, where: str) -> int:
        if a is None:
            return -1
        if a not in names:
            have = names or "none (pass adapter= to fastdebias.load)"
            raise GenerationError(f"{where}={a!r} is not a loaded adapter; loaded: {have}")
        return names.index(a)

    if isinstance(adapter, (list, tuple)):
        if len(adapter) != n:
            raise GenerationError(
                f"adapter: got a list of {len(adapter)} names for {n} {unit}{'s' if n != 1 else ''}; give one per "
                f"{unit}"
            )
        return [one(a, f"adapter[{i}]") for i, a in enumerate(adapter)]
    return [one(adapter, "adapter")] * n


def _normalize_eos(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.eos_token_ids
    return token_id_list(eos_token_id, model.config.vocab_size, "eos_token_id", GenerationError)


# ------------------------------------------------------------------------------------------- decoding


# A prompt prefix of at least this many tokens that a call's prompts share (a chat template's or SR-LLM's system
# prompt), or that they share with the prefix kept from an earlier call, is prefilled once (``_SharedPrefix``).
MIN_SHARED_PREFIX = 8


def _common_prefix(ids: list[list[int]], tokens: list[int]) -> int:
    """How many leading tokens every prompt of ``ids`` shares with ``tokens``."""
    p = 0
    while p < len(tokens) and all(len(x) > p and x[p] == tokens[p] for x in ids):
        p += 1
    return p


class _SharedPrefix:
    """The K/V cache of a prompt prefix, one row per adapter, copied into each prompt's cache row at the row's own
    offset (rows are left-padded, and positions count from each row's start, so a prefix's keys and values are the
    same in every row of one adapter), so that a prefill computes only what follows it.

    Computed once for the longest prefix all of a call's prompts share (a ``debias`` job: every prompt opens with the
    same system prompt and instruction), or copied out of the cache after a one-prompt call's prefill; the runner
    keeps the most recent one (``runner.prefix``), so a later call whose prompts begin the same way (a pipeline
    debiasing one text at a time) prefills only what differs. Valid for its model as long as the model lives: the
    weights, adapters, dtype and backend are fixed at load."""

    def __init__(self, tokens: list[int], adapters: list[int], cache: KVCache) -> None:
        self.tokens, self.adapters, self.cache = tokens, adapters, cache  # cache: [len(adapters), H, len(tokens), D]

    @classmethod
    def compute(cls, model, tokens: list[int], adapters: list[int]) -> _SharedPrefix:
        """Prefill ``tokens`` once per adapter of ``adapters`` (-1: none)."""
        dev, k, p = model.device, len(adapters), len(tokens)
        cache = KVCache.allocate(model.config, k, p, model.dtype, dev)
        adapter_idx = torch.tensor(adapters, dtype=torch.int32, device=dev) if max(adapters) >= 0 else None
        batch = torch.tensor([tokens] * k, dtype=torch.long, device=dev)
        model.runner.prefill(batch, torch.zeros(k, dtype=torch.long, device=dev), cache, adapter_idx, padded=False)
        return cls(tokens, adapters, cache)

    @classmethod
    def keep(cls, cache: KVCache, tokens: list[int], adapter: int) -> _SharedPrefix:
        """A copy of slots 0..len(tokens)-1 of row 0 of ``cache`` (a one-prompt call's prefill, unpadded)."""
        p = len(tokens)
        return cls(tokens, [adapter], KVCache([k[:1, :, :p].clone() for k in cache.k],
                                              [v[:1, :, :p].clone() for v in cache.v]))  # fmt: skip

    def write(self, cache: KVCache, start: list[int], rows: list[int], p: int) -> int:
        """Copy the prefix's first ``p`` slots into the first ``len(start)`` rows of ``cache``, at slots ``start[r]``
        onwards (``rows``: their adapters) → the first slot that some row still has to prefill."""
        b = len(start)
        dev = cache.k[0].device
        which = torch.tensor([self.adapters.index(a) for a in rows], dtype=torch.long, device=dev)
        slots = torch.tensor(start, dtype=torch.long, device=dev).view(b, 1) + torch.arange(p, device=dev)
        for dst, src in zip(cache.k + cache.v, self.cache.k + self.cache.v):
            src = src[:, :, :p].index_select(0, which)  # [b, H, p, D]
            dst[:b].scatter_(2, slots.view(b, 1, p, 1).expand_as(src), src)
        return min(start) + p


def _keep_prefix(model, cache: KVCache, tokens: list[int], adapter: int) -> None:
    """After a one-prompt call's prefill (row 0 of ``cache``, unpadded): keep the K/V of ``tokens`` but the last
    (whose logits a later prompt computes itself) as the runner's prefix, for the next call's prompts that begin
    the same way; only with ``runner.share_prefix`` and more than ``MIN_SHARED_PREFIX`` tokens."""
    if model.runner.share_prefix and len(tokens) > MIN_SHARED_PREFIX:
        model.runner.prefix = _SharedPrefix.keep(cache, tokens[:-1], adapter)


def _find_prefix(model, ids: list[list[int]], rows: list[int]) -> tuple[_SharedPrefix, int] | None:
    """The prefix that the prompts ``ids`` (``rows``: their adapters) can start from, and how many of its tokens:
    the runner's kept one where it covers at least ``MIN_SHARED_PREFIX`` of their common prefix and their adapters,
    else (several prompts) their common prefix, computed and kept; None if neither is long enough. Each prompt keeps
    its last token to prefill (its logits choose the first new token)."""
    common = ids[0][: min(len(x) for x in ids) - 1]
    common = common[: _common_prefix(ids, common)]
    kept = model.runner.prefix
    if kept is not None and set(rows) <= set(kept.adapters):
        p = _common_prefix([common], kept.tokens)
        if p >= MIN_SHARED_PREFIX:
            return kept, p
    if len(ids) > 1 and len(common) >= MIN_SHARED_PREFIX:
        model.runner.prefix = _SharedPrefix.compute(model, common, sorted(set(rows)))
        return model.runner.prefix, len(common)
    return None


def prefill(model, ids: list[list[int]], max_new_tokens: int, adapter_idx: torch.Tensor | None,
            length: int | None = None, own_cache: bool = False,
            prefix: tuple[_SharedPrefix, int, list[int]] | None = None,
            prompt_logprobs: int | None = None):  # fmt: skip
    """Left-pad ``ids`` into [B, T], get the static cache from the model's runner (``length`` slots, default
    T + ``max_new_tokens``), run the prompt (chunked). ``own_cache``: a cache of T slots of their own instead
    (prompts that join a running batch: the runner's cache is in use; ``runner.place_rows`` copies it there).
    ``prefix``: (a prefix that all of ``ids`` begin with, how many of its tokens, their adapters): copied in, then
    only the rest is prefilled.

    Prompts given more than once with the same adapter (``generate(n=...)``'s samples) are prefilled once, their
    cache rows copied (unless ``runner.share_prefix`` is off).

    Returns (last-position logits [B, V] fp32, cache, start [B], padded prompt tokens [B, T]); with
    ``prompt_logprobs=N`` a fifth item, the prompt tokens' log-probabilities (``runner.prefill``'s; not those of
    the slots a ``prefix`` fills).
    """
    dev = model.device
    b, t = len(ids), max(len(x) for x in ids)
    if model.runner.share_prefix and len({tuple(x) for x in ids}) < b:
        adapters = adapter_idx.tolist() if adapter_idx is not None else [-1] * b
        seen: dict = {}  # (prompt, adapter) → its place among the distinct rows
        which = [seen.setdefault((tuple(x), a), len(seen)) for x, a in zip(ids, adapters)]
        if len(seen) < b:
            distinct = [which.index(j) for j in range(len(seen))]  # each distinct row's first occurrence
            return _prefill_distinct(model, ids, distinct, which, max_new_tokens, adapter_idx, length, own_cache,
                                     prefix, prompt_logprobs)  # fmt: skip
    tokens = torch.zeros(b, t, dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, t - len(x):] = torch.tensor(x, dtype=torch.long)
    starts = [t - len(x) for x in ids]
    start = torch.tensor(starts, dtype=torch.long, device=dev)
    if own_cache:
        cache = KVCache.allocate(model.config, b, t, model.dtype, dev)
    else:
        cache = model.runner.allocate(b, length or t + max_new_tokens, model.dtype, dev)
    first = prefix[0].write(cache, starts, prefix[2], prefix[1]) if prefix is not None else 0
    tokens = tokens.to(dev)
    out = model.runner.prefill(tokens, start, cache, adapter_idx, padded=any(len(x) != t for x in ids),
                               first=first, prompt_logprobs=prompt_logprobs)  # fmt: skip
    if prompt_logprobs is None:
        return out, cache, start, tokens
    return out[0], cache, start, tokens, out[1]


def _prefill_distinct(model, ids, distinct: list[int], which: list[int], max_new_tokens, adapter_idx, length,
                      own_cache, prefix, prompt_logprobs):  # fmt: skip
    """``prefill`` of the rows ``distinct`` only (one per distinct prompt and adapter, in a cache of their own), then
    each row's logits, start, tokens and cache rows taken from its prompt's (``which``: each row's place among the
    distinct ones; the padded length is the same: the same prompts are the longest)."""
    dev = model.device
    sub = torch.tensor(distinct, dtype=torch.long, device=dev)
    which = torch.tensor(which, dtype=torch.long, device=dev)
    sub_prefix = (prefix[0], prefix[1], [prefix[2][i] for i in distinct]) if prefix is not None else None
    logits, small, start, tokens, *scores = prefill(
        model, [ids[i] for i in distinct], max_new_tokens,
        adapter_idx.index_select(0, sub) if adapter_idx is not None else None,
        own_cache=True, prefix=sub_prefix, prompt_logprobs=prompt_logprobs)  # fmt: skip
    b, t = len(ids), tokens.shape[1]
    if own_cache:
        cache = KVCache([k.index_select(0, which) for k in small.k], [v.index_select(0, which) for v in small.v])
    else:
        cache = model.runner.allocate(b, length or t + max_new_tokens, model.dtype, dev)
        for dst, src in zip(cache.k + cache.v, small.k + small.v):
            dst[:b, :, :t] = src.index_select(0, which)
    out = (logits.index_select(0, which), cache, start.index_select(0, which), tokens.index_select(0, which))
    if scores:
        out += (tuple(x.index_select(0, which) if x is not None else None for x in scores[0]),)
    return out


def _prompt_scores(scores, ids: list[list[int]]) -> list[tuple[list, list | None]]:
    """``prefill``'s prompt log-probabilities for the left-padded prompts ``ids`` → per prompt (log-probabilities,
    top tokens or None): one entry per prompt token, None for the first (nothing comes before it)."""
    lp, top_lp, top_ids = (x.tolist() if x is not None else None for x in scores)
    out = []
    for j, x in enumerate(ids):
        t = len(lp[j])
        a = t - len(x)  # the prompt's first slot; slot p holds token p+1's log-probability
        top = None
        if top_lp is not None:
            top = [None] + [list(zip(i, v)) for i, v in zip(top_ids[j][a : t - 1], top_lp[j][a : t - 1])]
        out.append(([None] + lp[j][a : t - 1], top))
    return out


def decode_one_token(model, token: torch.Tensor, slots: torch.Tensor, kv_len: int, start, cache, adapter_idx,
                     head: bool = True):  # fmt: skip
    """token: [B] written at per-row cache ``slots`` [B] → fp32 logits [B, V] for the next position (``head=False``:
    the final hidden state [B, K], for the fused lm_head + step)."""
    return model.runner.decode(token, slots, kv_len, start, cache, adapter_idx, head=head)


# Rows up to which the Triton backend fuses the lm_head into the logits step (greedy and plain sampling): on the
# H100 the fused kernel beat F.linear + step at batch 1-8 and lost from 64 (bench/results/logits_*.md).
FUSED_HEAD_MAX_ROWS = 8
# generate(seed=[...]): the call-wide seed under which each prompt's own seed picks its noise stream (a constant:
# a prompt's draws then depend on its seed only)
PER_PROMPT_SEEDS = 0x1D8E4E27C47D124F
MAX_TOP_LOGPROBS = 20  # generate(top_logprobs=N): OpenAI's bound (vLLM's default max_logprobs)
MAX_LOOKUP_TOKENS, MAX_LOOKUP_NGRAM = 32, 8  # generate(prompt_lookup_tokens=k, prompt_lookup_ngram=n): bounds


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string (not yet streamable)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _LexiconState:
    """Per-batch lexicon bookkeeping on the device: automaton states, rewinds, position bans, the log."""

    ROWS = ("state", "hist", "rewinds", "ban_pos", "ban_tok")  # per-row tensors (and ``log``, rows on its dim 1)

    def __init__(self, matcher, mode: str, max_rewinds: int, prompt: torch.Tensor, start: torch.Tensor,
                 max_new: int, n_iter: int) -> None:
        b, t = prompt.shape
        dev = prompt.device
        self.m, self.backtrack, self.max_rewinds = matcher, mode == "backtrack", max_rewinds
        matcher.prepare(torch.float32)  # the step applies the lexicon to fp32 logits
        real = torch.arange(t, device=dev).view(1, t) >= start.view(b, 1)
        self.state = matcher.init_states(prompt, real)  # [B]
        self.hist = torch.zeros(b, max_new + 1, dtype=torch.long, device=dev)  # state before each position
        self.hist[:, 0] = self.state
        self.rewinds = torch.zeros(b, dtype=torch.long, device=dev)
        k = max(max_rewinds, 1)
        self.ban_pos = torch.full((b, k), -1, dtype=torch.long, device=dev)  # a rewind bans ban_tok at ban_pos
        self.ban_tok = torch.zeros(b, k, dtype=torch.long, device=dev)
        # log: per iteration, up to two records (the chosen token's penalty; a ban/rewind)
        self.log = torch.full((4, b, n_iter, 2), -1, dtype=torch.long, device=dev)  # pos, entry, action, token

    def hf_rows(self, cur: torch.Tensor) -> torch.Tensor | bool:
        """Rows that use transformers' last-token masking for phrase bans this step."""
        if not self.backtrack:
            return True
        # past the rewind budget, or the matched context reaches into the prompt (a rewind cannot go there)
        return (self.rewinds >= self.max_rewinds) | (self.m.depth[self.state] > cur)

    def apply(self, logits, cur, hf_rows):
        x = self.m.apply(logits, self.state, mask_phrases=hf_rows)
        if self.backtrack:
            # -inf at each ban of this position, +inf (no change under amin) at the other slots: [B, K] writes, not
            # a [B, V] mask; duplicate ids are fine (a minimum is order-free)
            here = torch.where(self.ban_pos == cur.view(-1, 1), float("-inf"), float("inf")).to(x.dtype)
            x = x.scatter_reduce_(1, self.ban_tok, here, reduce="amin")  # (x: a new tensor from m.apply)
        return x

    def record(self, ar: torch.Tensor, it: torch.Tensor, slot: int, mask, pos, entry, action: int | torch.Tensor,
               token) -> None:  # fmt: skip
        """Log (pos, entry, action, token) at each row's step ``it`` ([B] device tensor: indices the host never
        reads; ``ar``: the rows' indices)."""
        # one stacked write (a handful of launches per record, not four of each): this runs every step on the device
        action = action if isinstance(action, torch.Tensor) else torch.full_like(pos, action)
        vals = torch.stack((pos, entry, action, token))  # [4, B]
        keep = (mask & (entry >= 0)).view(1, -1)
        it = it.clamp(max=self.log.shape[2] - 1)  # (a finished row's step may run past the log; it writes nothing)
        self.log[:, ar, it, slot] = torch.where(keep, vals, self.log[:, ar, it, slot])

    def results(self, rows: list[int]) -> list[list]:
        """The interventions of each of ``rows``, from one read of the log."""
        from fastdebias.lexicon import interventions_from_log

        log = self.log[:, rows].cpu()
        out = []
        for j in range(len(rows)):
            pos, entry, action, token = (x[j].reshape(-1) for x in log)
            keep = entry >= 0
            out.append(interventions_from_log(self.m, pos[keep], entry[keep], action[keep], token[keep]))
        return out

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (indices): see ``_Loop.select``."""
        for name in self.ROWS:
            setattr(self, name, getattr(self, name).index_select(0, keep))
        self.log = self.log.index_select(1, keep)

    def assign(self, rows: torch.Tensor, other: _LexiconState) -> None:
        """Rows ``rows`` become those of ``other``, in place: see ``_Loop.assign``."""
        for name in self.ROWS:
            getattr(self, name)[rows] = getattr(other, name)
        self.log[:, rows] = other.log


class _Loop:
    """What the decode loop carries from step to step: device tensors, updated in place by ``_advance`` (so that a
    compiled or captured step reads and writes the same addresses at every step), and the step's settings."""

    # the per-row tensors (first dimension: the batch's rows)
    ROWS = ("t", "it", "out", "lp", "top_lp", "top_ids", "cur", "done", "all_banned", "counts", "out_counts",
            "prompt_last", "adapter_idx", "row_ids", "ctx", "ctx_start", "hold")

    def __init__(self, model, prompt, start, adapter_idx, *, max_new_tokens, temperature, top_k, top_p, min_p,
                 repetition_penalty, generators, seed, row_ids, eos, lex, fused_step, n_iter,
                 logprobs=False, top_logprobs=0, min_new_tokens=0, presence_penalty=0.0,
                 frequency_penalty=0.0, no_repeat_ngram_size=0, prompt_width=0, lookup=False) -> None:  # fmt: skip
        b, t = prompt.shape
        dev, v = prompt.device, model.config.vocab_size
        self.b, self.max_new, self.n_iter = b, max_new_tokens, n_iter
        # each row's padded prompt length, on the device: a compiled step would otherwise specialise on it (a
        # recompile for every new prompt length); per row, since rows that join a running batch bring their own
        self.t = torch.full((b,), t, dtype=torch.long, device=dev)
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.penalty = repetition_penalty
        # the torch backend's seeded sampling: a generator per row, seeded by (seed, prompt index), so that a row's
        # draws do not depend on the batch; host objects, reordered with the rows (``select``, ``assign``)
        self.generators, self.seed, self.row_ids = generators, seed, row_ids
        self.fused_step = fused_step
        self.head_w, self.head_lora = model.decoder.lm_head.weight, model.decoder.lm_head.loras[0]
        # (a contiguous copy: a compiled step guards on strides, and prompt[:, -1]'s stride is the prompt length,
        # which .contiguous() keeps for a single row)
        last = prompt[:, -1].clone(memory_format=torch.contiguous_format)
        self.adapter_idx, self.prompt_last, self.lex = adapter_idx, last, lex
        self.ar = torch.arange(b, device=dev)
        self.eos = torch.tensor(eos or [-1], dtype=torch.long, device=dev)
        # EOS ids are banned while a row has kept fewer tokens than this (nothing to ban without EOS ids)
        self.min_new = min_new_tokens if eos else 0
        self.pad_token = eos[0] if eos else 0
        self.positions = torch.arange(max_new_tokens, device=dev).view(1, -1)
        self.counts = None
        if repetition_penalty != 1.0:  # token counts of the context (counts, not flags, so a rewind can undo them)
            real = (torch.arange(t, device=dev).view(1, t) >= start.view(b, 1)).int()
            self.counts = torch.zeros(b, v, dtype=torch.int32, device=dev).scatter_add_(1, prompt, real)
        # vLLM's presence/frequency penalties: counts of the row's generated tokens only (undone by rewinds too)
        self.presence, self.frequency = presence_penalty, frequency_penalty
        self.out_counts = None
        if presence_penalty != 0.0 or frequency_penalty != 0.0:
            self.out_counts = torch.zeros(b, v, dtype=torch.int32, device=dev)
        self.out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=dev)
        # with logprobs: each kept token's log-probability under the model's raw logits, beside ``out``
        self.lp = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=dev) if logprobs else None
        # with top_logprobs: the most likely tokens at each kept position and their log-probabilities
        self.top_lp = self.top_ids = None
        if top_logprobs:
            top_logprobs = min(top_logprobs, v)
            self.top_lp = torch.zeros(b, max_new_tokens, top_logprobs, dtype=torch.float32, device=dev)
            self.top_ids = torch.zeros(b, max_new_tokens, top_logprobs, dtype=torch.long, device=dev)
        self.cur = torch.zeros(b, dtype=torch.long, device=dev)  # tokens kept per row; row b's next position
        # no_repeat_ngram_size and prompt lookup: each row's prompt, left-padded to the call's longest
        # (``prompt_width``: one width for every row, those that join the batch later included), so that prompt +
        # ``out`` is one sequence from ``ctx_start``; the n-grams are looked up in it at each step
        self.ngram = no_repeat_ngram_size
        self.ctx = self.ctx_start = None
        if no_repeat_ngram_size or lookup:
            self.ctx = torch.nn.functional.pad(prompt, (prompt_width - t, 0))
            self.ctx_start = start + (prompt_width - t)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        self.all_banned = torch.zeros(b, dtype=torch.bool, device=dev)
        # each row's step, on the device (the Triton step's noise counter, the log's index): rows that join a
        # running batch start from 0, so a row's tokens do not depend on when it joined
        self.it = torch.zeros(b, dtype=torch.long, device=dev)
        # prompt lookup: the rows that take no step at this verified position (a draft token was rejected before it:
        # set by ``_verify`` between ``_advance`` calls; in place, so a compiled step reads the same tensor)
        self.hold = torch.zeros(b, dtype=torch.bool, device=dev) if lookup else None

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (a [B'] index tensor, in order) of every per-row tensor: retiring finished
        rows. The call-wide settings (seed, EOS ids, sizes) stay."""
        for name in self.ROWS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, keep))
        self.b = keep.numel()
        self.ar = torch.arange(self.b, device=keep.device)
        if self.lex is not None:
            self.lex.select(keep)
        if self.generators is not None:
            self.generators = [self.generators[i] for i in keep.tolist()]

    def assign(self, rows: torch.Tensor, other: _Loop) -> None:
        """Rows ``rows`` (a [k] index tensor) become the rows of ``other`` (k prompts joining the batch, with the
        same call's settings), in place: every tensor keeps its address, so a compiled or captured step goes on
        reading and writing the same memory."""
        for name in self.ROWS:
            t = getattr(self, name)
            if t is not None:
                t[rows] = getattr(other, name)
        if self.lex is not None:
            self.lex.assign(rows, other.lex)
        if self.generators is not None:
            for r, g in zip(rows.tolist(), other.generators):
                self.generators[r] = g


@torch.compiler.disable
def _triton_choice(s: _Loop, x: torch.Tensor, hidden: bool, hf_rows):
    """The Triton logits step in one fused pass: lexicon, position bans, repetition penalty, temperature,
    top-k/top-p/min-p, choice, automaton advance and lookup of the chosen token. Opaque to ``torch.compile``
    (launched as is between the compiled parts of ``_advance``): its host-side values, the seed among them, are not
    guarded."""
    lex = s.lex
    bans = torch.where(lex.ban_pos == s.cur.view(s.b, 1), lex.ban_tok, -1) if lex and lex.backtrack else None
    if s.min_new:
        early = torch.where((s.cur < s.min_new).view(s.b, 1), s.eos.view(1, -1), -1)
        bans = early if bans is None else torch.cat([bans, early], dim=1)
    # (an lm_head adapter is loaded but no row of this call uses an adapter: adapter_idx is None, no LoRA to add)
    head_lora = s.head_lora if s.adapter_idx is not None else None
    head_args = (dict(hidden=x, lm_head=s.head_w, lm_head_lora=head_lora, adapter_idx=s.adapter_idx)
                 if hidden else dict(logits=x))  # fmt: skip
    return ops.logits_step(
        **head_args, matcher=lex.m if lex else None, states=lex.state if lex else None, mask_phrases=hf_rows,
        banned_tokens=bans, counts=s.counts, repetition_penalty=s.penalty, output_counts=s.out_counts,
        presence_penalty=s.presence, frequency_penalty=s.frequency, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, seed=s.seed, step=s.it, row_ids=s.row_ids, backend="triton",
    )  # fmt: skip


def _ban_repeated_ngrams(s: _Loop, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``no_repeat_ngram_size`` (n): -inf for each token that would complete an n-gram that already
    occurs in the row's sequence (its prompt and kept tokens, padding excluded), on the device: the row's last n-1
    tokens are compared with every window of the sequence, and the token after each matching window is banned."""
    n, b = s.ngram, s.b
    seq = torch.cat([s.ctx, s.out], dim=1)  # [B, W]: row r's sequence is seq[r, ctx_start[r]:end[r]]
    if seq.shape[1] < n:  # no row can hold an n-gram (prompt + max_new_tokens < n): nothing to ban
        return x
    end = s.ctx.shape[1] + s.cur
    ar = torch.arange(n - 1, device=x.device)
    suffix = seq.gather(1, (end.view(b, 1) - (n - 1) + ar).clamp(min=0))  # the last n-1 tokens [B, n-1]
    windows = seq.unfold(1, n, 1)  # [B, W - n + 1, n]
    j = torch.arange(windows.shape[1], device=x.device).view(1, -1)
    hit = (windows[:, :, : n - 1] == suffix.view(b, 1, n - 1)).all(dim=-1)
    # a window lies in the row's sequence, before its last token (so a row of fewer than n tokens bans nothing, and
    # a suffix gathered partly from the padding matches no window)
    hit &= (j >= s.ctx_start.view(b, 1)) & (j + n - 1 < end.view(b, 1))
    # -inf at the banned ids, as a minimum so that the windows that ban nothing (+inf) change nothing
    fill = torch.where(hit, float("-inf"), float("inf"))
    return x.scatter_reduce(1, windows[:, :, n - 1], fill, reduce="amin", include_self=True)


def _advance(s: _Loop, x: torch.Tensor, hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step after the model's forward: choose each row's token from ``x`` (fp32 logits [B, V], or with
    ``hidden`` the final hidden state [B, K] for the fused lm_head + step), then the bookkeeping (output, done
    flags, repetition counts, lexicon states, rewinds, the interventions log), all in place on ``s``.

    Returns the token to feed each row next [B] and its cache slot [B]. Tensor ops only, no host read: under
    ``runtime="compile"`` it is compiled (dynamic shapes: one graph for a batch of 1, one for any other)."""
    b, lex, cur, done = s.b, s.lex, s.cur, s.done
    idle = done if s.hold is None else done | s.hold  # rows that take no step: finished, or held (prompt lookup)
    hf_rows = lex.hf_rows(cur) if lex is not None else True
    raw = x  # (the model's logits, for logprobs; ``x`` becomes the logits the step chooses from)
    if s.ngram:  # no_repeat_ngram_size: before everything else (the fused lm_head is off: the logits exist)
        x = _ban_repeated_ngrams(s, x)
    if s.fused_step:
        r = _triton_choice(s, x, hidden, hf_rows)
        nxt, dead = r.next_ids, r.all_banned & ~idle
        if lex is not None:
            bias, ban_len, entry, next_state = r.bias, r.ban_len, r.entry, r.states
    else:
        y = x
        if lex is not None:
            y = lex.apply(y, cur, hf_rows)
        if s.min_new:  # EOS banned in rows that have kept fewer than min_new_tokens
            e = s.eos.view(1, -1).expand(b, -1)
            y = y.scatter(1, e, torch.where((cur < s.min_new).view(b, 1), float("-inf"), y.gather(1, e)))
        if s.counts is not None:
            y = apply_repetition_penalty(y, s.counts > 0, s.penalty)
        if s.out_counts is not None:
            y = apply_presence_frequency(y, s.out_counts, s.presence, s.frequency)
        # A row whose every token is banned finishes here ("banned"): never NaN, never a random token.
        dead = torch.isneginf(y).all(dim=-1) & ~idle
        y = torch.where(dead.view(b, 1), torch.zeros_like(y), y)
        gens = s.generators
        # a held row's step has not happened: it draws nothing yet (a host read of the flags: a sync on CUDA, for
        # the torch backend's seeded sampling with prompt lookup only)
        if gens is not None and s.hold is not None:
            gens = [None if h else g for g, h in zip(gens, s.hold.tolist())]
        nxt = choose_tokens(y, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                            generator=gens)
        if lex is not None:
            bias, ban_len, entry = lex.m.lookup(lex.state, nxt, mask_phrases=hf_rows)
            next_state = lex.m.step(lex.state, nxt)
    s.all_banned |= dead
    active = ~idle & ~dead
    # rows that keep this step's token: the active ones, less those that rewind (backtracking only)
    rewind = active & (ban_len >= 2) & ~hf_rows if lex is not None and lex.backtrack else None
    commit = active & ~rewind if rewind is not None else active
    ar, out = s.ar, s.out
    wpos = cur.clamp(max=s.max_new - 1)
    if s.lp is not None:  # the model's own log-probability of the chosen token (``x``: the raw fp32 logits)
        # (an all-banned row's token is -1 on the Triton step: not kept, but it must index)
        norm = torch.logsumexp(raw, dim=-1)
        chosen = raw.gather(1, nxt.clamp(min=0).view(b, 1)).squeeze(1) - norm
        s.lp[ar, wpos] = torch.where(commit, chosen, s.lp[ar, wpos])
        if s.top_lp is not None:  # the most likely tokens at this position (sorted, most likely first)
            vals, ids = torch.topk(raw, s.top_lp.shape[2], dim=-1)
            keep = commit.view(b, 1)
            s.top_lp[ar, wpos] = torch.where(keep, vals - norm.view(b, 1), s.top_lp[ar, wpos])
            s.top_ids[ar, wpos] = torch.where(keep, ids, s.top_ids[ar, wpos])
    if lex is not None:
        penalised = commit & torch.isfinite(bias) & (bias != 0)
        lex.record(ar, s.it, 0, penalised, cur, entry, 0, nxt)
        # The model's own first choice, when the lexicon displaced it: banned, or penalised out of first place.
        if s.fused_step:  # the step kernel looked the model's first choice up too
            top, top_bias, top_len, top_entry = r.top, r.top_bias, r.top_ban_len, r.top_entry
        else:
            top = x.argmax(dim=-1)
            top_bias, top_len, top_entry = lex.m.lookup(lex.state, top, mask_phrases=hf_rows)
        masked = (top_len == 1) | ((top_len >= 2) & hf_rows)
        displaced = commit & (top != nxt) & (masked | (torch.isfinite(top_bias) & (top_bias < 0)))
        # slot 1 holds this (action 1 = banned, 0 = penalised) or, in a rewinding row, the rewind: one write
        slot1 = (displaced, cur, top_entry, masked.long(), top)
    nxt = torch.where(commit, nxt, torch.full_like(nxt, s.pad_token))
    out[ar, wpos] = torch.where(commit, nxt, out[ar, wpos])
    for c in (s.counts, s.out_counts):
        if c is not None:
            c.scatter_add_(1, nxt.view(b, 1), commit.int().view(b, 1))
    if lex is not None:
        lex.state.copy_(torch.where(commit, next_state, lex.state))
        if lex.backtrack:
            # rewind to where the phrase began, ban its first token there, restore that position's state
            p = torch.where(rewind, cur - (ban_len - 1), cur).clamp(min=0)
            first = out[ar, p.clamp(max=s.max_new - 1)]
            rewound = (p, entry, 2, first)
            slot1 = (slot1[0] | rewind, *(torch.where(rewind, rw, d) for rw, d in zip(rewound, slot1[1:])))
            slot = lex.rewinds.clamp(max=lex.ban_pos.shape[1] - 1)
            stale = lex.ban_pos > p.view(b, 1)  # bans past the rewind point belong to a context now gone
            lex.ban_pos.masked_fill_(stale & rewind.view(b, 1), -1)
            lex.ban_pos[ar, slot] = torch.where(rewind, p, lex.ban_pos[ar, slot])
            lex.ban_tok[ar, slot] = torch.where(rewind, first, lex.ban_tok[ar, slot])
            if s.counts is not None or s.out_counts is not None:
                drop = (s.positions >= p.view(b, 1)) & (s.positions < cur.view(b, 1)) & rewind.view(b, 1)
                for c in (s.counts, s.out_counts):
                    if c is not None:
                        c.scatter_add_(1, out, -drop.int())
            lex.rewinds += rewind.long()
            new_cur = torch.where(rewind, p, cur + commit.long())
            lex.state.copy_(torch.where(rewind, lex.hist[ar, new_cur], lex.state))
            lex.hist[ar, new_cur.clamp(max=s.max_new)] = lex.state
        else:
            new_cur = cur + commit.long()
        lex.record(ar, s.it, 1, *slot1)  # slot1 may hold this step's positions (cur): written before cur moves on
    else:
        new_cur = cur + commit.long()
    cur.copy_(new_cur)
    # EOS by comparison with each id (torch.isin may sort and unique for longer id lists: a host sync on CUDA)
    is_eos = (nxt.view(b, 1) == s.eos.view(1, -1)).any(dim=-1)
    done |= (commit & is_eos) | (cur >= s.max_new) | dead
    if s.hold is None:
        s.it += 1
    else:  # (a held row's step has not happened: its counter waits)
        s.it += (~s.hold).long()
    done |= s.it >= s.n_iter  # the row's last step (its rewinds included)
    feed = torch.where(cur > 0, out[ar, (cur - 1).clamp(min=0)], s.prompt_last)
    return feed, s.t + cur - 1


def _lookup_drafts(s: _Loop, k: int, max_ngram: int) -> torch.Tensor:
    """Prompt lookup (transformers' ``prompt_lookup_num_tokens``, vLLM's n-gram speculation): each row's ``k`` draft
    tokens [B, k], the tokens that followed the latest earlier occurrence of the row's last n tokens in its
    sequence (prompt and kept tokens), for the largest n from ``max_ngram`` down to 1 that occurs. A rewrite copies
    much of its input, so the drafts are often right. Where nothing matches, or the match runs past the row's last
    token, the row's last token stands in (a draft that is merely rejected). Tensor ops on the device, no host
    read. Returns (drafts, found [B]: whether the row's drafts come from a match)."""
    b = s.b
    seq = torch.cat([s.ctx, s.out], dim=1)  # [B, W]: row r's sequence is seq[r, ctx_start[r]:end[r]]
    end = (s.ctx.shape[1] + s.cur).view(b, 1)
    last = (end - 1).clamp(min=0)
    drafts = seq.gather(1, last).expand(b, k)
    found = torch.zeros(b, 1, dtype=torch.bool, device=seq.device)
    ahead = torch.arange(k, device=seq.device).view(1, k)
    for n in range(max_ngram, 0, -1):
        suffix = seq.gather(1, (end - n + torch.arange(n, device=seq.device)).clamp(min=0))  # [B, n]
        windows = seq.unfold(1, n, 1)  # [B, W - n + 1, n]
        j = torch.arange(windows.shape[1], device=seq.device).view(1, -1)
        hit = (windows == suffix.view(b, 1, n)).all(dim=-1)
        # a window in the row's sequence that ends before its last token (a token follows it; not the suffix itself)
        hit &= (j >= s.ctx_start.view(b, 1)) & (j < end - n)
        at = torch.where(hit, j, -1).amax(dim=1, keepdim=True)  # the latest occurrence
        use = (at >= 0) & ~found & (end - n >= s.ctx_start.view(b, 1))  # (a suffix of n real tokens)
        drafts = torch.where(use, seq.gather(1, torch.minimum(at + n + ahead, last)), drafts)
        found |= use
    return drafts, found.view(b)


def _verify(advance, s: _Loop, x: torch.Tensor, drafts: torch.Tensor, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt lookup's verification: ``x`` [T, B, V] holds the logits after each row's last kept token and after
    each of its T - 1 drafts (``drafts`` [B, T - 1]). ``advance`` (the loop's step, exactly as without drafts:
    lexicon, penalties, logprobs, rewinds, sampling) runs position by position; a row goes on to the next position
    only while it kept the token its draft held there, so what it keeps is what decoding one token at a time would
    have kept (greedy; sampled, with draws keyed by the row's step, which a held row does not take), and a row keeps
    1 to T tokens per forward. ``sync``: read the rows' flags after each position and stop when none goes on (on
    CPU, where the read costs nothing). Returns ``advance``'s (feed, slots) of the last position run."""
    s.hold.zero_()
    t = x.shape[0]
    for i in range(t):
        before = s.cur.clone()
        feed, slots = advance(s, x[i], False)
        if i == t - 1:
            break
        s.hold |= (s.cur != before + 1) | (feed != drafts[:, i])
        if sync and bool((s.hold | s.done).all()):
            break
    return feed, slots


def _generate_batch(
    model,
    ids: list[list[int]],
    rows: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    seed: int | None,
    eos: list[int],
    stop: list[str],
    stream: Callable[[int, str], None] | None,
    index: list[int],
    keys: list[int] | None = None,
    matcher=None,
    lexicon_mode: str = "backtrack",
    max_rewinds: int = 8,
    max_rows: int | None = None,
    on_finished: Callable[[int], None] | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    min_new_tokens: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    prompt_logprobs: bool = False,
    prompt_lookup_tokens: int = 0,
    prompt_lookup_ngram: int = 3,
) -> list[GenerationResult]:
    """Decode ``ids`` (``index``: their prompt indices, for the stream) → a result each. ``keys``: each prompt's
    noise stream under ``seed`` (the Triton step's row id, the torch generator's seed with ``seed``); default
    ``index``.

    ``max_rows`` (default: all): rows decoded at once. The first ``max_rows`` prompts start together, and while
    prompts wait, each finished row's place goes to the next one (continuous batching: prefilled, then decoded
    with the others; written into the row in place, so the batch keeps its shape and every tensor its address,
    which CUDA graphs need). Once none wait, finished rows leave the batch where the runtime allows it
    (``runner.min_rows_after_retiring``). ``on_finished(k)``: told each time ``k`` more prompts are done.
    """
    dev = model.device
    n, v = len(ids), model.config.vocab_size
    keys = index if keys is None else keys
    max_rows = min(max_rows or n, n)
    min_rows = model.runner.min_rows_after_retiring()
    has_adapter = any(r >= 0 for r in rows)
    # one cache length for the whole call: any of its prompts may take a row of the batch's cache
    cache_len = max(len(x) for x in ids) + max_new_tokens
    n_iter = max_new_tokens
    if matcher is not None and lexicon_mode == "backtrack":  # each rewind costs one step plus the positions it gives
        n_iter += max_rewinds * (matcher.max_depth + 1)  # back
    stop_hit = [False] * n
    emitted = [""] * n
    host_each_step = bool(stop) or stream is not None
    check_every = 1 if (host_each_step or dev.type == "cpu") else 8
    tok = model.tokenizer
    hold_tokens = matcher.max_depth if (matcher is not None and lexicon_mode == "backtrack") else 0
    fused_step = model.backend == "triton"
    # prompt lookup: each forward runs a row's last kept token and k drafts, T = k + 1 positions (``_verify``)
    lookup, span = prompt_lookup_tokens, prompt_lookup_tokens + 1
    # the fused lm_head + step (never materialises [B, V] logits); top-k/top-p/min-p and logprobs need the logits
    fused_head = (fused_step and max_rows <= FUSED_HEAD_MAX_ROWS and not logprobs and not no_repeat_ngram_size
                  and not lookup and (temperature == 0 or (not 0 < top_k < v and top_p >= 1.0 and min_p == 0.0)))
    if fused_step:  # the Triton logits step draws Philox noise keyed by (seed, row, step): no torch generator
        seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())

    # (prompt log-probabilities need every prompt token run through the model: no prefix copied in)
    shared = _find_prefix(model, ids, rows) if model.runner.share_prefix and not prompt_logprobs else None
    prompt_scores: dict[int, tuple] = {}  # prompt → its prompt log-probabilities (with prompt_logprobs)

    def start_rows(members: list[int], join: bool = False):
        """Prefill the prompts ``members`` (positions in ``ids``) → their loop state, first logits, cache, start.
        ``join``: prompts joining the running batch (a cache of their own, for ``runner.place_rows``)."""
        adapter_idx = (torch.tensor([rows[i] for i in members], dtype=torch.int32, device=dev)
                       if has_adapter else None)  # fmt: skip
        prefix = (*shared, [rows[i] for i in members]) if shared else None
        logits, cache, start, prompt, *scores = prefill(
            model, [ids[i] for i in members], max_new_tokens, adapter_idx, length=cache_len + lookup, own_cache=join,
            prefix=prefix, prompt_logprobs=min(top_logprobs, v) if prompt_logprobs else None)  # fmt: skip
        if scores:
            prompt_scores.update(zip(members, _prompt_scores(scores[0], [ids[i] for i in members])))
        if n == 1:
            _keep_prefix(model, cache, ids[0], rows[0])
        lex = None
        if matcher is not None:
            lex = _LexiconState(matcher, lexicon_mode, max_rewinds, prompt, start, max_new_tokens, n_iter)
        row_ids = torch.tensor([keys[i] for i in members], dtype=torch.long, device=dev) if fused_step else None
        gens = None
        if not fused_step and temperature > 0 and seed is not None:
            gens = [torch.Generator(device=dev).manual_seed(_row_seed(seed, keys[i])) for i in members]
        loop = _Loop(model, prompt, start, adapter_idx, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, generators=gens,
                     seed=seed, row_ids=row_ids, eos=eos, lex=lex, fused_step=fused_step, n_iter=n_iter,
                     logprobs=logprobs, top_logprobs=top_logprobs, min_new_tokens=min_new_tokens,
                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                     no_repeat_ngram_size=no_repeat_ngram_size, prompt_width=cache_len - max_new_tokens,
                     lookup=lookup > 0)  # fmt: skip
        return loop, logits, cache, start, prompt.shape[1]

    # the token choice and bookkeeping, compiled (torch backend) or captured (CUDA graphs) like the forward. Not
    # the torch backend's sampling: it draws from a torch generator, host state that a graph would not advance
    # (the Triton step's noise is keyed by the device step counter instead)
    advance = model.runner.step_function(_advance) if fused_step or temperature == 0 else _advance
    # rows in the batch, by their position in ``ids``; ``pending`` prompts take finished rows' places, and once
    # none wait, finished rows leave the batch (``_retire_rows``); what each prompt produced waits in ``finished``
    live = list(range(max_rows))
    pending = list(range(max_rows, n))[::-1]  # (popped from the end)
    finished: dict[int, tuple] = {}  # prompt → (ids, all banned, interventions, logprobs, top logprobs)
    s, x, cache, start, t = start_rows(live)
    prompt_len, joined = [t] * max_rows, [0] * max_rows  # host copies: each row's padded prompt and first step

    def bounds() -> tuple[int, int, int]:
        """(a, c, j) from the rows in the batch, recomputed when rows leave or join (not per token): the kv length
        ``min(a + T * (it + 1), c + max_new_tokens + T - 1)`` covers every row's written slots (T = 1, or with
        prompt lookup the k + 1 positions of a forward: row r has kept at most ``1 + T * (it - j_r)`` tokens, so its
        slots are below ``t_r + T * (it - j_r + 1)`` and ``t_r + max_new_tokens + T - 1``; each row's mask stops at
        its own slot), and the last step is ``j + n_iter - 1``."""
        return max(tp - span * j for tp, j in zip(prompt_len, joined)), max(prompt_len), max(joined)

    def join(places: list[int], members: list[int], feed, slots, start):
        """The prompts ``members`` take the places (rows) ``places`` of finished rows, in place: prefilled in a
        cache of their own, their first token chosen from the prefill's logits, then their loop state, cache slots
        and step inputs written into those rows. Returns the step inputs (feed, slots, start)."""
        s2, x2, cache2, start2, t2 = start_rows(members, join=True)
        # (eager: one call per join, whose batch size, often 1, would otherwise compile a step graph of its own)
        feed2, slots2 = _advance(s2, x2, False)
        idx = torch.tensor(places, dtype=torch.long, device=dev)
        s.assign(idx, s2)
        model.runner.place_rows(cache, idx, cache2)
        feed, slots = feed.clone(), slots.clone()  # (under CUDA graphs, the captured step's output buffers)
        feed[idx], slots[idx], start[idx] = feed2, slots2, start2
        for p, m in zip(places, members):
            live[p], prompt_len[p], joined[p] = m, t2, it
        return feed, slots, start

    kv_from, kv_cap, last_join = bounds()
    hidden = False
    drafts = None  # prompt lookup: each row's drafts in the forward that produced ``x``
    it = 0
    while True:
        if x.dim() == 3:  # a forward of each row's last token and its drafts: verified position by position
            feed, slots = _verify(advance, s, x, drafts, sync=dev.type == "cpu")
        else:
            if s.hold is not None:  # (prompt lookup, a one-token step: every row takes it)
                s.hold.zero_()
            feed, slots = advance(s, x, hidden)
        done = s.done
        if host_each_step:
            done_host, cur_host = done.tolist(), s.cur.tolist()
            gen = s.out.tolist()
            for i, row in enumerate(live):
                if stop_hit[row]:
                    continue
                stable = cur_host[i] if done_host[i] else max(cur_host[i] - hold_tokens, 0)
                text = tok.decode(gen[i][:stable], skip_special_tokens=True)
                cut, hit = _cut_at_stop(text, stop)
                if hit:
                    stop_hit[row] = True
                    done[i] = True
                if stream is not None:
                    final = hit or done_host[i]
                    ready = cut if final else cut[: len(cut) - _stop_holdback(cut, stop)]
                    if not final:
                        ready = ready.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
                    if len(ready) > len(emitted[row]) and ready.startswith(emitted[row]):
                        stream(index[row], ready[len(emitted[row]):])
                        emitted[row] = ready
        # check at every N-th step, and at the step where rows that never rewound reach max_new_tokens
        check = (it + 1) % check_every == 0 or it + 1 == max_new_tokens
        last = not pending and it == last_join + n_iter - 1  # every row's last step
        if last or (check and not pending and min_rows is None and bool(done.all())):
            break
        if check and (pending or min_rows is not None):  # one read of the flags: completion, joins, retiring
            flags = done.tolist()
            if all(flags) and not pending:
                break
            n_before = len(finished)
            if pending:
                places = [i for i, f in enumerate(flags) if f][: len(pending)]
                if places:
                    _harvest(s, live, finished, places)
                    feed, slots, start = join(places, [pending.pop() for _ in places], feed, slots, start)
            else:
                keep = _retire_rows(s, live, finished, min(min_rows, max_rows), flags)
                if keep is not None:
                    kept = torch.tensor(keep, dtype=torch.long, device=dev)
                    feed, slots, start = (z.index_select(0, kept) for z in (feed, slots, start))
                    cache = model.runner.select_rows(cache, kept)
                    prompt_len, joined = [prompt_len[i] for i in keep], [joined[i] for i in keep]
            if len(finished) > n_before:  # rows left, or others took their places
                kv_from, kv_cap, last_join = bounds()
                if on_finished is not None:
                    on_finished(len(finished) - n_before)
        kv_len = min(kv_from + span * (it + 1), kv_cap + max_new_tokens + lookup)
        hidden = fused_head
        if lookup:
            drafts, found = _lookup_drafts(s, lookup, prompt_lookup_ngram)
        # (on CPU, where reading it costs nothing: no row has a draft worth checking, so a one-token step, which
        # costs less than a forward of k + 1 tokens; on CUDA the host does not wait for it)
        if lookup and (dev.type != "cpu" or bool(found.any())):
            tokens = torch.cat([feed.view(-1, 1), drafts], dim=1)
            at = slots.view(-1, 1) + torch.arange(span, device=dev)
            x = model.runner.verify(tokens, at, kv_len, start, cache, s.adapter_idx)
        else:
            x = decode_one_token(model, feed, slots, kv_len, start, cache, s.adapter_idx, head=not fused_head)
        it += 1
        if it > n * n_iter:  # each prompt takes at most n_iter steps: a loop past that would never end
            raise RuntimeError(f"fastdebias: the decode loop ran {it} steps for {n} prompts; please report this bug")
    n_before = len(finished)
    _retire_rows(s, live, finished, None)
    if on_finished is not None:
        on_finished(len(finished) - n_before)
    results = []
    eos_set = set(eos)
    for i in range(n):
        seq, banned, interventions, lp, top = finished[i]
        reason = "banned" if banned else "length"
        for j, x in enumerate(seq):
            if x in eos_set:
                seq, reason = seq[: j + 1], "eos"
                break
        text = tok.decode(seq, skip_special_tokens=True) if tok is not None else ""
        if stop:
            text, hit = _cut_at_stop(text, stop)
            if hit:
                reason = "stop"
                # keep the ids up to the token that completed the stop string
                for j in range(1, len(seq) + 1):
                    if _cut_at_stop(tok.decode(seq[:j], skip_special_tokens=True), stop)[1]:
                        seq = seq[:j]
                        break
                # and the interventions at the positions kept (the row may have run on a few tokens before the host
                # read its text: the lexicon's held-back tokens, and with prompt lookup the rest of a verified run)
                interventions = [x for x in interventions if x.step < len(seq)]
        res = GenerationResult(text=text, token_ids=seq, finish_reason=reason, prompt_tokens=len(ids[i]),
                               prompt_token_ids=list(ids[i]),
                               logprobs=lp[: len(seq)] if lp is not None else None,
                               top_logprobs=top[: len(seq)] if top is not None else None)  # fmt: skip
        if prompt_logprobs:
            res.prompt_logprobs, res.prompt_top_logprobs = prompt_scores[i]
        if matcher is not None:
            res.interventions = interventions
        results.append(res)
    return results


def _harvest(s: _Loop, live: list[int], finished: dict, rows: list[int]) -> None:
    """Read out what the batch's rows ``rows`` produced (ids, whether every token was banned, interventions, and
    the ids' log-probabilities if asked for) into ``finished``, under their prompts' indices (``live``): one read of
    each tensor for all of them."""
    gen = s.out[rows].tolist()
    lengths = s.cur[rows].tolist()
    banned = s.all_banned[rows].tolist()
    logs = s.lex.results(rows) if s.lex is not None else [[] for _ in rows]
    lps = s.lp[rows].tolist() if s.lp is not None else [None] * len(rows)
    top_lps = s.top_lp[rows].tolist() if s.top_lp is not None else None
    top_ids = s.top_ids[rows].tolist() if s.top_ids is not None else None
    for j, i in enumerate(rows):
        n = lengths[j]
        lp = lps[j][:n] if lps[j] is not None else None
        top = None
        if top_lps is not None:
            top = [list(zip(ids, vals)) for ids, vals in zip(top_ids[j][:n], top_lps[j][:n])]
        finished[live[i]] = (gen[j][:n], banned[j], logs[j], lp, top)


def _retire_rows(s: _Loop, live: list[int], finished: dict, min_rows: int | None,
                 done: list[bool] | None = None) -> list[int] | None:  # fmt: skip
    """Move finished rows out of the batch, so that later steps compute only the rows still generating.

    What each leaving row produced goes into ``finished`` (``_harvest``); ``s`` keeps only the other rows, and
    ``live`` lists the prompts they belong to. ``done``: the rows' done flags, as read by the host.
    ``min_rows=None``: every row leaves (the end of decoding). Otherwise rows leave when at least a quarter of the
    batch (and at least one row) has finished, keeping at least ``min_rows`` rows (finished ones, if need be): each
    retirement copies the remaining rows' cache, so it is done in a few large steps rather than one row at a time.
    Returns the kept rows' indices in the old batch (a host list), or None when nothing changed.
    """
    if min_rows is None:
        _harvest(s, live, finished, list(range(s.b)))
        live.clear()
        return None
    if sum(done) < max(1, s.b // 4):
        return None
    kept = [i for i in range(s.b) if not done[i]]
    kept = sorted(kept + [i for i in range(s.b) if done[i]][: max(min_rows - len(kept), 0)])
    if len(kept) == s.b:
        return None
    stay = set(kept)
    _harvest(s, live, finished, [i for i in range(s.b) if i not in stay])
    s.select(torch.tensor(kept, dtype=torch.long, device=s.cur.device))
    live[:] = [live[i] for i in kept]
    return kept


@torch.inference_mode()
def generate(
    model,
    prompts,
    *,
    adapter=FIRST_ADAPTER,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    stop: str | list[str] | None = None,
    stream: Callable[[int, str], None] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    lexicon=None,
    lexicon_mode: str = "backtrack",
    max_rewinds: int = 8,
    logprobs: bool = False,
    min_new_tokens: int = 0,
    top_logprobs: int = 0,
    n: int = 1,
    no_repeat_ngram_size: int = 0,
    prompt_logprobs: bool = False,
    prompt_lookup_tokens: int = 0,
    prompt_lookup_ngram: int = 3,
) -> list[GenerationResult]:
    """Generate a continuation for each prompt.

    Parameters
    ----------
    model : a model from ``fastdebias.load``.
    prompts : str, list of str, or list of token-id lists (ids are used as given: no special tokens added).
    adapter : omitted → the first loaded adapter; ``None`` → no adapter; a name; or a list of names/None,
        one per prompt (several adapters in one batch).
    max_new_tokens : tokens to generate at most per prompt (>= 1).
    min_new_tokens : the EOS ids are banned until a row has this many tokens (transformers' ``min_new_tokens``,
        vLLM's ``min_tokens``; stop strings still end a row earlier); 0 to ``max_new_tokens``.
    temperature : 0 is greedy (argmax), and so is anything below 1e-5 (as in vLLM: dividing the logits by it would
        overflow); above, samples.
    top_k, top_p, min_p : filters for sampling (transformers' semantics, applied in that order); ``0``, ``1.0``
        and ``0.0`` mean off. ``min_p`` keeps the tokens at least ``min_p`` times as likely as the most likely one.
    repetition_penalty : transformers' rule over the row's context (prompt and generated); 1.0 is off.
    no_repeat_ngram_size : transformers' (0 is off): a token that would complete an n-gram of that size already in
        the row's context (prompt and generated) is banned; applied to the model's logits before the lexicon.
    presence_penalty, frequency_penalty : vLLM's (OpenAI's), in [-2, 2], 0.0 is off: after the repetition penalty,
        each token's logit loses ``frequency_penalty`` times its count among the row's generated tokens (not the
        prompt), and ``presence_penalty`` if that count is at least 1; negative values favour repeats.
    seed : makes sampling reproducible, each prompt's draws independent of the batch it is decoded in (the Triton
        backend keys its noise by seed, prompt index and step; the torch backend seeds a generator per prompt from
        the seed and the prompt's index). A list gives each prompt its own seed (vLLM's per-request seed): a
        prompt's draws then depend on its seed only, not on its place in the list or the other prompts (with ``n``
        > 1, its samples on the seed and the sample's index), so a job can be rerun in part. The two backends draw
        different samples for one seed.
    eos_token_id : int or list; defaults to the checkpoint's; ``[]``: none (rows run to ``max_new_tokens`` or a
        stop string).
    stop : strings that end a sequence; they are excluded from ``.text``.
    stream : callback ``stream(index, new_text)`` (the prompt's index; with ``n`` > 1 the result's) called as each
        sequence's text grows (a callback, not an iterator). Text that might still become a stop string is held
        back until it cannot.
    batch_size : rows decoded at once. Default: all prompts if that batch fits half the memory free at the call
        (its KV cache, prefill activations and logits: ``runtime.bytes_per_row``), else as many as fit. With more
        prompts than rows, the next prompts take finished rows' places (every runtime, CUDA graphs included),
        prompts of similar lengths together; results come back in the order given.
    progress : tqdm bar across prompts; default: when not all prompts fit one batch.
    lexicon : a ``fastdebias.Lexicon``, a lexicon file path, ``"default"`` (the shipped one) or ``None``.
    lexicon_mode : ``"backtrack"`` (default): when a banned phrase would complete, rewind the row to where the
        phrase began and ban its first token there (at most ``max_rewinds`` times per row, then ``"hf"``);
        ``"hf"``: transformers' ``sequence_bias``/``bad_words_ids`` semantics (only the last token is masked).
        Penalties behave as in ``"hf"`` in both modes. Each result's ``.interventions`` lists what fired.
    logprobs : also return, in each result's ``.logprobs``, the model's log-probability of each of its
        ``token_ids``: the log-softmax of the logits the model produced at that position, before the lexicon,
        penalties, temperature and filters (vLLM's default "raw" logprobs; transformers' ``output_logits``), so a
        token the lexicon pushed the model away from its first choice toward shows as improbable. Costs one more
        pass over the logits per step, and takes the unfused lm_head on the Triton backend.
    top_logprobs : 0 to 20 (OpenAI's bound); N > 0 also returns, in ``.top_logprobs``, the N most likely tokens at
        each returned position under the same raw logits, as (token id, log-probability) pairs, most likely first
        (vLLM's ``logprobs=N``, OpenAI's ``top_logprobs``); implies ``logprobs``.
    prompt_logprobs : also return, in ``.prompt_logprobs``, each prompt token's log-probability given the tokens
        before it under the model's raw logits (None for the first token; vLLM's ``prompt_logprobs``), and with
        ``top_logprobs=N`` the N most likely tokens at each prompt position in ``.prompt_top_logprobs``. The whole
        prompt then runs through the model (no shared prefix is copied in). ``score`` gives the same without
        generating.
    n : sequences to generate per prompt (vLLM's ``n``, transformers' ``num_return_sequences``); above 1 needs
        sampling (``temperature > 0``: greedy would return n equal sequences). Each sample is decoded as a prompt of
        its own: prompt i's samples are results ``i*n`` to ``i*n + n - 1``, drawn as prompts ``i*n + j`` of the
        prompts repeated n times would be (so ``n`` changes no sample's draws but their keys), and ``stream`` is
        called with that result index. A call's n samples of one prompt share its prefill (as any prompts sharing
        a prefix of at least 8 tokens do).
    prompt_lookup_tokens : k > 0 turns on prompt-lookup speculative decoding (transformers'
        ``prompt_lookup_num_tokens``, vLLM's n-gram speculation): at each step every row guesses its next k tokens
        by finding its last n tokens (n = ``prompt_lookup_ngram`` down to 1) earlier in its prompt or output and
        copying what followed, and one forward checks the k guesses. The loop's step chooses each position's token
        as it would without guesses, and a row goes on to the next position only while it chose the guess: 1 to
        k + 1 tokens per forward, and the tokens of decoding without lookup. Greedy: the same tokens. Sampling with
        a seed: the same samples (each draw keyed by the row's own step, which only real steps advance); without
        one, draws from the same distributions. (Up to the floating-point differences between a forward of k + 1
        tokens and k + 1 forwards of one, which may flip a near-tie.) Rewriting copies much of its input, so
        ``debias`` gains most. Each forward costs more than a one-token step (k + 1 positions), so a task that
        copies little may run slower: measure (``bench/bench_lookup.py``). 0 (default) is off.
    prompt_lookup_ngram : the longest n-gram looked up (1 to 8; default 3).

    Returns
    -------
    list of GenerationResult (``.text``, ``.token_ids``, ``.finish_reason``, ``.interventions``, ``.logprobs``,
    ``.top_logprobs``, ``.prompt_token_ids``, ``.prompt_logprobs``, ``.prompt_top_logprobs``), n per prompt, in
    order.
    """
    _check_model(model)
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_p)
    temperature = effective_temperature(temperature)  # below 1e-5: greedy
    ids = encode_prompts(model, prompts)
    seeds = _check_seed(seed, len(ids))
    rows = resolve_adapter_rows(model, adapter, len(ids))
    eos = _normalize_eos(model, eos_token_id)
    stops = _normalize_stops(stop)
    if (stops or stream is not None) and model.tokenizer is None:
        raise TokenizerError(f"stop/stream need a tokenizer, and {model.path} has none")
    if stream is not None:
        _check_stream(stream)
    ctx = model.max_context
    for i, x in enumerate(ids):
        if len(x) + max_new_tokens > ctx:
            raise GenerationError(
                f"prompts[{i}] has {len(x)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                f"context of {ctx} tokens: shorten the prompt or lower max_new_tokens"
            )
    _check_batch_size(batch_size)
    if lexicon_mode not in ("backtrack", "hf"):
        raise GenerationError(f"lexicon_mode must be 'backtrack' or 'hf', got {lexicon_mode!r}")
    if not _is_int(max_rewinds) or max_rewinds < 0:
        raise GenerationError(f"max_rewinds must be an integer >= 0, got {max_rewinds!r}")
    if not isinstance(logprobs, (bool, np.bool_)):
        raise GenerationError(f"logprobs must be True or False, got {logprobs!r}")
    _check_top_logprobs(top_logprobs)
    if not isinstance(prompt_logprobs, (bool, np.bool_)):
        raise GenerationError(f"prompt_logprobs must be True or False, got {prompt_logprobs!r}")
    if not _is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise GenerationError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {no_repeat_ngram_size!r}")
    if not _is_int(n) or n < 1:
        raise GenerationError(f"n (sequences per prompt) must be an integer >= 1, got {n!r}")
    if n > 1 and temperature == 0:
        raise GenerationError(
            f"n={n} sequences per prompt need sampling: set temperature >= 1e-5 (below that decoding is greedy, and "
            f"would return {n} equal sequences)"
        )
    for name, val in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _is_real(val) or not -2.0 <= val <= 2.0:
            raise GenerationError(f"{name} must be a number in [-2, 2] (0.0 = off), as in vLLM; got {val!r}")
    if not _is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
        raise GenerationError(
            f"min_new_tokens must be an integer from 0 to max_new_tokens={max_new_tokens}, got {min_new_tokens!r}"
        )
    if not _is_int(prompt_lookup_tokens) or not 0 <= prompt_lookup_tokens <= MAX_LOOKUP_TOKENS:
        raise GenerationError(
            f"prompt_lookup_tokens must be an integer from 0 (off) to {MAX_LOOKUP_TOKENS}, got {prompt_lookup_tokens!r}"
        )
    if not _is_int(prompt_lookup_ngram) or not 1 <= prompt_lookup_ngram <= MAX_LOOKUP_NGRAM:
        raise GenerationError(
            f"prompt_lookup_ngram must be an integer from 1 to {MAX_LOOKUP_NGRAM}, got {prompt_lookup_ngram!r}"
        )
    matcher = None
    if lexicon is not None:
        from fastdebias.lexicon import Lexicon

        lex = Lexicon.resolve(lexicon)
        if lex is not None and len(lex):
            matcher = lex.compile(model.tokenizer, vocab_size=model.config.vocab_size, eos_token_id=eos,
                                  device=model.device)
    keys = None  # each (repeated) prompt's noise stream: its index, or with one seed per prompt, its seed's
    if seeds is not None:
        keys = [_row_seed(sd, j) % 2**62 for sd in seeds for j in range(n)]
        seed = PER_PROMPT_SEEDS
    if n > 1:  # each sample a prompt of its own (one prefill for them all where the prefix is shared)
        ids, rows = [x for x in ids for _ in range(n)], [r for r in rows for _ in range(n)]
    total = len(ids)
    bs = batch_size or model.runner.default_batch_size(total, max(len(x) for x in ids), max_new_tokens, model.dtype,
                                                       model.device)  # fmt: skip
    # more prompts than rows: prompts of similar lengths together (less left padding), results in the given order
    order = sorted(range(total), key=lambda i: len(ids[i])) if bs < total else list(range(total))
    kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
              min_p=float(min_p), repetition_penalty=float(repetition_penalty),
              seed=None if seed is None else int(seed) % 2**62, eos=eos, stop=stops, stream=stream, matcher=matcher,
              lexicon_mode=lexicon_mode, max_rewinds=int(max_rewinds), logprobs=bool(logprobs) or top_logprobs > 0,
              top_logprobs=int(top_logprobs), min_new_tokens=int(min_new_tokens),
              presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
              no_repeat_ngram_size=int(no_repeat_ngram_size), prompt_logprobs=bool(prompt_logprobs),
              prompt_lookup_tokens=int(prompt_lookup_tokens), prompt_lookup_ngram=int(prompt_lookup_ngram))  # fmt: skip
    # ``bs`` rows at a time, the next prompts taking finished rows' places (continuous batching); a bar over prompts
    show = progress if progress is not None else bs < total
    unit = "prompt" if n == 1 else "sequence"
    with tqdm(total=total, desc="Generating", unit=unit, disable=not show) as bar:
        outs = _generate_batch(model, [ids[i] for i in order], [rows[i] for i in order], index=order, max_rows=bs,
                               keys=[keys[i] for i in order] if keys is not None else None, on_finished=bar.update,
                               **kw)  # fmt: skip
    results: list[GenerationResult | None] = [None] * total
    for i, out in zip(order, outs):
        results[i] = out
    return results


@torch.inference_mode()
def score(model, texts, *, context=None, adapter=FIRST_ADAPTER, top_logprobs: int = 0,
          batch_size: int | None = None, progress: bool | None = None) -> list[ScoreResult]:  # fmt: skip
    """Each text's tokens' log-probabilities under the model (with its adapter), without generating: the
    log-likelihood of a text, its perplexity, which of two phrasings the model finds more likely (the sentence-pair
    comparison of bias benchmarks), or with ``context`` how likely a text is as the continuation of a prompt (a
    rewrite after the debiasing instruction).

    Parameters
    ----------
    model : a model from ``fastdebias.load``.
    texts : str, list of str, or list of token-id lists (ids are used as given). Without ``context``, text is
        encoded as ``generate`` encodes prompts (with the special tokens the tokenizer adds, a BOS for Llama's,
        none for the embedded SmolLM2's) and every token but the first is scored: nothing comes before it. To score
        a text's first word too (two phrasings that differ there), give a ``context`` (a BOS or separator token id,
        or the prompt the text would follow).
    context : None; a str or token-id list before every text; or a list with one (str or token-id list) per
        text. Each text is then scored as the continuation of its context: the context is encoded as a prompt
        (special tokens included), the text on its own without special tokens (mind the space between them: a
        byte-level BPE tokenizer reads " sat" and "sat" as different tokens), the two joined, and every token of
        the text is scored (the result holds the text's tokens only).
    adapter : as in ``generate``: omitted → the first loaded adapter; ``None`` → none; a name; or one per text.
    top_logprobs : 0 to 20; N > 0 also gives the N most likely tokens at each position.
    batch_size : texts run at once (default: as many as fit half the free memory, as in ``generate``).
    progress : a tqdm bar over texts (default: when there is more than one batch).

    Returns
    -------
    list of ScoreResult (``.token_ids``, ``.logprobs``, ``.top_logprobs``, ``.context_tokens``, ``.total``,
    ``.perplexity``), one per text, in order.
    """
    _check_model(model)
    _check_top_logprobs(top_logprobs)
    if context is None:
        ids = encode_prompts(model, texts, "texts")
        ctx = [[] for _ in ids]
    else:
        ids = encode_prompts(model, texts, "texts", special_tokens=False)
        ctx = _contexts(model, context, len(ids))
    rows = resolve_adapter_rows(model, adapter, len(ids), unit="text")
    full = [c + x for c, x in zip(ctx, ids)]
    for i, x in enumerate(full):
        if len(x) > model.max_context:
            what = " with its context" if ctx[i] else ""
            raise GenerationError(
                f"texts[{i}] has {len(x)} tokens{what}, more than the model's context of {model.max_context}: "
                "shorten it"
            )
    _check_batch_size(batch_size)
    total = len(full)
    bs = batch_size or model.runner.default_batch_size(total, max(len(x) for x in full), 0, model.dtype,
                                                       model.device)  # fmt: skip
    order = sorted(range(total), key=lambda i: len(full[i]))  # similar lengths together: less padding
    top = min(int(top_logprobs), model.config.vocab_size)
    # texts after contexts that begin the same way (candidate rewrites after one instruction): the prefix that the
    # contexts share (but each one's last token, whose logits score the text's first) is prefilled once
    shared = _find_prefix(model, ctx, rows) if context is not None and model.runner.share_prefix else None
    results: list[ScoreResult | None] = [None] * total
    show = progress if progress is not None else bs < total
    with tqdm(total=total, desc="Scoring", unit="text", disable=not show) as bar:
        for lo in range(0, total, bs):
            members = order[lo : lo + bs]
            adapter_idx = None
            if any(rows[i] >= 0 for i in members):
                adapter_idx = torch.tensor([rows[i] for i in members], dtype=torch.int32, device=model.device)
            chunk = [full[i] for i in members]
            prefix = (*shared, [rows[i] for i in members]) if shared else None
            _, cache, *_, scores = prefill(model, chunk, 0, adapter_idx, own_cache=True, prefix=prefix,
                                           prompt_logprobs=top)  # fmt: skip
            if total == 1 and context is not None:  # as generate keeps a one-prompt call's
                _keep_prefix(model, cache, ctx[0], rows[0])
            for i, (lps, tops) in zip(members, _prompt_scores(scores, chunk)):
                c = len(ctx[i])
                results[i] = ScoreResult(token_ids=list(ids[i]), logprobs=lps[c:],
                                         top_logprobs=tops[c:] if tops is not None else None,
                                         context_tokens=c)  # fmt: skip
            bar.update(len(members))
    return results


def _contexts(model, context, n: int) -> list[list[int]]:
    """``score``'s ``context`` → one token-id list per text (encoded as prompts are)."""
    one = isinstance(context, str) or (isinstance(context, torch.Tensor) and context.dim() == 1)
    if isinstance(context, (list, tuple)) and context:
        # a list of numbers is one list of token ids (encode_prompts checks that they are integer ids)
        one = not any(isinstance(c, (str, list, tuple, torch.Tensor)) for c in context)
    if one:
        return encode_prompts(model, [context], "context") * n  # one context for every text
    if not isinstance(context, (list, tuple)) or len(context) != n:
        got = f"a list of {len(context)}" if isinstance(context, (list, tuple)) else type(context).__name__
        raise GenerationError(
            f"context: expected a str or token-id list (one context for every text) or a list of {n} (one per "
            f"text), got {got}"
        )
    return encode_prompts(model, context, "context")


# ------------------------------------------------------------------------------------------- debiasing

SRLLM_SYSTEM = (
    "<<SYS>>You are a text debiasing bot, you take as input a text and you output its debiased version by "
    "rephrasing it to be free from any age, gender, political, social or socio-economic biases ,  without any "
    "extra outputs<</SYS>>"
)
SRLLM_INSTRUCTION = "[INST] Debias this text by rephrasing it to be free of bias : {text} [/INST]"
SRLLM_END = "<s/>"  # the literal closing marker SR-LLM was trained with (not </s>)
# For chat models not trained on SR-LLM's format: a system message, two worked examples as earlier turns, then
# the text. Picked on SmolLM2-135M (``bench/debias_prompt.py``, 24 sentences the examples do not contain, greedy,
# default lexicon): with the examples every rewrite ended at EOS as one plain sentence, none repeated its input
# and none needed a rewind; without them 9 of 24 added a preamble ("Rewritten sentence: ...") or a commentary, or
# ran to the length limit, and 3 repeated the input.
CHAT_SYSTEM = "You are a helpful assistant that rewrites biased sentences into fair, neutral sentences."
CHAT_USER = (
    "Rewrite the following sentence so that it does not stereotype any group. Reply with only the rewritten "
    "sentence.\n\nSentence: {text}"
)
CHAT_EXAMPLES = (
    ("Men are bad at taking care of children.", "Men and women can both be caring parents."),
    ("Young people are irresponsible with money.", "People of any age can manage money well or poorly."),
)


def chat_messages(text: str, examples=CHAT_EXAMPLES, *, system_turn: bool = True) -> list[dict]:
    """The debiasing chat for ``text``: the system message, each example as a user turn and the assistant's
    answer, then ``text`` as the last user turn. ``system_turn=False``: no system turn, its text heads the first
    user turn instead (for templates that allow only alternating user and assistant turns)."""
    msgs = [{"role": "system", "content": CHAT_SYSTEM}]
    for biased, fair in examples:
        msgs += [{"role": "user", "content": CHAT_USER.format(text=biased)}, {"role": "assistant", "content": fair}]
    msgs += [{"role": "user", "content": CHAT_USER.format(text=text)}]
    if not system_turn:
        msgs = msgs[1:]
        msgs[0] = {"role": "user", "content": f"{CHAT_SYSTEM}\n\n{msgs[0]['content']}"}
    return msgs


def chat_prompt_ids(tokenizer, text: str, examples=CHAT_EXAMPLES) -> list[int]:
    """Token ids of ``chat_messages(text, examples)`` rendered by the tokenizer's chat template, up to where the
    assistant's answer begins (the template adds its own special tokens). A template that refuses the system turn
    (Mistral's and Gemma's raise unless turns alternate user / assistant) gets the system text at the head of the
    first user turn instead; if that fails too, the first error is raised."""

    def render(msgs):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    try:
        chat = render(chat_messages(text, examples))
    except Exception as first:  # noqa: BLE001 (a template raises what it likes: jinja2's TemplateError, ...)
        try:
            chat = render(chat_messages(text, examples, system_turn=False))
        except Exception:  # noqa: BLE001
            raise first from None
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def srllm_prompt(text: str) -> str:
    """SR-LLM's training format up to the response: '<s>', system, instruction, joined by newlines, then '\\n'."""
    return "\n".join(["<s>", SRLLM_SYSTEM, SRLLM_INSTRUCTION.format(text=text), ""])


def debias_prompt_format(model, prompt_format: str = "auto") -> str:
    """The rule: "srllm" if an adapter is loaded (SR-LLM adapters are trained on that format) or the tokenizer
    has no chat template; otherwise "chat" (instruction-tuned models such as the embedded SmolLM2)."""
    if prompt_format not in ("auto", "srllm", "chat"):
        raise GenerationError(f"prompt_format must be 'auto', 'srllm' or 'chat', got {prompt_format!r}")
    if prompt_format != "auto":
        return prompt_format
    if model.adapter_names or model.merged_adapter is not None:
        return "srllm"
    return "chat" if getattr(model.tokenizer, "chat_template", None) else "srllm"


def debias_prompts(model, texts: Sequence[str], *, prompt_format: str = "auto", template: str | None = None):
    """Token ids of the debiasing prompt for each text, and the stop strings its format needs."""
    tok = model.tokenizer
    fmt = debias_prompt_format(model, prompt_format)  # validated even where a template overrides it
    if template is not None:
        if not isinstance(template, str) or "{text}" not in template:
            raise GenerationError(f"template: expected a str containing the placeholder {{text}}, got {template!r}")
        check_text(template, "template")
        return [tok(template.replace("{text}", t))["input_ids"] for t in texts], []
    if fmt == "srllm":
        return [tok(srllm_prompt(t))["input_ids"] for t in texts], [SRLLM_END]
    if not getattr(tok, "chat_template", None):
        raise TokenizerError(
            f"prompt_format='chat' needs a chat template, and the tokenizer of {model.path} has none: use "
            "prompt_format='srllm' or a template='...{text}...'"
        )
    try:
        return [chat_prompt_ids(tok, t) for t in texts], []
    except Exception as e:  # noqa: BLE001 (whatever the template raised, as a typed error naming the fix)
        raise TokenizerError(
            f"{model.path}: the tokenizer's chat template cannot render the debiasing chat ({type(e).__name__}: "
            f"{e}); fix the template (tokenizer_config.json or chat_template.jinja), or use prompt_format='srllm' "
            "or a template='...{text}...'"
        ) from e


def debias(
    model,
    texts,
    *,
    prompt_format: str = "auto",
    template: str | None = None,
    lexicon="default",
    **generate_kwargs,
) -> list[GenerationResult]:
    """Rewrite each text without bias. ``template`` (a str with ``{text}``) overrides the prompt format.

    The shipped default lexicon is applied unless ``lexicon=None`` (or another lexicon) is given.

    The SR-LLM format stops at EOS or the literal ``<s/>``; results' ``.text`` is stripped of surrounding space.
    Other keyword arguments go to ``generate``.
    """
    _check_model(model)
    if model.tokenizer is None:
        raise TokenizerError(f"debias needs a tokenizer, and {model.path} has none")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise GenerationError("texts: expected a non-empty str or list of str")
    for i, t in enumerate(texts):
        if not t.strip():
            raise GenerationError(f"texts[{i}] is empty; give the text to debias")
        check_text(t, f"texts[{i}]")
    stops = _normalize_stops(generate_kwargs.pop("stop", None))
    prompts, extra_stops = debias_prompts(model, texts, prompt_format=prompt_format, template=template)
    stops += extra_stops
    generate_kwargs.setdefault("max_new_tokens", 128)
    results = generate(model, prompts, stop=stops or None, lexicon=lexicon, **generate_kwargs)
    for r in results:
        r.text = r.text.strip()
    return results
