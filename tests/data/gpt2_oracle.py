"""A reference GPT-2 byte-level BPE for the tests, written from OpenAI's published algorithm (encoder.py).

transformers 5 no longer ships the pure-Python ``GPT2Tokenizer`` (it is backed by the same Rust
``tokenizers`` library our GPT2BPETokenizer uses), and Megatron-LM removed its own copy of OpenAI's
encoder, so the oracle lives here: small, slow, and independent of any BPE library.
"""

from __future__ import annotations

import json

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_symbols() -> dict[int, str]:
    """GPT-2's map from a byte to a printable character: printable Latin-1 bytes map to themselves, the
    others to 256, 257, ... in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


class OracleGPT2:
    """Encode as OpenAI's GPT-2: split by the regex, map bytes to symbols, merge the lowest-ranked
    adjacent pair everywhere until no ranked pair is left, look the symbols up in the vocabulary."""

    def __init__(self, vocab_path: str, merges_path: str):
        with open(vocab_path, encoding="utf-8") as handle:
            self.encoder = json.load(handle)
        with open(merges_path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")[1:-1]  # the version line and the text after the last newline
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines) if line.split()}
        self.symbols = byte_symbols()

    def _merge(self, word: list[str]) -> list[str]:
        while len(word) > 1:
            pairs = zip(word, word[1:], strict=False)
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                return word
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in regex.findall(GPT2_PATTERN, text):
            word = [self.symbols[b] for b in piece.encode("utf-8")]
            ids.extend(self.encoder[symbol] for symbol in self._merge(word))
        return ids
