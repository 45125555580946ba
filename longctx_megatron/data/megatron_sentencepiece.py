"""Megatron's GPT-style SentencePiece wrappers: ``GPTSentencePieceTokenizer`` and ``Llama2Tokenizer``.

As megatron-core 0.16.1 builds them (``megatron.core.tokenizers.text.libraries.SentencePieceTokenizer``
with its defaults, ``legacy=False``, which Megatron-LM's current ``tools/preprocess_data.py`` uses for
both names): ``encode`` is the model's plain ``encode`` (no BOS, no EOS, no special-token parsing),
``vocab_size`` is the model's piece count, ``eod`` is the model's EOS id, and ``bos``/``eos``/``pad`` are
the model's ids (None where the model has none; Megatron reports -1).

Megatron-LM's removed legacy ``_Llama2Tokenizer`` (``megatron/training/tokenizer``, before February
2026) prepended BOS in ``tokenize``; megatron-core 0.16.1 does not, and neither do we. A model without
EOS is refused: Megatron's ``eod`` would be -1, which no dataset can hold.

These differ from our ``SentencePieceTokenizer`` only where that one goes its own way for models
without EOS (it then adds an end-of-document id).
"""

from __future__ import annotations

import os

from longctx_megatron.data.tokenizers import SentencePieceTokenizer


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Megatron's ``GPTSentencePieceTokenizer``: eod = the model's EOS, vocab_size = its piece count."""

    def __init__(self, model_path: str | os.PathLike):
        super().__init__(model_path)
        if self.eos is None:
            raise ValueError(f"--tokenizer-type {type(self).__name__}: SentencePiece model {self.model_path!r} has "
                             "no EOS piece, so it has no end-of-document id (Megatron's would be -1); use "
                             "--tokenizer-type SentencePieceTokenizer, which adds one")
        self._extra_eod = False
        self._eod = self.eos

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's ``Llama2Tokenizer`` as megatron-core 0.16.1 builds it: the same as
    ``GPTSentencePieceTokenizer`` (no BOS prepended; see the module doc)."""
