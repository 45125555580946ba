"""GPT-2's byte-level BPE from ``--vocab-file`` (gpt2-vocab.json) and ``--merge-file`` (gpt2-merges.txt).

The ids are those of Megatron-LM's ``_GPT2BPETokenizer`` (its copy of OpenAI's encoder,
``megatron/training/tokenizer/gpt2_tokenization.py``, built with ``special_tokens=[]``):

- text is split by GPT-2's regex, each piece's UTF-8 bytes are mapped to GPT-2's printable byte
  alphabet and merged by the merge ranks; the work is done by Hugging Face ``tokenizers`` (a BPE
  model under a ByteLevel pre-tokenizer, whose regex is GPT-2's), not by a BPE written here;
- ``<|endoftext|>`` written in a document is ordinary text (split into pieces like any text), never the
  end-of-document id: Megatron registers no special tokens;
- ``eod`` is the vocabulary's id of ``<|endoftext|>``; ``vocab_size`` is the number of entries of
  the vocabulary file (Megatron's ``len(encoder)``);
- the merges file is read as Megatron and OpenAI read it: its first line (``#version: ...``) and the
  text after its last newline are not merges.

Both files are untrusted: a vocabulary must map distinct strings to exactly the ids 0..N-1, hold the
256 byte symbols and ``<|endoftext|>``; every merge must be two symbols whose parts and result are in
the vocabulary. Anything else is refused with the file's path.
"""

from __future__ import annotations

import json
import os

from longctx_megatron.data.tokenizers import Tokenizer, _sha256

EOD_TOKEN = "<|endoftext|>"


def _read(path: str, flag: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise OSError(f"cannot read {flag} {path!r}: {error}") from error


def _parse_vocab(path: str, data: bytes) -> dict[str, int]:
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"--vocab-file {path!r} is not a JSON vocabulary: {error}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"--vocab-file {path!r} must hold a non-empty JSON object {{token: id}}")
    ids = list(vocab.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"--vocab-file {path!r}: every id must be an integer")
    if sorted(ids) != list(range(len(ids))):
        raise ValueError(f"--vocab-file {path!r}: the ids must be exactly 0..{len(ids) - 1}, each once "
                         "(vocab_size is the number of entries, as Megatron's len(encoder))")
    return vocab


def _parse_merges(path: str, data: bytes, vocab: dict[str, int]) -> list[tuple[str, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--merge-file {path!r} is not UTF-8: {error}") from None
    merges, seen = [], set()
    for number, line in enumerate(text.split("\n")[1:-1], start=2):  # as Megatron/OpenAI: [1:-1]
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"--merge-file {path!r} line {number}: expected two symbols, got {line!r}")
        pair = (parts[0], parts[1])
        for symbol in (*pair, pair[0] + pair[1]):
            if symbol not in vocab:
                raise ValueError(f"--merge-file {path!r} line {number}: {symbol!r} is not in the vocabulary")
        if pair in seen:
            raise ValueError(f"--merge-file {path!r} line {number}: the merge {line!r} is repeated")
        seen.add(pair)
        merges.append(pair)
    return merges


class GPT2BPETokenizer(Tokenizer):
    """Megatron's ``GPT2BPETokenizer`` (see the module doc); ``encode`` adds no BOS/EOS."""

    def __init__(self, vocab_file: str | os.PathLike, merge_file: str | os.PathLike):
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self.vocab_file, self.merge_file = os.fspath(vocab_file), os.fspath(merge_file)
        vocab_bytes = _read(self.vocab_file, "--vocab-file")
        merges_bytes = _read(self.merge_file, "--merge-file")
        vocab = _parse_vocab(self.vocab_file, vocab_bytes)
        missing = [s for s in pre_tokenizers.ByteLevel.alphabet() if s not in vocab]
        if missing:
            raise ValueError(f"--vocab-file {self.vocab_file!r} lacks {len(missing)} of GPT-2's 256 byte symbols "
                             f"(e.g. {missing[0]!r}): text holding those bytes could not be encoded")
        if EOD_TOKEN not in vocab:
            raise ValueError(f"--vocab-file {self.vocab_file!r} has no {EOD_TOKEN!r}, the end-of-document token")
        merges = _parse_merges(self.merge_file, merges_bytes, vocab)
        try:
            model = models.BPE(vocab=vocab, merges=merges)
        except Exception as error:  # the library's own checks (it raises a plain Exception)
            raise ValueError(f"--vocab-file {self.vocab_file!r} / --merge-file {self.merge_file!r}: {error}") from None
        self._tok = RustTokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tok.decoder = decoders.ByteLevel()
        self._size = len(vocab)
        self._eod = vocab[EOD_TOKEN]
        self._digest = _sha256(b"GPT2BPETokenizer\0" + _sha256(vocab_bytes).encode() + _sha256(merges_bytes).encode())

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the GPT-2 vocabulary [0, {self._size})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def checksum(self) -> str:
        return self._digest

    def __repr__(self) -> str:
        return f"GPT2BPETokenizer({self.vocab_file!r}, {self.merge_file!r}, vocab_size={self._size}, eod={self._eod})"
