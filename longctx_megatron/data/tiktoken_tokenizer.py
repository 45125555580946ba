"""Megatron's ``TikTokenizer``: a tiktoken BPE from a JSON list of ranked byte strings.

    --tokenizer-type TikTokenizer --tokenizer-model vocab.json [--tiktoken-pattern v1|v2]
    [--tiktoken-num-special-tokens 1000] [--vocab-size 131072] [--tiktoken-special-tokens ...]

As megatron-core 0.16.1's ``TikTokenTokenizer`` (the class Megatron-LM's ``--tokenizer-type
TikTokenizer`` builds): ids 0..num_special_tokens-1 are special tokens (the given ones, default
``<unk> <s> </s> <mask> <pad> <cls> <sep>``, which must all be among them, then ``<SPECIAL_i>``
fillers); the file's first ``vocab_size - num_special_tokens`` entries follow, shifted by
num_special_tokens. ``vocab_size`` is ``--vocab-size`` (default 2**17) and the file must hold at least
that many entries after the specials; ``eod`` = ``eos`` = the id of ``</s>``, ``bos`` of ``<s>``, ``pad``
of ``<pad>``. ``encode`` is tiktoken's ``encode(text, allowed_special="all")``, as Megatron's: a special
token written in the text becomes its id. The pattern ``v2`` is the default, as in megatron-core.

Needs the optional ``tiktoken`` package (``pip install tiktoken``). The file is untrusted: every entry
must be ``{"rank": i, "token_bytes": base64, "token_str": ...}`` with rank i at position i, the first 256
being the single bytes 0..255, and no byte string twice; otherwise it is refused with its path.
"""

from __future__ import annotations

import base64
import binascii
import json
import os

from longctx_megatron.data.tokenizers import Tokenizer, _sha256

PATTERNS = {
    # tiktoken's regex syntax; the two patterns Megatron names v1 and v2.
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
REQUIRED_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
DEFAULT_VOCAB_SIZE = 2**17
DEFAULT_NUM_SPECIAL_TOKENS = 1000


def _load_ranks(path: str, data: bytes, count: int, shift: int) -> dict[bytes, int]:
    """The first ``count`` entries of the JSON list as {token bytes: rank + shift}."""
    try:
        entries = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"--tokenizer-model {path!r} is not a JSON tiktoken vocabulary: {error}") from None
    if not isinstance(entries, list):
        raise ValueError(f"--tokenizer-model {path!r} must hold a JSON list of {{rank, token_bytes, token_str}}")
    if len(entries) < count:
        raise ValueError(f"--tokenizer-model {path!r} holds {len(entries)} tokens; --vocab-size minus "
                         f"--tiktoken-num-special-tokens needs {count}")
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(entries[:count]):
        if not isinstance(entry, dict) or set(entry) != {"rank", "token_bytes", "token_str"} or entry["rank"] != i \
                or not isinstance(entry["token_bytes"], str):
            raise ValueError(f"--tokenizer-model {path!r} entry {i}: expected {{'rank': {i}, 'token_bytes': base64, "
                             "'token_str': ...}")
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"--tokenizer-model {path!r} entry {i}: token_bytes is not base64") from None
        if (i < 256 and token != bytes([i])) or not token:
            raise ValueError(f"--tokenizer-model {path!r} entry {i}: the first 256 entries must be the bytes 0..255")
        if token in ranks:
            raise ValueError(f"--tokenizer-model {path!r} entry {i}: the bytes {token!r} appear twice")
        ranks[token] = i + shift
    return ranks


class TikTokenizer(Tokenizer):
    """Megatron's ``TikTokenizer`` (see the module doc)."""

    def __init__(self, path: str | os.PathLike, pattern: str | None = None, vocab_size: int | None = None,
                 num_special_tokens: int | None = None, special_tokens: list[str] | None = None):
        try:
            import tiktoken
        except ImportError as error:
            raise ImportError("--tokenizer-type TikTokenizer needs the optional tiktoken package "
                              "(pip install tiktoken)") from error
        self.path = os.fspath(path)
        pattern = pattern or "v2"
        if pattern not in PATTERNS:
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        num_special = DEFAULT_NUM_SPECIAL_TOKENS if num_special_tokens is None else num_special_tokens
        special = list(REQUIRED_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if len(set(special)) != len(special):
            raise ValueError(f"--tiktoken-special-tokens must be distinct, got {special}")
        if not set(REQUIRED_SPECIAL_TOKENS) <= set(special):
            raise ValueError(f"--tiktoken-special-tokens must include {' '.join(REQUIRED_SPECIAL_TOKENS)}")
        if not len(special) <= num_special < vocab_size:
            raise ValueError(f"TikTokenizer needs {len(special)} special tokens <= --tiktoken-num-special-tokens "
                             f"({num_special}) < --vocab-size ({vocab_size})")
        special += [f"<SPECIAL_{i}>" for i in range(len(special), num_special)]
        if len(set(special)) != num_special:
            raise ValueError(f"--tiktoken-special-tokens clash with the fillers <SPECIAL_i>: {special}")
        if not self.path.endswith(".json"):
            raise ValueError(f"--tokenizer-model {self.path!r}: TikTokenizer reads a .json vocabulary")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"--tokenizer-model {self.path!r} does not exist")
        with open(self.path, "rb") as handle:
            data = handle.read()
        ranks = _load_ranks(self.path, data, vocab_size - num_special, num_special)
        self._special = {token: i for i, token in enumerate(special)}
        self._enc = tiktoken.Encoding(name=os.path.basename(os.path.dirname(os.path.abspath(self.path))) or "tiktoken",
                                      pat_str=PATTERNS[pattern], mergeable_ranks=ranks, special_tokens=self._special)
        self._size = vocab_size
        self.bos, self.eos, self.pad = self._special["<s>"], self._special["</s>"], self._special["<pad>"]
        settings = json.dumps({"pattern": pattern, "vocab_size": vocab_size, "special": special}).encode()
        self._digest = _sha256(b"TikTokenizer\0" + _sha256(data).encode() + _sha256(settings).encode())

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the TikTokenizer vocabulary [0, {self._size})")
        return self._enc.decode(ids, errors="replace")

    def checksum(self) -> str:
        return self._digest

    def __repr__(self) -> str:
        return f"TikTokenizer({self.path!r}, vocab_size={self._size}, eod={self.eod})"
