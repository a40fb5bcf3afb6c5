"""transformers integration: the lexicon as a ``LogitsProcessor`` for users who stay on ``model.generate``.

    from fastdebias.hf import BiasLogitsProcessor
    out = model.generate(**inputs, logits_processor=[BiasLogitsProcessor(lexicon, tokenizer)])

The scores are exactly those of ``generate(sequence_bias=<penalties>, bad_words_ids=<bans>)`` (transformers'
``SequenceBiasLogitsProcessor`` then ``NoBadWordsLogitsProcessor``), computed by the compiled matcher in a
number of tensor ops that does not grow with the lexicon.

Parity is with transformers 5.23 (the pinned version), whose processor groups entries by prefix length. Older 5.x
releases (5.17 was checked) loop over entries instead: they skip an entry whose *whole* length exceeds the
context (5.23: whose prefix does) and add overlapping biases in dict order, so they differ from 5.23, and from
this processor, when the context is exactly an entry's prefix, and in the last bit of overlapping penalties.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from fastdebias.lexicon import Lexicon
from fastdebias.matcher import PhraseMatcher


class BiasLogitsProcessor(LogitsProcessor):
    """Apply a lexicon's biases and bans to next-token scores with transformers' semantics.

    Parameters
    ----------
    lexicon : a ``Lexicon``, a lexicon file path, or ``"default"``.
    tokenizer : the model's tokenizer; needed when the lexicon holds text phrases.
    eos_token_id : EOS id(s) whose single-token bans are dropped, as ``generate`` does for ``bad_words_ids``
        (it passes the generation config's EOS ids); default the tokenizer's EOS id; ``()`` keeps them.

    Notes
    -----
    The lexicon is compiled on the first call, for the scores' vocabulary size and device, and cached. Each
    call re-reads the last ``max_depth`` tokens of ``input_ids`` (the longest entry minus one), so rows may be
    reordered between calls (beam search) and the processor may be reused across ``generate`` calls. Like
    transformers, padding tokens in ``input_ids`` count as tokens.
    """

    def __init__(
        self,
        lexicon: Lexicon | str | os.PathLike,
        tokenizer: Any = None,
        *,
        eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        resolved = Lexicon.resolve(lexicon)
        self.lexicon = resolved if resolved is not None else Lexicon()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    def matcher(self, vocab_size: int, device: torch.device | str = "cpu") -> PhraseMatcher:
        """The compiled matcher used for scores of ``vocab_size`` columns on ``device``."""
        return self.lexicon.compile(
            self.tokenizer, vocab_size=vocab_size, eos_token_id=self.eos_token_id, device=device
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """
        Parameters
        ----------
        input_ids : [B, T] token ids so far (prompt included).
        scores : [B, V] next-token scores.

        Returns
        -------
        [B, V] biased scores, same dtype; ``-inf`` where a ban fires.
        """
        m = self.matcher(scores.shape[-1], scores.device)
        return m.apply(scores, m.init_states(input_ids))
