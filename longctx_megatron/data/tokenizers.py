"""Tokenizers behind Megatron-LM's ``--tokenizer-type`` names.

Every tokenizer has ``vocab_size``, ``eod`` (the end-of-document id that preprocessing appends after each
document), ``bos``/``eos``/``pad`` (an id, or None where the tokenizer has none), ``encode``/``decode``
and ``checksum()``, a sha256 hex digest that identifies the vocabulary (checkpoints store it so that a run
cannot silently resume with a different tokenizer).

``encode`` returns the ids of the text alone: no BOS/EOS is added (the data pipeline appends ``eod``).

End-of-document ids (compare ``megatron/training/tokenizer/tokenizer.py`` in NVIDIA/Megatron-LM):

- ``ByteTokenizer``: 256, after the 256 byte values; vocab_size 257.
- ``NullTokenizer(V)``: as Megatron's ``_NullTokenizer``: ids 0..V-1 are ordinary tokens and ``eod`` is V,
  so ``vocab_size`` is V + 1 (``eod == vocab_size - 1``); ``eos`` is ``eod``.
- ``SentencePieceTokenizer``: the model's EOS (``</s>``) when it has one, as Megatron's GPT-style wrappers
  (``_GPTSentencePieceTokenizer``, ``_Llama2Tokenizer``: ``eod = eos_id``). Otherwise a piece named
  ``<EOD>`` if the model has one, else an extra id appended after the model's pieces (``vocab_size`` is
  then the piece count + 1), the way Megatron's legacy ``_SentencePieceTokenizer`` adds ``<EOD>`` when the
  model lacks it. ``encode`` never produces that extra id and ``decode`` drops it.
- ``HuggingFaceTokenizer``: ``eos_token_id`` (Megatron's ``_HuggingFaceTokenizer``); a tokenizer without
  an EOS token is refused, since preprocessing needs an end-of-document id.

Megatron's other GPT tokenizers live in their own modules (imported by ``build_tokenizer`` on use):
``GPT2BPETokenizer`` (data/gpt2_bpe_tokenizer.py), ``GPTSentencePieceTokenizer`` and ``Llama2Tokenizer``
(data/megatron_sentencepiece.py), ``TikTokenizer`` (data/tiktoken_tokenizer.py, optional ``tiktoken``).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod

from longctx_megatron.config.vocab import padded_vocab_size

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer", "NullTokenizer",
                   "GPT2BPETokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer(ABC):
    """The interface every tokenizer implements (``vocab_size`` and ``eod`` may be class attributes)."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: every id the tokenizer can produce, ``eod`` included, is below it."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended after each document by preprocessing."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS added)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""

    @abstractmethod
    def checksum(self) -> str:
        """sha256 hex digest identifying the tokenizer (stable across processes and machines)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255, end-of-document as 256."""

    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def checksum(self) -> str:
        return _sha256(f"ByteTokenizer:{self.vocab_size}".encode())


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: the text is already ids, whitespace-separated integers ("3 17 5").

    ``NullTokenizer(V)`` takes ids 0..V-1 and adds ``eod`` = V, so its ``vocab_size`` is V + 1.
    """

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"NullTokenizer needs a positive integer vocab size (--vocab-size), got {vocab_size!r}")
        self._size_without_eod = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._size_without_eod

    @property
    def eos(self) -> int:
        return self._size_without_eod

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                token = int(word)
            except ValueError:
                raise ValueError(f"NullTokenizer: {word!r} is not an integer token id") from None
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"NullTokenizer: token id {token} is outside [0, {self.vocab_size})")
            ids.append(token)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def checksum(self) -> str:
        return _sha256(f"NullTokenizer:{self.vocab_size}".encode())


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (``tools/train_tokenizer.py`` trains one); see the module doc for ``eod``."""

    EOD_PIECE = "<EOD>"

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece

        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"SentencePiece model {self.model_path!r} does not exist (--tokenizer-model)")
        try:
            with open(self.model_path, "rb") as f:
                self._model_bytes = f.read()
        except OSError as e:
            raise OSError(f"cannot read SentencePiece model {self.model_path!r}: {e}") from e
        try:
            # Load the bytes that were read, so that checksum() describes exactly the model in use.
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_path!r} is not a valid SentencePiece model: {e}") from e
        self._pieces = self._sp.get_piece_size()
        self.bos = self._special(self._sp.bos_id())
        self.eos = self._special(self._sp.eos_id())
        self.pad = self._special(self._sp.pad_id())
        self._extra_eod = False
        if self.eos is not None:
            self._eod = self.eos
        elif self._has_piece(self.EOD_PIECE):
            self._eod = self._sp.piece_to_id(self.EOD_PIECE)
        else:
            self._eod = self._pieces
            self._extra_eod = True

    def _special(self, token_id: int) -> int | None:
        return token_id if 0 <= token_id < self._pieces else None

    def _has_piece(self, piece: str) -> bool:
        token_id = self._sp.piece_to_id(piece)
        return 0 <= token_id < self._pieces and self._sp.id_to_piece(token_id) == piece

    @property
    def vocab_size(self) -> int:
        return self._pieces + int(self._extra_eod)

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self._extra_eod:
            ids = [i for i in ids if i != self._eod]
        bad = [i for i in ids if not 0 <= i < self._pieces]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the SentencePiece vocabulary [0, {self._pieces})")
        return self._sp.decode(ids)

    def checksum(self) -> str:
        return _sha256(self._model_bytes)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class HuggingFaceTokenizer(Tokenizer):
    """``transformers.AutoTokenizer`` from a local directory or the local cache (never downloads)."""

    def __init__(self, name_or_path: str | os.PathLike):
        try:
            import transformers
        except ImportError as e:
            raise ImportError(
                "--tokenizer-type HuggingFaceTokenizer needs the transformers package (pip install transformers)"
            ) from e
        self.name_or_path = os.fspath(name_or_path)
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise OSError(
                f"cannot load HuggingFace tokenizer {self.name_or_path!r} from local files (local_files_only=True: "
                f"a directory written by save_pretrained, or a name already in the HF cache): {e}"
            ) from e
        self._size = len(self._tok)  # added tokens included, as Megatron
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"HuggingFace tokenizer {self.name_or_path!r} has no eos_token: the end-of-document id needs one "
                "(set eos_token and save the tokenizer again)"
            )
        self.bos = self._tok.bos_token_id
        self.eos = self._tok.eos_token_id
        self.pad = self._tok.pad_token_id

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def checksum(self) -> str:
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:  # the tokenizer.json content, key order and whitespace normalised
            content = json.loads(backend.to_str())
        else:  # a slow tokenizer: its vocabulary
            content = sorted(self._tok.get_vocab().items(), key=lambda item: item[1])
        special = {"bos": self.bos, "eos": self.eos, "pad": self.pad, "vocab_size": self.vocab_size}
        blob = json.dumps({"tokenizer": content, "special": special}, sort_keys=True, separators=(",", ":"))
        return _sha256(blob.encode("utf-8"))

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None, *,
    vocab_file: str | None = None, merge_file: str | None = None, tiktoken_pattern: str | None = None,
    tiktoken_num_special_tokens: int | None = None, tiktoken_special_tokens: list[str] | None = None,
) -> Tokenizer:
    """The tokenizer of ``--tokenizer-type`` with the flags it needs: ``--tokenizer-model`` (SentencePiece,
    HuggingFace, GPTSentencePiece, Llama2, TikToken), ``--vocab-size`` (NullTokenizer; TikTokenizer's
    size, default 2**17), ``--vocab-file`` and ``--merge-file`` (GPT2BPETokenizer), the ``--tiktoken-*``
    options (TikTokenizer)."""
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size (number of ids before eod)")
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        if not vocab_file or not merge_file:
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file "
                             "(gpt2-vocab.json and gpt2-merges.txt)")
        from longctx_megatron.data.gpt2_bpe_tokenizer import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in TOKENIZER_TYPES and not tokenizer_model:
        what = {"HuggingFaceTokenizer": "a directory written by save_pretrained, or a cached model name",
                "TikTokenizer": "a tiktoken .json vocabulary"}.get(tokenizer_type, "a SentencePiece .model file")
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model ({what})")
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        from longctx_megatron.data import megatron_sentencepiece

        return getattr(megatron_sentencepiece, tokenizer_type)(tokenizer_model)
    if tokenizer_type == "TikTokenizer":
        from longctx_megatron.data.tiktoken_tokenizer import TikTokenizer

        return TikTokenizer(tokenizer_model, pattern=tiktoken_pattern, vocab_size=vocab_size,
                            num_special_tokens=tiktoken_num_special_tokens, special_tokens=tiktoken_special_tokens)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; known types: {', '.join(TOKENIZER_TYPES)}")


TOKENIZER_FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_size", "vocab_file", "merge_file", "tiktoken_pattern",
                   "tiktoken_num_special_tokens", "tiktoken_special_tokens")


def tokenizer_arguments(flags) -> dict:
    """``build_tokenizer``'s arguments from anything holding the tokenizer flags under their names (an
    argparse Namespace, the run config's data section)."""
    return {name: getattr(flags, name, None) for name in TOKENIZER_FLAGS}


def check_vocab_matches(model_vocab_size: int, tokenizer: Tokenizer) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer has ids (a larger one is padding)."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocab_size ({model_vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids, {tokenizer!r}): ids {model_vocab_size}..{tokenizer.vocab_size - 1} "
            f"would be out of range. Set the model's vocab_size to at least {tokenizer.vocab_size} "
            f"(e.g. {padded_vocab_size(tokenizer.vocab_size)}, a multiple of 128), or use a tokenizer "
            "with a smaller vocabulary"
        )
