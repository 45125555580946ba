"""The built-in demo corpus: CPython's own reference documentation (``pydoc_data.topics``).

It ships with every CPython installation (about 80 documents, 0.46 MB of English prose and code),
so the default training run has real text with no download.
"""

from __future__ import annotations

import argparse
import json

import torch

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.data.documents import gpt_sample
from longctx_megatron.data.tokenizers import ByteTokenizer


def builtin_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def builtin_token_stream(tokenizer: ByteTokenizer) -> torch.Tensor:
    """All documents tokenised and joined, each followed by the end-of-document token (int64)."""
    ids: list[int] = []
    for text in builtin_documents():
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eod)
    return torch.tensor(ids, dtype=torch.long)


class BuiltinDataset(torch.utils.data.Dataset):
    """``num_samples`` windows of ``seq_length + 1`` tokens at random offsets of the byte stream,
    as dicts like GPTDataset's; the offsets depend only on ``seed``, so runs are reproducible.
    ``reset_position_ids``, ``reset_attention_mask`` and ``eod_mask_loss`` are GPTDatasetConfig's
    options (data/documents.py), at the byte tokenizer's EOD that ends every document."""

    def __init__(self, seq_length: int, num_samples: int, seed: int, *, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, eod_mask_loss: bool = False):
        tokenizer = ByteTokenizer()
        self.stream = builtin_token_stream(tokenizer)
        self.eod = tokenizer.eod
        self.options = dict(reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
                            eod_mask_loss=eod_mask_loss)
        if self.stream.numel() <= seq_length + 1:
            raise ValueError(f"the built-in corpus has {self.stream.numel()} tokens, fewer than --seq-length + 1")
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, self.stream.numel() - seq_length - 1, (num_samples,), generator=generator)
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[index])
        return gpt_sample(self.stream[start:start + self.seq_length + 1], self.eod, **self.options)


def write_jsonl(path: str) -> int:
    """Write the built-in documents as JSONL ({"title", "text"} per line), atomically; returns the count."""
    from pydoc_data.topics import topics

    with atomic_write(path) as handle:
        for name in sorted(topics):
            handle.write(json.dumps({"title": name, "text": topics[name]}) + "\n")
    return len(topics)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the built-in corpus as JSONL (an example input for tools/).")
    parser.add_argument("output", help="path of the .jsonl file to write")
    print(f"wrote {write_jsonl(parser.parse_args().output)} documents")
