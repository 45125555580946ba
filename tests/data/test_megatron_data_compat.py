"""Our datasets against Megatron-LM's own library (megatron-core): the same .bin/.idx bytes for a
corpus with empty documents, and the same train/valid/test boundaries from --split."""

from __future__ import annotations

import json
import warnings

import numpy as np
import preprocess_data  # tools/ is on pytest's pythonpath (pyproject.toml)
import pytest

from longctx_megatron.data.builders import build_gpt_datasets
from longctx_megatron.data.gpt_dataset import GPTDatasetConfig, split_ranges
from longctx_megatron.data.tokenizers import ByteTokenizer
from tests.data.test_preprocess_data import stdlib_documents, write_jsonl

with warnings.catch_warnings():  # it warns that TransformerEngine and apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets import indexed_dataset as megatron_indexed
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset


def megatron_split(prefix: str, split: str) -> list[tuple[int, int]]:
    """Megatron's book-ends of each split (BlendedMegatronDatasetBuilder), over its element count."""
    return megatron_bounds(MegatronGPTDataset.numel_low_level_dataset(megatron_indexed.IndexedDataset(prefix)), split)


def megatron_bounds(elements: int, split: str) -> list[tuple[int, int]]:
    ranges = []
    for bookends in convert_split_vector_to_split_matrix(parse_and_normalize_split(split)):
        if bookends is None:  # a zero weight: Megatron builds no dataset, we an empty range
            end = ranges[-1][1] if ranges else 0
            ranges.append((end, end))
        else:
            ranges.append((int(round(bookends[0] * float(elements))), int(round(bookends[1] * float(elements)))))
    return ranges


@pytest.fixture(scope="module")
def corpus_with_empty_documents(tmp_path_factory):
    """Real text with empty documents among it (at the start, in runs, at the end), preprocessed by
    our tool and, from the same token ids, by Megatron's IndexedDatasetBuilder."""
    folder = tmp_path_factory.mktemp("empty_docs")
    texts = stdlib_documents(23)
    for position in (0, 5, 6, 7, 12, len(texts)):
        texts.insert(position, "")
    write_jsonl(folder / "in.jsonl", [{"text": text} for text in texts])
    ours = str(folder / "ours")
    preprocess_data.preprocess(preprocess_data.parse_args([
        "--input", str(folder / "in.jsonl"), "--tokenizer-type", "ByteTokenizer", "--output-prefix", ours,
        "--append-eod", "--workers", "2"]), log=lambda *_: None)
    tokenizer, theirs = ByteTokenizer(), str(folder / "megatron_text_document")
    dtype = megatron_indexed.DType.optimal_dtype(tokenizer.vocab_size)
    builder = megatron_indexed.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for text in texts:  # tools/preprocess_data.py of Megatron-LM: Encoder.encode, then add_document
        ids = tokenizer.encode(text)
        ids += [tokenizer.eod] if ids else []
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(theirs + ".idx")
    return texts, ours + "_text_document", theirs


def test_empty_documents_are_written_as_megatron_writes_them(corpus_with_empty_documents):
    texts, ours, theirs = corpus_with_empty_documents
    for suffix in (".bin", ".idx"):
        with open(ours + suffix, "rb") as a, open(theirs + suffix, "rb") as b:
            assert a.read() == b.read(), f"{suffix} differs from Megatron's"
    dataset = megatron_indexed.IndexedDataset(ours)
    assert len(dataset.document_indices) == len(texts) + 1  # one entry per document, empty ones too
    assert len(dataset) == sum(bool(text) for text in texts)  # but only non-empty ones hold a sequence


@pytest.mark.parametrize("split", ["969,30,1", "50,50", "90,10,0", "1", "2,1,1", "1/1/1"])
def test_split_boundaries_are_megatrons(corpus_with_empty_documents, split):
    _, ours, _ = corpus_with_empty_documents
    assert split_ranges(len(megatron_indexed.IndexedDataset(ours)), split) == megatron_split(ours, split)


def test_split_rule_matches_megatron_on_many_sizes():
    for count in (1, 7, 10, 33, 999, 1000, 7033, 7145, 123457):
        for split in ("969,30,1", "50,50", "98,2", "1,1,1", "80,10,10", "99.9,0.1"):
            assert split_ranges(count, split) == megatron_bounds(count, split), (count, split)


def test_the_trainer_splits_by_megatrons_sequence_ranges(corpus_with_empty_documents, tmp_path):
    _, ours, _ = corpus_with_empty_documents
    config = GPTDatasetConfig(seq_length=64, num_samples=1)
    train, valid, _ = build_gpt_datasets([ours], "80,20,0", (10, 10, 0), config, str(tmp_path))
    (train_lo, train_hi), (valid_lo, valid_hi), _ = megatron_split(ours, "80,20,0")
    for dataset, (lo, hi) in ((train, (train_lo, train_hi)), (valid, (valid_lo, valid_hi))):
        description = json.loads(next(iter(tmp_path.glob(f"*-{dataset.cache_paths['doc_idx'].name.split('-')[1]}"
                                                          "-description.json"))).read_text())
        assert description["sequences"] == [lo, hi]
        assert set(np.unique(dataset.doc_idx)) == set(range(lo, hi))
