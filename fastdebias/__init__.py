"""fastdebias: fast bias-mitigating decoding for Llama-family models with unmerged LoRA adapters.

    model = fastdebias.load()                      # embedded SmolLM2-135M-Instruct
    outs = fastdebias.debias(model, ["Old people can't learn new technology."])
"""

from fastdebias.errors import (
    AdapterError,
    BackendError,
    CheckpointError,
    EmbeddedModelError,
    FastDebiasError,
    GenerationError,
    LexiconError,
    TokenizerError,
)
from fastdebias.generate import FIRST_ADAPTER, GenerationResult, ScoreResult, debias, generate, score
from fastdebias.lexicon import Intervention, Lexicon
from fastdebias.pipeline import FastDebiasModel, load

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BackendError",
    "CheckpointError",
    "EmbeddedModelError",
    "FIRST_ADAPTER",
    "FastDebiasError",
    "FastDebiasModel",
    "GenerationError",
    "GenerationResult",
    "Intervention",
    "LexiconError",
    "Lexicon",
    "ScoreResult",
    "TokenizerError",
    "debias",
    "generate",
    "load",
    "score",
]
