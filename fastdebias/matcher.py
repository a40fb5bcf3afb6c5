"""Compiled phrase matcher: a token-level Aho–Corasick automaton stored as flat tensors.

A lexicon compiles (``Lexicon.compile``) into token sequences ``ids -> bias`` with transformers' semantics
(``SequenceBiasLogitsProcessor`` for penalties, ``NoBadWordsLogitsProcessor`` for bans, bias ``-inf``): a
length-1 sequence always biases its token; a longer one biases its last token whenever the sequence so far
ends with the other tokens (its *prefix*). The automaton reads the sequence one token at a time and its state
stands for the longest suffix of the sequence that is a prefix of some entry's prefix; every entry whose prefix
is a suffix of the sequence hangs off that state, so each step is a bounded number of tensor ops whatever the
size of the lexicon, and nothing leaves the device.

Tensor layout (all int64 unless said; ``V`` = vocab size, ``S`` = states, ``E`` = explicit transitions,
``P`` = (state, token) bias pairs; state 0 is the root, the empty suffix):

- ``root_next [V + 1]``: the state after reading token ``t`` from the root (``0`` or a depth-1 state); index
  ``V`` is where ids outside ``[0, V)`` go, and leads to the root.
- ``trans_key [E + 1]``, ``trans_next [E + 1]``: every transition ``δ(s, t)`` that differs from
  ``root_next[t]``, failure links already folded in (the full Aho–Corasick ``δ``, not the trie's ``goto``),
  keyed ``s * (V + 1) + t`` and sorted, plus a sentinel key ``INT64_MAX``. A step is one ``searchsorted``.
- ``depth [S]``: the length of the suffix a state stands for. No state is deeper than ``max_depth`` (the
  longest entry minus one), so the state after a sequence depends only on its last ``max_depth`` tokens.
- ``out_key [P + 1]``, ``out_token [P + 1]``: the tokens a state biases beyond the length-1 entries, keyed
  like ``trans_key`` (sorted, sentinel last). Pairs of one state are contiguous: ``out_start [S]`` is the first,
  ``out_last [S]`` the number minus one (``0`` where a state has none: it then points at the dummy pair ``P``,
  token 0 with the plain length-1 bias, which rewrites a logit with the value it already has).
- ``out_ban_len [P + 1]``: the length of the shortest banned sequence that token completes from that state
  (``1`` where the token is banned outright, ``0`` where it completes none): for ``"backtrack"``, the number of
  positions to rewind is ``out_ban_len - 1``.
- ``out_entry [P + 1]``: the lexicon entry that fired: the shortest ban if any, else the longest penalty.
- per dtype (built on first use of that dtype, cached): ``l1 [V]``, the length-1 biases (``-inf`` for bans),
  and ``out_bias_hf [P + 1]`` / ``out_bias_soft [P + 1]``: the full bias of each pair with / without the
  multi-token bans, summed in exactly transformers' order (length-1 first, then by prefix length group in
  first-seen order, then dict order, each addition rounded to the dtype), so results are bit-identical.
- ``l1_ban_len [V]`` (0/1) and ``l1_entry [V]``: the same as ``out_ban_len`` / ``out_entry`` for tokens that
  no pair of the state mentions.

The decode loop, per batch row (``B`` rows, no host sync anywhere)::

    states = m.init_states(prompt_ids, attention_mask)     # [B]; left padding skipped
    logits = m.apply(logits, states)                       # [B, V] "hf": biases added, bans -inf
    token = sample(logits)
    bias, ban_len, entry = m.lookup(states, token)         # what fired for the chosen token (log it)
    states = m.step(states, token)                         # advance by the new token

For ``"backtrack"``: ``m.apply(logits, states, mask_phrases=False)`` leaves multi-token bans out; a row whose
sampled token has ``ban_len >= 2`` completes a banned phrase: rewind ``ban_len - 1`` positions, restore the
state there (keep the states of past positions, or ``init_states`` on the last ``max_depth`` tokens), and ban
the token at that position (the phrase's first token). ``mask_phrases`` also takes a [B] bool tensor, for rows
that fall back to ``"hf"`` masking (rewind budget spent, or the phrase began in the prompt).

Cost per step, independent of the number of entries: ``step`` and ``lookup`` are one binary search per row
(O(B log E)); ``apply`` is one [B, V] addition plus a gather/scatter of [B, max_out] (``max_out``: the most
pairs one state has, a property of how many entries share a context, not of the lexicon's size).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdebias.errors import LexiconError

INT64_MAX = torch.iinfo(torch.int64).max
BAN = float("-inf")

_DEVICE_TENSORS = (
    "root_next",
    "trans_key",
    "trans_next",
    "depth",
    "out_key",
    "out_token",
    "out_ban_len",
    "out_entry",
    "out_start",
    "out_last",
    "l1_ban_len",
    "l1_entry",
    "_arange_out",
)


@dataclass(frozen=True)
class _BiasData:
    """CPU inputs of the per-dtype bias tables: the penalty contributions in transformers' summation order."""

    pl1: torch.Tensor  # [V] fp32 length-1 penalties
    l1_ban: torch.Tensor  # [V] bool length-1 bans
    pair_token: torch.Tensor  # [P + 1] the token of each pair (dummy pair: token 0)
    pair_multi_ban: torch.Tensor  # [P + 1] bool: a multi-token ban fires on the pair
    contrib_pair: torch.Tensor  # [C] pair of each multi-token penalty contribution
    contrib_rank: torch.Tensor  # [C] its position in its pair's summation order
    contrib_value: torch.Tensor  # [C] fp32 bias


