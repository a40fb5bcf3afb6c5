"""Reference of the bias-aware logits step: the CPU path and the oracle of ``fastdebias.ops.logits``.

One decode step, per row of logits [B, V], in transformers' order (``generate`` upcasts the logits to fp32 before
its processors, and so does this step):

1. the lexicon (``PhraseMatcher.apply``): static length-1 biases, then the biased/banned next tokens of the row's
   automaton state (``mask_phrases`` picks transformers' last-token masking of phrase bans, per row if a tensor);
2. extra per-row bans (``banned_tokens``: the positions a backtracking rewind banned);
3. the repetition penalty over the row's context (transformers' rule: divide positive logits, multiply negative);
   then vLLM's frequency and presence penalties over the row's generated tokens (``output_counts``);
4. the choice: argmax when ``temperature == 0`` (or below ``sampling.GREEDY_BELOW``, 1e-5); otherwise
   temperature, top-k, top-p, min-p (transformers' semantics, ``fastdebias.reference.sampling.filter_logits``),
   and Gumbel-max sampling;
5. the automaton advanced by the chosen token, and what the lexicon did to it (``PhraseMatcher.lookup``).

A row in which every token is banned chooses ``-1``, keeps its state and is flagged ``all_banned``: never a NaN,
never a random token.

Sampling noise is counter-based: the Gumbel variable of (row, column) at a step is a function of
``(seed, row_ids[row], step, column)`` only, computed with Philox4x32-10 (Salmon et al., SC'11: the generator of
Random123, cuRAND and ``tl.randint``) on the counter ``(column, row_id, step, 0)`` and the key
``(seed mod 2^31, seed >> 31)``. The Triton kernels draw the same numbers, so sampled tokens are comparable one
for one, and a row's tokens do not depend on the batch it was decoded in. Gumbel-max, ``argmax(z + G)`` with
``G = -log(-log U)``, draws from ``softmax(z)`` exactly as the exponential race of ``choose_tokens`` does
(argmax of ``p / E`` with ``E = -log U``), with other numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastdebias.errors import GenerationError
from fastdebias.reference.lora import lora_linear
from fastdebias.reference.sampling import (
    apply_presence_frequency,
    apply_repetition_penalty,
    effective_temperature,
    filter_logits,
)

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
SEED_LIMIT = 1 << 62
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LogitsStep(NamedTuple):
    """What one logits step returns; every field is a [B] tensor on the logits' device.

    Attributes
    ----------
    next_ids : int64 chosen token per row; ``-1`` where every token was banned.
    states : int64 automaton state after the chosen token (``PhraseMatcher.step``); unchanged on all-banned rows;
        ``None`` without a matcher.
    all_banned : bool, rows in which every token was banned (finish them with reason "banned").
    entry : int64 lexicon entry that fired on the chosen token (``PhraseMatcher.lookup``), -1 where none did.
    ban_len : int64 length of the shortest banned sequence the chosen token completes (0: none; >= 2 in
        ``"backtrack"`` rows means rewind ``ban_len - 1`` positions).
    bias : fp32 bias the lexicon added to the chosen token (0 where none, -inf for a ban).
    top : int64 argmax of the raw logits (the model's own first choice, for the interventions log).
    top_bias, top_ban_len, top_entry : ``bias``, ``ban_len`` and ``entry`` of ``top`` instead of the chosen token
        (whether the lexicon displaced the model's first choice, and how).
    """

    next_ids: torch.Tensor
    states: torch.Tensor | None
    all_banned: torch.Tensor
    entry: torch.Tensor
    ban_len: torch.Tensor
    bias: torch.Tensor
    top: torch.Tensor
    top_bias: torch.Tensor
    top_ban_len: torch.Tensor
    top_entry: torch.Tensor


# ----------------------------------------------------------------------------------------------- validation


def check_step_args(
    logits: torch.Tensor,
    *,
    matcher,
    states: torch.Tensor | None,
    mask_phrases: bool | torch.Tensor,
    banned_tokens: torch.Tensor | None,
    counts: torch.Tensor | None,
    repetition_penalty: float,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    min_p: float = 0.0,
    step: int | torch.Tensor,
    row_ids: torch.Tensor | None,
    output_counts: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    name: str = "logits",
) -> None:
    """Raise GenerationError naming the first bad argument. Reads shapes, dtypes and devices only (no sync)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise GenerationError(f"{name} must be a [B, V] tensor, got {_describe(logits)}: take the last position")
    if logits.dtype not in _FLOAT_DTYPES:
        raise GenerationError(f"{name} has dtype {logits.dtype}; give float32, float16 or bfloat16 logits")
    b, v = logits.shape
    dev = logits.device
    if b == 0 or v == 0:
        raise GenerationError(f"{name} has shape {list(logits.shape)}; give at least one row and one column")
    if matcher is not None:
        if matcher.vocab_size != v:
            raise GenerationError(
                f"matcher was compiled for a vocabulary of {matcher.vocab_size} but {name} has {v} columns: "
                f"compile the lexicon with vocab_size={v}"
            )
        if matcher.device != dev:
            raise GenerationError(f"matcher is on {matcher.device} but {name} is on {dev}: use matcher.to({dev})")
        _check_vector(states, "states", b, dev, (torch.int64,))
    elif states is not None:
        raise GenerationError("states were given without a matcher: pass matcher= (or drop states)")
    if isinstance(mask_phrases, torch.Tensor):
        _check_vector(mask_phrases, "mask_phrases", b, dev, (torch.bool,))
    elif not isinstance(mask_phrases, bool):
        raise GenerationError(f"mask_phrases must be a bool or a [B] bool tensor, got {_describe(mask_phrases)}")
    if banned_tokens is not None:
        if (
            not isinstance(banned_tokens, torch.Tensor)
            or banned_tokens.dim() != 2
            or banned_tokens.shape[0] != b
            or banned_tokens.dtype not in (torch.int32, torch.int64)
        ):
            raise GenerationError(
                f"banned_tokens must be an int32/int64 [B={b}, K] tensor of ids (-1 = none), got "
                f"{_describe(banned_tokens)}"
            )
        _check_device(banned_tokens, "banned_tokens", dev)
    if counts is not None:
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (b, v) or counts.is_floating_point():
            raise GenerationError(
                f"counts must be an integer or bool [B={b}, V={v}] tensor (> 0 = in the context), "
                f"got {_describe(counts)}"
            )
        _check_device(counts, "counts", dev)
    if not _finite_number(repetition_penalty) or repetition_penalty <= 0:
        raise GenerationError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}")
    for what, val in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _finite_number(val):
            raise GenerationError(f"{what} must be a finite number (0.0 = off), got {val!r}")
    if output_counts is not None:
        if (not isinstance(output_counts, torch.Tensor) or tuple(output_counts.shape) != (b, v)
                or output_counts.is_floating_point() or output_counts.dtype == torch.bool):  # fmt: skip
            raise GenerationError(
                f"output_counts must be an integer [B={b}, V={v}] tensor (each token's count among the row's "
                f"generated tokens), got {_describe(output_counts)}"
            )
        _check_device(output_counts, "output_counts", dev)
    elif presence_penalty != 0.0 or frequency_penalty != 0.0:
        raise GenerationError(
            "presence_penalty/frequency_penalty need output_counts (the row's generated-token counts [B, V])"
        )
    if not _finite_number(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _finite_number(top_p) or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if not _finite_number(min_p) or not 0.0 <= min_p <= 1.0:
        raise GenerationError(f"min_p must be in [0, 1] (0.0 = off), got {min_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise GenerationError(f"seed must be an integer in [0, 2**62), got {seed!r}")
    if isinstance(step, torch.Tensor):
        if step.dtype not in (torch.int32, torch.int64) or step.numel() not in (1, b) or step.dim() > 1:
            raise GenerationError(
                f"step must be an int or an int32/int64 tensor of shape [], [1] or [B={b}], got {_describe(step)}"
            )
        _check_device(step, "step", dev)
    elif isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MASK32:
        raise GenerationError(f"step must be an integer in [0, 2**32) or a device tensor, got {step!r}")
    if row_ids is not None:
        _check_vector(row_ids, "row_ids", b, dev, (torch.int32, torch.int64))


def check_lm_head_args(hidden: torch.Tensor, weight: torch.Tensor, lora=None, adapter_idx=None) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.dtype not in _FLOAT_DTYPES:
        raise GenerationError(
            f"hidden must be a float [B, K] tensor (the last position's final hidden state), got {_describe(hidden)}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise GenerationError(f"lm_head must be a [V, K={hidden.shape[1]}] weight, got {_describe(weight)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise GenerationError(
            f"lm_head is {weight.dtype} on {weight.device} but hidden is {hidden.dtype} on {hidden.device}: "
            "give them the same dtype and device"
        )
    if lora is None:
        return
    (v, k), b = weight.shape, hidden.shape[0]
    if not (isinstance(lora, tuple) and len(lora) == 3 and all(isinstance(t, torch.Tensor) for t in lora)):
        raise GenerationError("lora must be a tuple (lora_a [n, R, K], lora_b [n, V, R], scale [n] fp32)")
    a, bm, scale = lora
    n = a.shape[0] if a.dim() == 3 else -1
    if a.dim() != 3 or a.shape[2] != k or bm.shape != (n, v, a.shape[1]) or scale.shape != (n,):
        raise GenerationError(
            f"lora shapes {tuple(a.shape)}, {tuple(bm.shape)}, {tuple(scale.shape)} do not fit an lm_head of "
            f"[V={v}, K={k}]: want lora_a [n, R, {k}], lora_b [n, {v}, R], scale [n]"
        )
    if a.dtype != hidden.dtype or bm.dtype != hidden.dtype or scale.dtype != torch.float32:
        raise GenerationError(f"lora_a/lora_b must be {hidden.dtype} (as hidden) and scale float32")
    _check_vector(adapter_idx, "adapter_idx", b, hidden.device, (torch.int32, torch.int64))


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, lora=None, adapter_idx=None) -> torch.Tensor:
    """[B, V] logits in the weights' dtype: ``F.linear``, plus each row's LoRA when ``lora`` is given."""
    if lora is None or adapter_idx is None:
        return F.linear(hidden, weight)
    return lora_linear(hidden, weight, *lora, adapter_idx)


def _check_vector(t, name: str, b: int, dev: torch.device, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != b or t.dtype not in dtypes:
        want = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise GenerationError(f"{name} must be a {want} [B={b}] tensor, got {_describe(t)}")
    _check_device(t, name, dev)


def _check_device(t: torch.Tensor, name: str, dev: torch.device) -> None:
    if t.device != dev:
        raise GenerationError(f"{name} is on {t.device} but the logits are on {dev}: keep it on {dev}")


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return repr(t) if isinstance(t, (bool, int, float, str)) else type(t).__name__


# ------------------------------------------------------------------------------------------------ noise


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key of a seed in [0, 2**62): two words below 2**31 (kernel arguments keep one int32 type)."""
    return seed & 0x7FFFFFFF, seed >> 31


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for uint32 values held in int64, exactly: a times each 16-bit half
    of b stays below 2**48, so nothing overflows."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    s = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2**49
    return (p_hi >> 16) + (s >> 32), s & MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int, rounds: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 words (broadcast together); the same rounds as ``tl.philox_impl``.

    The words broadcast lazily: with a [1, V] column counter and [B, 1] row and step counters, the first round runs
    on vectors and only the later ones on [B, V].
    """
    c0, c1, c2, c3 = (c & MASK32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) → fp32 uniforms in (0, 1): odd multiples of 2**-24, exact in fp32, never 0 or 1."""
    return (((r >> 9) << 1) | 1).to(torch.float32) * 2.0**-24


def gumbel_noise(
    seed: int, row_ids: torch.Tensor, step: int | torch.Tensor, vocab_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """[B, V] fp32 Gumbel(0, 1) noise of the step: Philox on the counter ``(column, row_id's low 32 bits, step,
    row_id's high bits)``.

    row_ids : [B] integer stream id of each row, in [0, 2**62). step : int, or a tensor of shape [], [1] or [B].
    """
    device = row_ids.device if device is None else device
    k0, k1 = split_seed(seed)
    cols = torch.arange(vocab_size, dtype=torch.int64, device=device).view(1, -1)
    rows = row_ids.to(torch.int64).view(-1, 1)
    if isinstance(step, torch.Tensor):
        steps = step.to(torch.int64).reshape(-1, 1)
    else:
        steps = torch.full((1, 1), step, dtype=torch.int64, device=device)
    r, _, _, _ = philox4x32(cols, rows, steps, rows >> 32, k0, k1)
    u = uniform_from_bits(r.expand(rows.shape[0], vocab_size))
    return -torch.log(-torch.log(u))


# ------------------------------------------------------------------------------------------------- step


def logits_step(
    logits: torch.Tensor,
    *,
    matcher=None,
    states: torch.Tensor | None = None,
    mask_phrases: bool | torch.Tensor = True,
    banned_tokens: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    step: int | torch.Tensor = 0,
    row_ids: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> LogitsStep:
    """One bias-aware decode step on [B, V] logits (the module docstring gives the order and the noise).

    Parameters
    ----------
    logits : [B, V] fp32, fp16 or bf16 scores of the next position (processed in fp32).
    matcher : a ``PhraseMatcher`` compiled for V columns, on the logits' device; or None (no lexicon).
    states : [B] int64 automaton states (``matcher.init_states`` / a previous step); required with a matcher.
    mask_phrases : as in ``PhraseMatcher.apply``: True masks phrase bans transformers' way, False leaves bans of
        two or more tokens to backtracking, a [B] bool tensor chooses per row.
    banned_tokens : [B, K] int32/int64 ids set to -inf in each row after the lexicon; negative ids are ignored.
    counts : [B, V] integer/bool context counts; tokens with a count > 0 get the repetition penalty.
    repetition_penalty : > 0; 1.0 is off.
    temperature : 0 (or below 1e-5) is greedy (top_k, top_p and min_p are then ignored); above, samples.
    top_k, top_p : 0 and 1.0 are off. Ties at the top-k boundary are all kept (transformers' rule).
    min_p : in [0, 1], 0.0 is off: keep the tokens at least ``min_p`` times as likely as the most likely one.
    seed : int in [0, 2**62), the key of the noise.
    step : int in [0, 2**32), or an int tensor ([], [1] or [B]) on the device: the noise's step counter.
    row_ids : [B] integer noise stream of each row (default: the row index).
    output_counts : [B, V] integer counts of each row's generated tokens (not the prompt), for the next two.
    presence_penalty, frequency_penalty : vLLM's: ``z - frequency_penalty * count - presence_penalty * [count > 0]``
        after the repetition penalty; 0.0 is off.

    Returns
    -------
    LogitsStep with [B] tensors (see its docstring).
    """
    check_step_args(
        logits, matcher=matcher, states=states, mask_phrases=mask_phrases, banned_tokens=banned_tokens,
        counts=counts, repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, step=step, row_ids=row_ids, min_p=min_p, output_counts=output_counts,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )  # fmt: skip
    b, v = logits.shape
    temperature = effective_temperature(temperature)
    raw = logits.float()
    top = raw.argmax(dim=-1)
    x = raw
    if matcher is not None:
        x = matcher.apply(x, states, mask_phrases=mask_phrases)
    if banned_tokens is not None:
        ids = banned_tokens.to(torch.int64)
        hit = torch.zeros(b, v + 1, dtype=torch.bool, device=x.device)
        hit.scatter_(1, torch.where((ids >= 0) & (ids < v), ids, v), True)
        x = x.masked_fill(hit[:, :v], float("-inf"))
    if counts is not None and repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, counts > 0, repetition_penalty)
    if output_counts is not None and (presence_penalty != 0.0 or frequency_penalty != 0.0):
        x = apply_presence_frequency(x, output_counts, presence_penalty, frequency_penalty)
    dead = torch.isneginf(x).all(dim=-1)
    if temperature == 0.0:
        chosen = x.argmax(dim=-1)
    else:
        z = filter_logits(x / temperature, top_k, top_p, min_p)
        if row_ids is None:
            row_ids = torch.arange(b, device=x.device)
        chosen = (z + gumbel_noise(seed, row_ids, step, v, x.device)).argmax(dim=-1)
    chosen = torch.where(dead, -1, chosen)
    zeros = torch.zeros(b, dtype=torch.int64, device=x.device)
    if matcher is None:
        no_bias = torch.zeros_like(raw[:, 0], dtype=torch.float32)
        return LogitsStep(chosen, None, dead, zeros - 1, zeros, no_bias, top, no_bias, zeros, zeros - 1)
    bias, ban_len, entry = matcher.lookup(states, chosen, mask_phrases=mask_phrases)
    top_bias, top_ban_len, top_entry = matcher.lookup(states, top, mask_phrases=mask_phrases)
    new_states = torch.where(dead, states, matcher.step(states, chosen))
    return LogitsStep(chosen, new_states, dead, entry, ban_len, bias.float(), top, top_bias.float(), top_ban_len,
                      top_entry)


def lm_head_step(hidden: torch.Tensor, lm_head: torch.Tensor, *, lora=None, adapter_idx=None,
                 **step_args) -> LogitsStep:  # fmt: skip
    """``logits_step(lm_head_logits(hidden, lm_head, lora, adapter_idx), **step_args)``: the lm_head (and its
    per-row LoRA, ``fastdebias.reference.lora.lora_linear``) in the weights' dtype, then the step.

    hidden : [B, K] final hidden states of the last position; lm_head : [V, K], same dtype and device;
    lora : (lora_a [n, R, K], lora_b [n, V, R], scale [n] fp32) or None; adapter_idx : [B] (-1 = none).
    """
    check_lm_head_args(hidden, lm_head, lora, adapter_idx)
    return logits_step(lm_head_logits(hidden, lm_head, lora, adapter_idx), **step_args)
