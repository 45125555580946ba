"""--mock-data: our MockGPTDataset against megatron-core 0.16.1's own, index for index and sample for sample."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longctx_megatron.data.documents import document_ids
from longctx_megatron.data.mock import MOCK_DOCUMENTS, MockDocuments, build_mock_datasets

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTLowLevelDataset
    from megatron.core.datasets.gpt_dataset import MockGPTDataset as MegatronMockGPTDataset


class CoreTokenizer:
    """What megatron-core reads from config.tokenizer: vocab_size, eod, pad (absent: no pad)."""

    def __init__(self, vocab_size: int, eod: int, pad: int | None = None):
        self.vocab_size, self.eod, self._pad = vocab_size, eod, pad
        self.unique_identifiers = {"class": "CoreTokenizer", "vocab_size": vocab_size, "eod": eod, "pad": pad}

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("no pad")
        return self._pad


def megatron_mock(seq_length, tokenizer, counts, seed, **options):
    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
                              create_attention_mask=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(MegatronMockGPTDataset, list(counts), lambda: True, config).build()


def assert_same(ours, theirs, indices):
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    for index in indices:
        a, b = ours[index], theirs[index]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), (index, key)


def test_documents_are_megatrons():
    theirs = MockGPTLowLevelDataset(CoreTokenizer(300, 299))
    ours = MockDocuments(300, 299)
    assert len(ours) == len(theirs) == MOCK_DOCUMENTS
    np.testing.assert_array_equal(ours.sizes, theirs.sequence_lengths)
    for index in (0, 1, 17, 99_999) + tuple(int(i) for i in np.argsort(ours.sizes)[-2:]):
        np.testing.assert_array_equal(ours.get(index), theirs[index])
        np.testing.assert_array_equal(ours.get(index, 3, 200), theirs.get(index, 3, 200))


@pytest.mark.parametrize("options", [
    {}, {"reset_position_ids": True, "reset_attention_mask": True, "eod_mask_loss": True},
], ids=["plain", "documents"])
def test_splits_equal_megatrons(options):
    tokenizer = CoreTokenizer(1000, 999)
    theirs = megatron_mock(512, tokenizer, (300, 200, 50), seed=7,
                           **{k: options.get(k, False) for k in ("reset_position_ids", "reset_attention_mask",
                                                                 "eod_mask_loss")})
    ours = build_mock_datasets(512, SimpleNamespace(vocab_size=1000, eod=999), (300, 200, 50), seed=7, **options)
    for a, b in zip(ours, theirs, strict=True):
        assert_same(a, b, [*range(12), len(a) - 1])
    sample = ours[0][0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"} | (
        {"document_ids"} if options else set())
    if options:
        torch.testing.assert_close(sample["document_ids"], document_ids(sample["tokens"], 999))


@pytest.mark.parametrize("count", [5000, 8000], ids=["final-epoch-apart", "final-epoch-shuffled-in"])
def test_several_epochs_and_a_pad_id_equal_megatrons(count):
    # 16384-token samples: 4162 per epoch of the train third, so 5000 samples leave the second epoch
    # 20% used (shuffled apart, Megatron's 80% rule) and 8000 leave it 92% used
    seq = 16384
    theirs = megatron_mock(seq, CoreTokenizer(50, 49, pad=5), (count, 1, 0), seed=3, reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=True)
    train, valid, test = build_mock_datasets(seq, SimpleNamespace(vocab_size=50, eod=49, pad=5), (count, 1, 0),
                                             seed=3, eod_mask_loss=True)
    assert test is None  # (megatron-core builds a one-epoch dataset for a zero count)
    assert len(train) >= count and len(np.unique(train.document_index)) < len(train.document_index)
    assert_same(train, theirs[0], [0, 1, len(train) - 1, count - 1])
    assert_same(valid, theirs[1], [0])
    sample = train[1]
    assert (sample["tokens"] != 5).all() and (sample["loss_mask"][sample["labels"] == 0] == 0).all()


def test_same_seed_same_samples_other_seed_other_samples():
    tokenizer = SimpleNamespace(vocab_size=500, eod=0)
    first, *_ = build_mock_datasets(256, tokenizer, (50, 0, 0), seed=11)
    again, *_ = build_mock_datasets(256, tokenizer, (50, 0, 0), seed=11)
    other, *_ = build_mock_datasets(256, tokenizer, (50, 0, 0), seed=12)
    assert torch.equal(first[3]["tokens"], again[3]["tokens"])
    assert not torch.equal(first[3]["tokens"], other[3]["tokens"])
    assert first[3]["tokens"].shape == (256,) and first[3]["tokens"].dtype == torch.int64


def test_bad_arguments():
    tokenizer = SimpleNamespace(vocab_size=500, eod=0)
    with pytest.raises(ValueError, match="seq_length > 1"):
        build_mock_datasets(1, tokenizer, (5, 0, 0))
    with pytest.raises(ValueError, match="positive vocab_size"):
        build_mock_datasets(8, SimpleNamespace(vocab_size=0, eod=0), (5, 0, 0))
    assert build_mock_datasets(8, tokenizer, (0, 0, 0)) == (None, None, None)
