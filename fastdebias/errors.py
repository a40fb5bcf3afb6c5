"""One error hierarchy. Every message names the file, field or argument at fault and says what to do."""

from __future__ import annotations


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