class PhraseMatcher:
    """A lexicon compiled for one vocabulary: the automaton and bias tables (layout in the module docstring).

    Build with ``Lexicon.compile`` (or ``build_matcher``); move with ``.to(device)``, once.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        bias_data: _BiasData,
        *,
        vocab_size: int,
        max_depth: int,
        max_out: int,
        sequence_bias: dict[tuple[int, ...], float],
        bad_words_ids: list[list[int]],
        entry_phrases: Sequence[str],
        entry_categories: Sequence[str],
        entry_actions: Sequence[str | float],
    ) -> None:
        for name in _DEVICE_TENSORS:
            setattr(self, name, tensors[name])
        self._bias_data = bias_data
        self._tables_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.vocab_size = vocab_size
        self.max_depth = max_depth
        self.max_out = max_out
        self._sequence_bias = sequence_bias
        self._bad_words_ids = bad_words_ids
        self.entry_phrases = list(entry_phrases)
        self.entry_categories = list(entry_categories)
        self.entry_actions = list(entry_actions)

    @property
    def device(self) -> torch.device:
        return self.root_next.device

    @property
    def num_states(self) -> int:
        return self.depth.shape[0]

    def to(self, device: torch.device | str) -> PhraseMatcher:
        """A copy with every per-step tensor on ``device`` (bias tables follow on first use of a dtype)."""
        device = torch.device(device)
        moved = PhraseMatcher(
            {name: getattr(self, name).to(device) for name in _DEVICE_TENSORS},
            self._bias_data,
            vocab_size=self.vocab_size,
            max_depth=self.max_depth,
            max_out=self.max_out,
            sequence_bias=self._sequence_bias,
            bad_words_ids=self._bad_words_ids,
            entry_phrases=self.entry_phrases,
            entry_categories=self.entry_categories,
            entry_actions=self.entry_actions,
        )
        return moved

    def hf_sequence_bias(self) -> dict[tuple[int, ...], float]:
        """The penalties as transformers' ``sequence_bias`` (``generate(sequence_bias=...)``); empty if none."""
        return dict(self._sequence_bias)

    def hf_bad_words_ids(self) -> list[list[int]]:
        """The bans as transformers' ``bad_words_ids`` (EOS-only bans already dropped); empty if none."""
        return [list(ids) for ids in self._bad_words_ids]

    # -- per step --------------------------------------------------------------------------------------------

    def _token_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids as int64 with everything outside ``[0, V)`` sent to ``V`` (a token that matches nothing)."""
        tokens = tokens.to(torch.int64)
        return torch.where((tokens >= 0) & (tokens < self.vocab_size), tokens, self.vocab_size)

    def step(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Advance each row's state by its new token.

        Parameters
        ----------
        states : [B] int64 states on ``self.device``.
        tokens : [B] integer token ids; ids outside ``[0, V)`` send the row to the root.

        Returns
        -------
        [B] int64 next states.
        """
        t = self._token_index(tokens)
        key = states * (self.vocab_size + 1) + t
        # the sentinel INT64_MAX is larger than any key, so pos is always a valid index
        pos = torch.searchsorted(self.trans_key, key)
        hit = self.trans_key[pos] == key
        return torch.where(hit, self.trans_next[pos], self.root_next[t])

    def init_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The states after reading each row of a (left-padded) batch of token ids.

        Only the last ``max_depth`` columns are read: the state depends on nothing earlier.

        Parameters
        ----------
        input_ids : [B, T] integer token ids, on ``self.device``.
        attention_mask : optional [B, T]; positions where it is 0 are skipped (left padding).

        Returns
        -------
        [B] int64 states.
        """
        b, t = input_ids.shape
        states = torch.zeros(b, dtype=torch.int64, device=input_ids.device)
        for j in range(max(t - self.max_depth, 0), t):
            nxt = self.step(states, input_ids[:, j])
            states = nxt if attention_mask is None else torch.where(attention_mask[:, j].bool(), nxt, states)
        return states

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:
        """Build the bias tables for ``dtype`` now, before a compiled or captured decode step reads them (they are
        otherwise built on first use, with host-side work that a compiled step would break on)."""
        self._tables(dtype)

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(l1 [V], out_bias_hf [P + 1], out_bias_soft [P + 1])`` in ``dtype`` on the device, built once."""
        tables = self._tables_cache.get(dtype)
        if tables is not None:
            return tables
        d = self._bias_data
        # The same ops as transformers (zeros in the scores' dtype, += fp32 length-1 biases, then index_add_ of
        # each contribution cast to the dtype, group by group), so every rounding step is the same.
        l1 = torch.zeros(self.vocab_size, dtype=dtype)
        l1 += d.pl1
        total = torch.zeros(d.pair_token.shape[0], dtype=dtype)
        total += d.pl1[d.pair_token]
        n_ranks = int(d.contrib_rank.max()) + 1 if d.contrib_rank.numel() else 0
        for r in range(n_ranks):
            sel = d.contrib_rank == r
            total.index_add_(0, d.contrib_pair[sel], d.contrib_value[sel].to(dtype))
        soft = total.masked_fill(d.l1_ban[d.pair_token], BAN)
        hf = soft.masked_fill(d.pair_multi_ban, BAN)
        l1 = l1.masked_fill(d.l1_ban, BAN)
        tables = (l1.to(self.device), hf.to(self.device), soft.to(self.device))
        self._tables_cache[dtype] = tables
        return tables

    def apply(
        self, scores: torch.Tensor, states: torch.Tensor, *, mask_phrases: bool | torch.Tensor = True
    ) -> torch.Tensor:
        """Add each row's biases to its next-token scores: transformers' ``"hf"`` semantics, bit for bit.

        Parameters
        ----------
        scores : [B, V] float logits (any float dtype; not modified).
        states : [B] int64 states (``init_states`` / ``step``).
        mask_phrases : when False, bans of two or more tokens are not applied (``"backtrack"`` mode handles
            them by rewinding); length-1 bans and all penalties still are. A [B] bool tensor chooses per row
            (e.g. ``"hf"`` masking for rows past their rewind budget).

        Returns
        -------
        [B, V] new scores, same dtype: ``scores + bias``, with ``-inf`` where a ban fires.
        """
        if scores.shape[-1] != self.vocab_size:
            raise LexiconError(
                f"scores have {scores.shape[-1]} columns but the lexicon was compiled for a vocabulary of "
                f"{self.vocab_size}: compile it with vocab_size={scores.shape[-1]}"
            )
        l1, bias_hf, bias_soft = self._tables(scores.dtype)
        out = scores + l1
        if self.max_out == 0:
            return out
        # [B, max_out] pair indices; a state's unused slots repeat its last pair (same token, same value), so
        # the scatter below writes identical values to duplicate indices and its result is well defined.
        idx = self.out_start[states][:, None] + torch.minimum(self._arange_out, self.out_last[states][:, None])
        tok = self.out_token[idx]
        val = _select(mask_phrases, bias_hf, bias_soft, idx)
        return out.scatter_(1, tok, scores.gather(1, tok) + val)

    def lookup(
        self,
        states: torch.Tensor,
        tokens: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        mask_phrases: bool | torch.Tensor = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the lexicon does to one token per row: for the interventions log and for backtracking.

        Parameters
        ----------
        states : [B] int64 states.
        tokens : [B] integer candidate next tokens.
        dtype : dtype of the returned bias (the scores' dtype, for identical rounding).
        mask_phrases : as in ``apply``.

        Returns
        -------
        bias : [B] the bias ``apply`` adds to that token (0 where nothing fires, ``-inf`` for a ban).
        ban_len : [B] int64 length of the shortest banned sequence the token would complete (0: none; 1: the
            token itself is banned; L >= 2: rewind L - 1 positions to where the phrase began).
        entry : [B] int64 index of the lexicon entry that fired (``entry_phrases`` / ``entry_categories``),
            -1 where none did.
        """
        l1, bias_hf, bias_soft = self._tables(dtype)
        t = self._token_index(tokens)
        tc = t.clamp(max=self.vocab_size - 1)
        key = states * (self.vocab_size + 1) + t
        pos = torch.searchsorted(self.out_key, key)
        hit = self.out_key[pos] == key
        inside = t < self.vocab_size
        pair_bias = _select(mask_phrases, bias_hf, bias_soft, pos)
        bias = torch.where(hit, pair_bias, torch.where(inside, l1[tc], 0))
        ban_len = torch.where(hit, self.out_ban_len[pos], torch.where(inside, self.l1_ban_len[tc], 0))
        entry = torch.where(hit, self.out_entry[pos], torch.where(inside, self.l1_entry[tc], -1))
        return bias, ban_len, entry


def _select(mask_phrases: bool | torch.Tensor, hf: torch.Tensor, soft: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``hf[idx]`` or ``soft[idx]``, for all rows (a bool) or row by row (a [B] bool tensor; idx is [B] or [B, M])."""
    if isinstance(mask_phrases, bool):
        return (hf if mask_phrases else soft)[idx]
    rows = mask_phrases.reshape(-1, *([1] * (idx.dim() - 1)))
    return torch.where(rows, hf[idx], soft[idx])


def build_matcher(
    sequences: Sequence[tuple[tuple[int, ...], float, int]],
    vocab_size: int,
    *,
    eos_token_ids: Sequence[int] = (),
    entry_phrases: Sequence[str] = (),
    entry_categories: Sequence[str] = (),
    entry_actions: Sequence[str | float] = (),
) -> PhraseMatcher:
    """Compile token sequences into a ``PhraseMatcher`` on the CPU.

    Parameters
    ----------
    sequences : ``(token_ids, bias, entry_index)`` in lexicon order; ``bias`` is a float, ``-inf`` for a ban.
        Penalties on the same ids add up (in this order); a ban of ids equal to one EOS id is dropped, as
        transformers' ``NoBadWordsLogitsProcessor`` drops it. Ids must lie in ``[0, vocab_size)``.
    vocab_size : the number of columns of the scores the matcher will bias.
    eos_token_ids : EOS ids whose single-token bans are dropped.
    entry_phrases, entry_categories, entry_actions : per lexicon entry, for the interventions log.

    Returns
    -------
    PhraseMatcher on the CPU.
    """
    v = vocab_size
    eos = set(eos_token_ids)
    # transformers' view: one sequence_bias dict of penalties, one bad_words_ids list of bans
    penalties: dict[tuple[int, ...], float] = {}
    pen_entry: dict[tuple[int, ...], int] = {}
    bans: dict[tuple[int, ...], int] = {}
    for ids, bias, entry in sequences:
        if bias == BAN:
            if not (len(ids) == 1 and ids[0] in eos):
                bans.setdefault(ids, entry)
        elif ids in penalties:
            penalties[ids] += bias
        else:
            penalties[ids] = bias
            pen_entry[ids] = entry

    pl1 = torch.zeros(v, dtype=torch.float32)
    l1_ban = torch.zeros(v, dtype=torch.bool)
    l1_entry = torch.full((v,), -1, dtype=torch.int64)
    one_pen = [(ids[0], b, pen_entry[ids]) for ids, b in penalties.items() if len(ids) == 1]
    if one_pen:
        tok, val, ent = zip(*one_pen)
        pl1[list(tok)] = torch.tensor(val, dtype=torch.float32)
        l1_entry[list(tok)] = torch.tensor(ent, dtype=torch.int64)
    one_ban = [(ids[0], e) for ids, e in bans.items() if len(ids) == 1]
    if one_ban:
        tok, ent = zip(*one_ban)
        l1_ban[list(tok)] = True
        l1_entry[list(tok)] = torch.tensor(ent, dtype=torch.int64)

    # transformers sums the multi-token penalties group by group, groups keyed by prefix length in the order
    # each length first appears in the dict, and in dict order inside a group: this key reproduces that order
    group_rank: dict[int, int] = {}
    n_pen = len(penalties)
    pen_values: list[float] = []
    # trie of the entries' prefixes; own[node] = contributions of the entries whose prefix is that node:
    # (last token, order key or -1 for a ban, penalty index or -1, sequence length, entry)
    children: list[dict[int, int]] = [{}]
    own: dict[int, list[tuple[int, int, int, int, int]]] = {}

    def insert(prefix: tuple[int, ...]) -> int:
        node = 0
        for tok_id in prefix:
            nxt = children[node].get(tok_id)
            if nxt is None:
                nxt = len(children)
                children[node][tok_id] = nxt
                children.append({})
            node = nxt
        return node

    for k, (ids, b) in enumerate(penalties.items()):
        if len(ids) > 1:
            rank = group_rank.setdefault(len(ids) - 1, len(group_rank))
            own.setdefault(insert(ids[:-1]), []).append(
                (ids[-1], rank * n_pen + k, len(pen_values), len(ids), pen_entry[ids])
            )
            pen_values.append(b)
    for ids, e in bans.items():
        if len(ids) > 1:
            own.setdefault(insert(ids[:-1]), []).append((ids[-1], -1, -1, len(ids), e))

    # Breadth-first: failure links, the full transition function δ (a state inherits the transitions of its
    # failure state, then its own trie edges override them), and output links (nearest state with outputs on
    # the failure chain).
    n_states = len(children)
    fail = [0] * n_states
    depth = [0] * n_states
    out_link = [-1] * n_states
    root_next = [0] * (v + 1)
    for tok_id, c in children[0].items():
        root_next[tok_id] = c
    trans: list[dict[int, int]] = [{} for _ in range(n_states)]
    queue = deque(children[0].values())
    for c in queue:
        depth[c] = 1
    while queue:
        s = queue.popleft()
        f = fail[s]
        if children[s]:
            trans[s] = {**trans[f], **children[s]} if f else dict(children[s])
        else:
            trans[s] = trans[f]  # shared, never mutated
        for tok_id, c in children[s].items():
            fc = trans[f].get(tok_id, root_next[tok_id]) if f else root_next[tok_id]
            fail[c] = fc
            depth[c] = depth[s] + 1
            out_link[c] = fc if fc in own else out_link[fc]
            queue.append(c)

    trans_key: list[int] = []
    trans_next: list[int] = []
    for s in range(1, n_states):
        tr = trans[s]
        for tok_id in sorted(tr):
            trans_key.append(s * (v + 1) + tok_id)
            trans_next.append(tr[tok_id])

    # (state, token) pairs: every contribution of every entry whose prefix is a suffix of the state
    pair_state: list[int] = []
    pair_token: list[int] = []
    pair_ban_len: list[int] = []
    pair_entry: list[int] = []
    pair_multi_ban: list[bool] = []
    contrib_pair: list[int] = []
    contrib_rank: list[int] = []
    contrib_value: list[float] = []
    out_start = [0] * n_states
    out_count = [0] * n_states
    l1_ban_list = l1_ban.tolist()
    l1_entry_list = l1_entry.tolist()
    for s in range(n_states):
        node = s if s in own else out_link[s]
        if node < 0:
            continue
        by_token: dict[int, list[tuple[int, int, int, int, int]]] = {}
        while node >= 0:
            for c in own[node]:
                by_token.setdefault(c[0], []).append(c)
            node = out_link[node]
        out_start[s] = len(pair_state)
        out_count[s] = len(by_token)
        for tok_id in sorted(by_token):
            contribs = by_token[tok_id]
            p = len(pair_state)
            pens = sorted(c for c in contribs if c[1] >= 0)
            ban_lens = [(c[3], c[4]) for c in contribs if c[1] < 0]
            for r, c in enumerate(pens):
                contrib_pair.append(p)
                contrib_rank.append(r)
                contrib_value.append(pen_values[c[2]])
            if l1_ban_list[tok_id]:
                ban_len, entry = 1, l1_entry_list[tok_id]
            elif ban_lens:
                ban_len, entry = min(ban_lens)
            else:
                # the most specific penalty: the longest sequence, the first in summation order on ties
                ban_len, entry = 0, max(pens, key=lambda c: (c[3], -c[1]))[4]
            pair_state.append(s)
            pair_token.append(tok_id)
            pair_ban_len.append(ban_len)
            pair_entry.append(entry)
            pair_multi_ban.append(bool(ban_lens))
    n_pairs = len(pair_state)
    max_out = max(out_count, default=0)
    out_last = [max(n - 1, 0) for n in out_count]
    for s in range(n_states):
        if out_count[s] == 0:
            out_start[s] = n_pairs  # the dummy pair

    i64 = torch.int64
    out_key = [s * (v + 1) + t for s, t in zip(pair_state, pair_token)]
    tensors = {
        "root_next": torch.tensor(root_next, dtype=i64),
        "trans_key": torch.tensor(trans_key + [INT64_MAX], dtype=i64),
        "trans_next": torch.tensor(trans_next + [0], dtype=i64),
        "depth": torch.tensor(depth, dtype=i64),
        "out_key": torch.tensor(out_key + [INT64_MAX], dtype=i64),
        "out_token": torch.tensor(pair_token + [0], dtype=i64),
        "out_ban_len": torch.tensor(pair_ban_len + [0], dtype=i64),
        "out_entry": torch.tensor(pair_entry + [-1], dtype=i64),
        "out_start": torch.tensor(out_start, dtype=i64),
        "out_last": torch.tensor(out_last, dtype=i64),
        "l1_ban_len": l1_ban.to(i64),
        "l1_entry": l1_entry,
        "_arange_out": torch.arange(max_out, dtype=i64),
    }
    bias_data = _BiasData(
        pl1=pl1,
        l1_ban=l1_ban,
        pair_token=tensors["out_token"],
        pair_multi_ban=torch.tensor(pair_multi_ban + [False], dtype=torch.bool),
        contrib_pair=torch.tensor(contrib_pair, dtype=i64),
        contrib_rank=torch.tensor(contrib_rank, dtype=i64),
        contrib_value=torch.tensor(contrib_value, dtype=torch.float32),
    )
    return PhraseMatcher(
        tensors,
        bias_data,
        vocab_size=v,
        max_depth=max(depth),
        max_out=max_out,
        sequence_bias=penalties,
        bad_words_ids=[list(ids) for ids in bans],
        entry_phrases=entry_phrases,
        entry_categories=entry_categories,
        entry_actions=entry_actions,
    )
