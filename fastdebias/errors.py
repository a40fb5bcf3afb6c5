"""One error hierarchy. Every message names the file, field or argument at fault and says what to do."""

from __future__ import annotations

import numbers
from typing import Any


class FastDebiasError(Exception):
    """Base class of every error fastdebias raises on bad input."""


class CheckpointError(FastDebiasError):
    """A base-model directory, config or weight file is missing, unsupported or corrupt."""


class AdapterError(FastDebiasError):
    """A PEFT adapter directory is missing, unsupported, or does not fit the base model."""


class TokenizerError(FastDebiasError):
    """The tokenizer is missing or cannot handle the request."""


class GenerationError(FastDebiasError, ValueError):
    """An argument to generate/debias is out of range or malformed."""


class BackendError(FastDebiasError):
    """The requested compute backend is not available on this machine."""


class EmbeddedModelError(FastDebiasError):
    """The embedded default model (SmolLM2-135M-Instruct) cannot be found or converted."""


class LexiconError(FastDebiasError, ValueError):
    """A lexicon file, row or entry is malformed, or an entry cannot be tokenized for the model."""


# ------------------------------------------------------------------------- checks shared by several entry points


def check_unicode(text: str, where: str, error: type[FastDebiasError]) -> None:
    """Refuse lone surrogates: what bytes that are not UTF-8 become when decoded with ``errors="surrogateescape"``
    (as Python decodes stdin, argv and file names under some locales). Tokenizers cannot encode them and would
    fail much later, naming nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(
            f"{where} holds a character that is not valid Unicode text at position {e.start} ({text[e.start]!r}, "
            "from bytes that are not UTF-8): decode the input as UTF-8"
        ) from None


def token_id_list(value: Any, vocab_size: int, what: str, error: type[FastDebiasError]) -> list[int]:
    """An int token id, a sequence of them, or an integer tensor or numpy array → a list of ints in
    ``[0, vocab_size)``. Strings, floats and bools are refused rather than converted (``int("21")`` would read a
    typo as an id)."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):  # (a numpy integer scalar is already an Integral)
        if value.dtype.kind not in "iu":
            raise error(f"{what}: a numpy array of dtype {value.dtype}; give integer token ids")
        value = value.reshape(-1).tolist()
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise error(f"{what}: a {value.dtype} tensor; give integer token ids")
        value = value.reshape(-1).tolist()

    def is_id(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    items = [value] if is_id(value) else value
    if not isinstance(items, (list, tuple)) or not all(is_id(i) for i in items):
        raise error(f"{what}: expected an int token id or a list of them, got {value!r}")
    bad = [int(i) for i in items if not 0 <= i < vocab_size]
    if bad:
        raise error(f"{what} {bad} is outside the vocabulary [0, {vocab_size})")
    return [int(i) for i in items]
