"""Tokenizers. For now the byte tokenizer (no files needed: tests and the built-in demo)."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-document as 256."""

    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
