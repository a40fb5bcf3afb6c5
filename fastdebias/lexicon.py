"""Bias lexicon: entries of (phrase, action, category), compiled against a tokenizer into a ``PhraseMatcher``.

An action is ``"ban"`` (stored as bias ``-inf``) or a finite float added to the logit of the phrase's last token
(a penalty if negative, a bonus if positive). A phrase is text, expanded into variants at compile time (with and
without a leading space; as given, lower, Capitalized and UPPER case), or a tuple of token ids used as is.

Sources::

    Lexicon.from_phrases(["old people", ("bossy", -5.0), ("thug", "ban", "race")])   # str alone = ban
    Lexicon.from_phrases({"old people": "ban", "bossy": -5.0})   # phrase → action
    Lexicon.load("lexicon.jsonl")   # {"phrase": ..., "action": "ban" | float, "category": ...} per line
    Lexicon.load("lexicon.csv")     # header with a phrase column; action and category columns optional
    Lexicon.load("lexicon.txt")     # one phrase per line, all bans; blank lines and '#' comments skipped
    Lexicon.default()               # fastdebias/data/default_lexicon.jsonl
    Lexicon.from_token_sequences({(523, 88): -3.0, (91,): float("-inf")})   # or bad_words_ids lists

A lexicon is immutable; ``a + b`` is the union (identical entries kept once), ``len`` the number of entries.
Semantics are transformers': penalties as ``generate(sequence_bias=...)``, bans as ``generate(bad_words_ids=...)``
(see ``fastdebias/matcher.py``). Penalties of distinct entries that tokenize to the same ids add up.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import numbers
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from fastdebias.errors import LexiconError, check_unicode, token_id_list
from fastdebias.matcher import PhraseMatcher, build_matcher
from fastdebias.ops import resolve_device

DEFAULT_LEXICON_PATH = Path(__file__).parent / "data" / "default_lexicon.jsonl"
DEFAULT_CATEGORY = "uncategorised"
BAN = float("-inf")
ACTIONS = ("penalised", "banned", "rewound")  # Intervention.action, indexed by the decode loop's action code

Phrase = Union[str, tuple[int, ...]]
Action = Union[str, float, int]

_default_cache: dict[str, Lexicon] = {}


@dataclass(frozen=True)
class Entry:
    """One lexicon entry.

    Attributes
    ----------
    phrase : text (expanded into variants when compiled) or a tuple of token ids (used as is).
    bias : a finite float added to the logit of the phrase's last token, or ``-inf`` for a ban.
    category : free-form label (``"age"``, ``"gender"``, ...) reported in the interventions log.
    """

    phrase: Phrase
    bias: float
    category: str = DEFAULT_CATEGORY

    def __post_init__(self) -> None:
        if isinstance(self.phrase, str):
            if not self.phrase.strip():
                raise LexiconError(f"empty phrase {self.phrase!r}: give at least one non-space character")
            _check_text(self.phrase, f"phrase {self.phrase!r}")
        elif isinstance(self.phrase, (tuple, list)):
            ids = tuple(self.phrase)
            if not ids:
                raise LexiconError("empty token sequence (): give at least one token id")
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise LexiconError(f"token sequence {ids}: {bad} are not non-negative integer token ids")
            object.__setattr__(self, "phrase", ids)
        else:
            raise LexiconError(
                f"phrase {self.phrase!r} is a {type(self.phrase).__name__}: use a str or a tuple of ints"
            )
        if not isinstance(self.category, str):
            raise LexiconError(f"phrase {self.phrase!r}: category {self.category!r} is not a string")
        _check_text(self.category, f"phrase {self.phrase!r}: category {self.category!r}")
        object.__setattr__(self, "bias", _parse_action(self.bias, self.phrase))

    @property
    def is_ban(self) -> bool:
        return self.bias == BAN

    @property
    def action(self) -> str | float:
        """``"ban"`` or the float bias."""
        return "ban" if self.is_ban else self.bias


@dataclass(frozen=True)
class Intervention:
    """One time a lexicon entry changed the decoding of a sequence.

    Attributes
    ----------
    step : decode step (0 = the first generated token).
    phrase : the entry's phrase (token ids are shown as a list when no tokenizer decoded them).
    category : the entry's category.
    action : ``"penalised"``, ``"banned"`` or ``"rewound"``.
    token_id : the token whose logit was changed (for ``"rewound"``: the phrase's first token, banned there).
    """

    step: int
    phrase: str
    category: str
    action: str
    token_id: int


def _check_text(text: str, what: str) -> None:
    check_unicode(text, what, LexiconError)


def _parse_action(value: Any, phrase: Any) -> float:
    """``"ban"`` / ``-inf`` → ``-inf``; a finite number or numeric string → float; anything else raises."""
    bias = None
    if isinstance(value, str) and value.strip().lower() == "ban":
        return BAN
    if isinstance(value, (str, numbers.Real)) and not isinstance(value, bool):
        try:
            bias = float(value)
        except (ValueError, OverflowError):
            bias = None
    if bias is None or math.isnan(bias) or bias == float("inf"):
        raise LexiconError(
            f"phrase {phrase!r}: action {value!r} is not 'ban' or a number; use \"ban\" (or -inf) to forbid the "
            "phrase, or a finite float added to its logit (negative penalises)"
        )
    return bias + 0.0  # -0.0 → 0.0: the bias tables start from +0.0 like transformers'


def phrase_variants(phrase: str, *, space: bool = True, case: bool = True) -> list[str]:
    """The strings a phrase is tokenized as, de-duplicated, in a fixed order.

    Parameters
    ----------
    phrase : the phrase as written.
    space : also with a leading space (mid-sentence words are tokenized with it); the phrase is stripped first.
    case : also lower, Capitalized (first letter of the lower-case form) and UPPER case.

    Returns
    -------
    list of distinct strings; the phrase itself (stripped if ``space``) comes first.
    """
    base = phrase.strip() if space else phrase
    forms = [base]
    if case:
        low = base.lower()
        i = len(low) - len(low.lstrip())
        forms += [low, low[:i] + low[i : i + 1].upper() + low[i + 1 :], base.upper()]
    out: list[str] = []
    for form in forms:
        out += [form, " " + form] if space else [form]
    return list(dict.fromkeys(out))


class Lexicon:
    """An immutable set of bias entries (see the module docstring).

    Parameters
    ----------
    entries : ``Entry`` objects; identical entries are kept once, in first-seen order.
    space_variants : compile text phrases with and without a leading space.
    case_variants : compile text phrases as given, lower, Capitalized and UPPER case.
    """

    def __init__(self, entries: Iterable[Entry] = (), *, space_variants: bool = True, case_variants: bool = True):
        entries = tuple(entries)
        for e in entries:
            if not isinstance(e, Entry):
                raise LexiconError(f"Lexicon entries must be fastdebias.lexicon.Entry, got {e!r}: use from_phrases")
        self._entries = tuple(dict.fromkeys(entries))
        self.space_variants = bool(space_variants)
        self.case_variants = bool(case_variants)
        self._cache: Any = weakref.WeakKeyDictionary()  # tokenizer → {(vocab, eos, device): PhraseMatcher}
        self._cache_no_tokenizer: dict[tuple, PhraseMatcher] = {}

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_phrases(
        cls,
        items: Iterable[str | Sequence[Any] | Entry] | Mapping[str, Action],
        *,
        category: str = DEFAULT_CATEGORY,
        space_variants: bool = True,
        case_variants: bool = True,
    ) -> Lexicon:
        """From Python items: ``"phrase"`` (a ban), ``(phrase, action)`` or ``(phrase, action, category)``; or a
        dict ``{phrase: action}``, read as the ``(phrase, action)`` pairs of its items.

        ``action`` is ``"ban"``, ``-inf`` or a finite float; ``category`` defaults to ``category``.
        """
        if isinstance(items, (str, bytes)):  # iterating it would ban each character
            raise LexiconError(
                f"from_phrases: items={items!r} is a single {type(items).__name__}; pass a list of phrases, "
                f"e.g. [{items!r}]"
            )
        if isinstance(items, Mapping):  # {phrase: action}: the values are actions, not dropped
            items = list(items.items())
        elif not isinstance(items, Iterable):
            raise LexiconError(
                f"from_phrases: items={items!r} is a {type(items).__name__}; pass a list of phrases, "
                '"phrase" or (phrase, action[, category]), or a dict {phrase: action}'
            )
        entries = []
        for i, item in enumerate(items):
            try:
                if isinstance(item, Entry):
                    entries.append(item)
                elif isinstance(item, str):
                    entries.append(Entry(item, BAN, category))
                elif isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str):
                    entries.append(Entry(item[0], item[1], item[2] if len(item) == 3 else category))
                else:
                    raise LexiconError(
                        f'{item!r} is not a phrase: give "phrase", (phrase, action) or (phrase, action, category)'
                    )
            except LexiconError as err:
                raise LexiconError(f"from_phrases item {i}: {err}") from None
        return cls(entries, space_variants=space_variants, case_variants=case_variants)

    @classmethod
    def from_token_sequences(
        cls,
        sequences: Mapping[Sequence[int], Action] | Sequence[Sequence[Any]],
        *,
        category: str = DEFAULT_CATEGORY,
    ) -> Lexicon:
        """From token ids, no tokenizer needed: transformers' ``sequence_bias`` or ``bad_words_ids``.

        Parameters
        ----------
        sequences : ``{(ids...): bias}`` (bias a float, ``-inf`` or ``"ban"``); the same as a list
            ``[[ids, bias], ...]`` (a repeated sequence keeps its last bias, as transformers does); or a
            ``bad_words_ids`` list ``[[ids...], ...]``, all bans.
        category : the category of every entry.
        """
        if isinstance(sequences, Mapping):
            items = list(sequences.items())
        elif isinstance(sequences, (list, tuple)):
            pair_form = [
                isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], (list, tuple)) for s in sequences
            ]
            if all(pair_form):
                # transformers converts this form with a dict comprehension: first position, last value
                items = list({tuple(s[0]): s[1] for s in sequences}.items())
            elif not any(pair_form):
                items = [(s, BAN) for s in sequences]
            else:
                raise LexiconError(
                    "from_token_sequences: mixes [[ids], bias] pairs with plain id lists; give one form: "
                    "sequence_bias pairs or bad_words_ids lists"
                )
        else:
            raise LexiconError(
                f"from_token_sequences: {type(sequences).__name__} is neither a dict {{(ids...): bias}} nor a list"
            )
        entries = []
        for i, (ids, action) in enumerate(items):
            if not isinstance(ids, (list, tuple)):
                raise LexiconError(f"from_token_sequences item {i}: {ids!r} is not a tuple or list of token ids")
            try:
                entries.append(Entry(tuple(ids), action, category))
            except LexiconError as err:
                raise LexiconError(f"from_token_sequences item {i}: {err}") from None
        return cls(entries)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        category: str = DEFAULT_CATEGORY,
        space_variants: bool = True,
        case_variants: bool = True,
    ) -> Lexicon:
        """From a file, by extension: ``.jsonl``, ``.csv`` (with a header) or ``.txt`` (bans).

        JSONL: one object per line, ``{"phrase": str, "action": "ban" | float, "category": str}``; ``action``
        defaults to ``"ban"`` and ``category`` to ``category``. CSV: a header naming a ``phrase`` column and
        optionally ``action`` and ``category`` columns (empty cells take the defaults). Any other key or column is
        an error (a misspelt ``action``, or a ``bias`` column, would otherwise turn every penalty into a ban), but
        for those whose name starts with ``_`` (notes, sources), which are ignored.
        TXT: one phrase per line, all bans. Blank lines are skipped everywhere, and lines starting with ``#`` in
        ``.txt`` files. A file with no entry is an error.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise LexiconError(
                f"Lexicon.load: path={path!r} is a {type(path).__name__}; give the path of a .jsonl, .csv or .txt "
                "lexicon file"
            )
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".jsonl", ".csv", ".txt"):
            raise LexiconError(f"{p}: unsupported lexicon file type {p.suffix!r}; use .jsonl, .csv or .txt")
        try:
            # utf-8-sig: a byte-order mark (Excel and Notepad write one) is dropped instead of becoming part of the
            # CSV header's first column name or the first JSONL line
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise LexiconError(f"{p}: no such lexicon file; check the path") from None
        except UnicodeDecodeError as err:
            raise LexiconError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        except OSError as err:
            raise LexiconError(f"{p}: cannot read the lexicon file ({err.strerror})") from None
        reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".txt": _read_txt}[suffix]
        entries = []
        for line, phrase, action, cat in reader(p, text):
            try:
                entries.append(Entry(phrase, action, category if cat is None or cat == "" else cat))
            except LexiconError as err:
                raise LexiconError(f"{p}, line {line}: {err}") from None
        if not entries:  # a lexicon file that bans nothing is a wrong file far more often than an intent
            raise LexiconError(
                f"{p}: holds no entries (only blank lines{', comments' if suffix == '.txt' else ''} or a header); "
                "give a lexicon with at least one entry, or lexicon=None for none"
            )
        return cls(entries, space_variants=space_variants, case_variants=case_variants)

    @classmethod
    def default(cls) -> Lexicon:
        """The lexicon shipped with fastdebias (``fastdebias/data/default_lexicon.jsonl``), loaded once."""
        key = str(DEFAULT_LEXICON_PATH)
        lex = _default_cache.get(key)
        if lex is None:
            if not DEFAULT_LEXICON_PATH.is_file():
                raise LexiconError(
                    f"{DEFAULT_LEXICON_PATH}: the default lexicon is missing from this install; reinstall "
                    "fastdebias, or pass your own with Lexicon.load(path)"
                )
            lex = _default_cache[key] = cls.load(DEFAULT_LEXICON_PATH)
        return lex

    @classmethod
    def resolve(cls, spec: Lexicon | str | os.PathLike | None) -> Lexicon | None:
        """A ``Lexicon`` from what users pass: a Lexicon, ``"default"``, ``None`` / ``"none"``, or a file path."""
        if spec is None or isinstance(spec, Lexicon):
            return spec
        if isinstance(spec, str) and spec.lower() == "none":
            return None
        if isinstance(spec, str) and spec.lower() == "default":
            return cls.default()
        if isinstance(spec, (str, os.PathLike)):
            p = Path(spec)
            if not p.suffix and not p.exists():  # a misspelt keyword more likely than a file without an extension
                raise LexiconError(
                    f"lexicon={spec!r}: not 'default' or 'none', and no such file; give 'default', 'none' (or None), "
                    "a Lexicon, or the path of a .jsonl, .csv or .txt lexicon file"
                )
            return cls.load(spec)
        raise LexiconError(f"lexicon={spec!r}: give a Lexicon, a file path, 'default' or None")

    def with_variants(self, *, space: bool | None = None, case: bool | None = None) -> Lexicon:
        """The same entries with other variant settings (``None`` keeps the current one)."""
        return Lexicon(
            self._entries,
            space_variants=self.space_variants if space is None else space,
            case_variants=self.case_variants if case is None else case,
        )

    # -- container -------------------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __add__(self, other: Lexicon) -> Lexicon:
        if not isinstance(other, Lexicon):
            return NotImplemented
        if (self.space_variants, self.case_variants) != (other.space_variants, other.case_variants):
            raise LexiconError(
                "cannot join lexicons with different variant settings "
                f"(space_variants={self.space_variants}/{other.space_variants}, "
                f"case_variants={self.case_variants}/{other.case_variants}): call .with_variants(...) on one first"
            )
        return Lexicon(
            self._entries + other._entries, space_variants=self.space_variants, case_variants=self.case_variants
        )

    def __repr__(self) -> str:
        return f"Lexicon({len(self)} entries, space_variants={self.space_variants}, case_variants={self.case_variants})"

    # -- compilation ------------------------------------------------------------------------------------

    def token_sequences(
        self, tokenizer: Any = None, *, vocab_size: int | None = None
    ) -> list[tuple[tuple[int, ...], float, int]]:
        """Every entry as token ids: ``(ids, bias, entry_index)`` in entry order, variants de-duplicated.

        Parameters
        ----------
        tokenizer : a transformers tokenizer; needed when any phrase is text.
        vocab_size : ids must be below it (default ``len(tokenizer)``).

        Raises
        ------
        LexiconError
            naming the entries whose every variant tokenizes to nothing, to special tokens or to ids outside
            the vocabulary, or whose token ids lie outside it.
        """
        v = _vocab_size(tokenizer, vocab_size)
        texts = [i for i, e in enumerate(self._entries) if isinstance(e.phrase, str)]
        if texts and tokenizer is None:
            raise LexiconError(
                f"entry {self._entries[texts[0]].phrase!r} is text: compiling text phrases needs the model's "
                "tokenizer (Lexicon.compile(tokenizer, ...))"
            )
        variants = {
            i: phrase_variants(self._entries[i].phrase, space=self.space_variants, case=self.case_variants)
            for i in texts
        }
        flat = [s for i in texts for s in variants[i]]
        encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        # a phrase that normalises away would leave only its leading space: never ban the space token
        space = tuple(tokenizer(" ", add_special_tokens=False)["input_ids"]) if flat else ()
        out: list[tuple[tuple[int, ...], float, int]] = []
        problems: list[str] = []
        for i, e in enumerate(self._entries):
            if not isinstance(e.phrase, str):
                bad = [t for t in e.phrase if t >= v]
                if bad:
                    problems.append(f"{e.phrase} ({e.category}): token ids {bad} are outside the vocabulary of {v}")
                else:
                    out.append((e.phrase, e.bias, i))
                continue
            seen: dict[tuple[int, ...], None] = {}
            reasons = []
            for text, ids in zip(variants[i], (next(encoded) for _ in variants[i])):
                ids = tuple(ids)
                why = _unusable(ids, special, v) or ("tokenizes to a bare space" if ids == space else "")
                if why:
                    reasons.append(f"{text!r} → {list(ids)} ({why})")
                else:
                    seen.setdefault(ids)
            if not seen:
                problems.append(f"{e.phrase!r} ({e.category}): " + "; ".join(reasons))
            out += [(ids, e.bias, i) for ids in seen]
        if problems:
            shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise LexiconError(
                f"{len(problems)} lexicon entr{'y' if len(problems) == 1 else 'ies'} cannot be used with this "
                f"tokenizer (vocabulary of {v}):\n  {shown}\nfix their spelling or remove them from the lexicon"
            )
        return out

    def compile(
        self,
        tokenizer: Any = None,
        *,
        vocab_size: int | None = None,
        eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> PhraseMatcher:
        """The lexicon as a ``PhraseMatcher`` for one tokenizer and vocabulary, cached per tokenizer.

        Parameters
        ----------
        tokenizer : a transformers tokenizer; needed when any phrase is text.
        vocab_size : the number of columns of the scores to bias (default ``len(tokenizer)``; the model's
            ``config.vocab_size`` when its embedding is padded beyond the tokenizer).
        eos_token_id : EOS id(s) whose single-token bans are dropped, as ``generate(bad_words_ids=...)`` does;
            default the tokenizer's ``eos_token_id``; ``()`` keeps them.
        device : where the matcher's tensors live (default CPU).

        Returns
        -------
        PhraseMatcher, the same object on every call with the same arguments.
        """
        v = _vocab_size(tokenizer, vocab_size)
        what = "eos_token_id"
        if eos_token_id is None:
            eos_token_id, what = getattr(tokenizer, "eos_token_id", None), "eos_token_id (the tokenizer's)"
        eos = () if eos_token_id is None else tuple(token_id_list(eos_token_id, v, what, LexiconError))
        dev = torch.device("cpu") if device is None else resolve_device(device)
        if tokenizer is None:
            cache = self._cache_no_tokenizer
        else:
            try:
                cache = self._cache.setdefault(tokenizer, {})
            except TypeError:  # tokenizer neither hashable nor weak-referenceable: compile every time
                cache = {}
        key = (v, eos, str(dev))
        matcher = cache.get(key)
        if matcher is None:
            cpu_key = (v, eos, "cpu")
            cpu = cache.get(cpu_key)
            if cpu is None:
                cpu = cache[cpu_key] = self._build(tokenizer, v, eos)
            matcher = cache[key] = cpu if dev.type == "cpu" else cpu.to(dev)
        return matcher

    def _build(self, tokenizer: Any, vocab_size: int, eos: tuple[int, ...]) -> PhraseMatcher:
        sequences = self.token_sequences(tokenizer, vocab_size=vocab_size)
        phrases = []
        for e in self._entries:
            if isinstance(e.phrase, str):
                phrases.append(e.phrase)
            elif tokenizer is not None:
                phrases.append(tokenizer.decode(list(e.phrase)))
            else:
                phrases.append(str(list(e.phrase)))
        return build_matcher(
            sequences,
            vocab_size,
            eos_token_ids=eos,
            entry_phrases=phrases,
            entry_categories=[e.category for e in self._entries],
            entry_actions=[e.action for e in self._entries],
        )


def interventions_from_log(
    matcher: PhraseMatcher,
    steps: torch.Tensor,
    entries: torch.Tensor,
    actions: torch.Tensor,
    tokens: torch.Tensor,
) -> list[Intervention]:
    """Decode one sequence's on-device interventions log (read once, at the end of decoding).

    Parameters
    ----------
    matcher : the matcher whose ``lookup`` produced the entry indices.
    steps : [N] int decode steps.
    entries : [N] int entry indices (``lookup``'s ``entry``); records with -1 are skipped.
    actions : [N] int codes into ``ACTIONS`` (0 penalised, 1 banned, 2 rewound).
    tokens : [N] int token ids affected.

    Returns
    -------
    list of ``Intervention`` in log order.
    """
    out = []
    for step, entry, action, token in zip(steps.tolist(), entries.tolist(), actions.tolist(), tokens.tolist()):
        if entry < 0:
            continue
        out.append(
            Intervention(
                step=step,
                phrase=matcher.entry_phrases[entry],
                category=matcher.entry_categories[entry],
                action=ACTIONS[action],
                token_id=token,
            )
        )
    return out


def _vocab_size(tokenizer: Any, vocab_size: int | None) -> int:
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise LexiconError(f"vocab_size={vocab_size!r} must be a positive int (the number of logit columns)")
        return vocab_size
    if tokenizer is None:
        raise LexiconError("compiling a lexicon without a tokenizer needs vocab_size= (the number of logit columns)")
    return len(tokenizer)


def _unusable(ids: tuple[int, ...], special: set[int], vocab_size: int) -> str:
    """Why a variant's ids cannot be matched ('' if they can)."""
    if not ids:
        return "tokenizes to nothing"
    if any(t in special for t in ids):
        return f"contains special tokens {sorted({t for t in ids if t in special})}"
    if any(t >= vocab_size for t in ids):
        return f"ids {sorted({t for t in ids if t >= vocab_size})} are outside the vocabulary"
    return ""


_FIELDS = ("phrase", "action", "category")
# names people give the action column: the bias, under another name
_ACTION_ALIASES = ("bias", "penalty", "weight", "score", "value", "logit_bias", "ban")


def _check_fields(path: Path, where: str, names: Iterable[str], kind: str) -> None:
    """A lexicon file's keys (JSONL) or header columns (CSV) are ``_FIELDS``, or start with ``_`` (ignored)."""
    for name in names:
        if name in _FIELDS or (isinstance(name, str) and name.startswith("_")):
            continue
        close = difflib.get_close_matches(str(name).lower(), _FIELDS, n=1, cutoff=0.7)
        hint = (f"; did you mean {close[0]!r}?" if close else
                "; put the bias in 'action': a number, or \"ban\"" if str(name).lower() in _ACTION_ALIASES else "")
        raise LexiconError(
            f"{path}, {where}: unknown {kind} {name!r} (an entry has the {kind}s 'phrase', 'action' and 'category'; "
            f"{kind}s whose name starts with '_' are ignored){hint}"
        )


def _read_jsonl(path: Path, text: str) -> Iterable[tuple[int, Any, Any, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LexiconError(
                f"{path}, line {n}: not valid JSON ({err.msg}); write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise LexiconError(f'{path}, line {n}: expected a JSON object {{"phrase": ...}}, got {line.strip()!r}')
        if "phrase" not in row:
            raise LexiconError(f'{path}, line {n}: no "phrase" field; every line needs one')
        _check_fields(path, f"line {n}", row, "field")
        phrase = row["phrase"]
        if not isinstance(phrase, str):
            raise LexiconError(f'{path}, line {n}: "phrase" must be a string, got {phrase!r}')
        yield n, phrase, row.get("action", "ban"), row.get("category")


def _read_csv(path: Path, text: str) -> Iterable[tuple[int, Any, Any, Any]]:
    # strict: an unclosed quote is an error, not the rest of the file read as one phrase
    reader = csv.DictReader(text.splitlines(), strict=True)
    try:
        yield from _csv_rows(path, reader)
    except csv.Error as err:  # reader.line_num: the last row read whole; the bad one starts after it
        raise LexiconError(
            f"{path}, line {reader.line_num + 1}: not valid CSV ({err}); check the quotes from this line on"
        ) from None


def _csv_rows(path: Path, reader: csv.DictReader) -> Iterable[tuple[int, Any, Any, Any]]:
    if not reader.fieldnames:
        raise LexiconError(
            f"{path}: the file is empty; a CSV lexicon starts with a header line naming its columns, e.g. "
            "phrase,action,category, then one entry per line"
        )
    fields = [f.strip().lower() for f in reader.fieldnames]
    dup = sorted({f for f in fields if f and fields.count(f) > 1})
    if dup:  # DictReader would keep the last column of each name and silently drop the others
        raise LexiconError(
            f"{path}, line 1: the header {reader.fieldnames} names the column {dup[0]!r} twice; give each column "
            "once (phrase,action,category)"
        )
    if "phrase" not in fields:
        raise LexiconError(
            f"{path}, line 1: the header {reader.fieldnames} has no 'phrase' column; the first line must name "
            "the columns, e.g. phrase,action,category"
        )
    _check_fields(path, "line 1", fields, "column")
    reader.fieldnames = fields
    for row in reader:
        n = reader.line_num
        if None in row:
            raise LexiconError(f"{path}, line {n}: more cells than header columns; quote cells that hold commas")
        if all(not (v or "").strip() for v in row.values()):
            continue
        action = row.get("action")
        yield n, row["phrase"] or "", action if action and action.strip() else "ban", row.get("category")


def _read_txt(path: Path, text: str) -> Iterable[tuple[int, Any, Any, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        phrase = line.strip()
        if phrase and not phrase.startswith("#"):
            yield n, phrase, "ban", None
