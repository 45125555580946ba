"""The built-in demo corpus: CPython's own reference documentation (``pydoc_data.topics``).

It ships with every CPython installation (about 80 documents, 0.46 MB of English prose and code),
so the default training run has real text with no download.
"""

from __future__ import annotations

import argparse
import json

import torch

from longctx_megatron.atomic_file import atomic_write
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


def random_batches(stream: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Endless (tokens, labels) batches of random windows from ``stream``, reproducible from ``seed``."""
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"the corpus has {stream.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch, 1), generator=generator)
        window = stream[starts + offsets]
        yield window[:, :-1], window[:, 1:]


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
