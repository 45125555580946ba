"""``--mock-data``: Megatron-LM's synthetic GPT datasets (megatron-core's ``MockGPTDataset``), sample for sample.

The documents are ``MockGPTLowLevelDataset``'s: 100,000 of them, document i of length
``L_i = default_rng(0).integers(1, 4096, 100000, int32)[i]`` holding ``(1, 2, ..., L_i - 1) % vocab_size``
followed by the tokenizer's ``eod`` (the lengths never depend on the run's seed). The splits are
thirds of those 100,000 documents: megatron-core sets the split to "1,1,1" whenever it mocks data,
whatever ``--split`` says (BlendedMegatronDatasetConfig), and so do we. Each split is a
Megatron ``GPTDataset`` over its documents with ``--seed`` as its random state: the document index
(``num_epochs`` copies of the split shuffled together, the final epoch shuffled apart when it is
used for fewer than 80% of its samples), the sample index (sample k starts at token k * seq_length of
the concatenated documents, ends one token later than the next starts) and the shuffle index, built
with numpy where megatron-core uses its C++ helper.

A split's length is Megatron's: every full sample of its ``num_epochs`` epochs (at least the requested
number). Each sample is the dict our GPTDataset yields (data/documents.py: ``tokens``, ``labels``,
``loss_mask``, ``position_ids``, and ``document_ids`` with ``reset_attention_mask``); Megatron's dense
``attention_mask`` is not built (``document_ids`` describes the same documents). As megatron-core, a
label equal to the tokenizer's ``pad`` id (when it has one) gets loss mask 0, and the pad id is
replaced by 0 in tokens and labels.
"""

from __future__ import annotations

import numpy as np
import torch

from longctx_megatron.data.documents import gpt_sample
from longctx_megatron.data.gpt_dataset import split_ranges

MOCK_DOCUMENTS = 100_000  # MockGPTLowLevelDataset.size
MOCK_MAX_LENGTH = 4096  # MockGPTLowLevelDataset.max_sequence_length (exclusive bound of a length)
MOCK_LENGTHS_SEED = 0  # MockGPTLowLevelDataset.seed: fixed, whatever the run's seed
FINAL_EPOCH_THRESHOLD = 0.80  # Megatron's GPTDataset: a final epoch used below this fraction is shuffled apart


class MockDocuments:
    """Megatron's ``MockGPTLowLevelDataset``: synthetic documents, each ending with ``eod``."""

    def __init__(self, vocab_size: int, eod: int):
        if vocab_size < 1:
            raise ValueError(f"mock data needs a positive vocab_size, got {vocab_size}")
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        rng = np.random.default_rng(seed=MOCK_LENGTHS_SEED)
        self.sizes = rng.integers(low=1, high=MOCK_MAX_LENGTH, size=MOCK_DOCUMENTS, dtype=np.int32)

    def __len__(self) -> int:
        return MOCK_DOCUMENTS

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.sizes[index])
        end = size if length is None else min(size, offset + length)
        positions = np.arange(offset, end, dtype=np.int64)  # token t of a document is (t + 1) % V, the last eod
        tokens = (positions + 1) % self.vocab_size
        tokens[positions == size - 1] = self.eod
        return tokens


def _num_epochs(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def _document_index(documents: np.ndarray, epochs: int, rng: np.random.RandomState, separate_final: bool):
    if separate_final and epochs > 1:
        return np.concatenate([_document_index(documents, epochs - 1, rng, False),
                               _document_index(documents, 1, rng, False)])
    index = np.tile(documents, epochs).astype(np.int32)
    rng.shuffle(index)
    return index


def _sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) rows (position in the document index, token offset): sample k starts at token
    k * seq_length of the concatenated documents, attributed to the document holding that token (the
    C++ helper's rule with one extra token per sample: build_sample_idx, drop_last_partial_sequence)."""
    ends = np.cumsum(sizes[document_index].astype(np.int64))
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - np.where(position > 0, ends[np.maximum(position - 1, 0)], 0)
    return np.stack([position, offset], axis=1)


def _shuffle_index(first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


class MockGPTDataset(torch.utils.data.Dataset):
    """Megatron's ``MockGPTDataset`` for documents ``[first, last)`` (see the module doc)."""

    def __init__(self, documents: MockDocuments, first: int, last: int, num_samples: int, seq_length: int,
                 seed: int, *, pad: int | None = None, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, eod_mask_loss: bool = False):
        if seq_length < 2 or num_samples < 1 or not 0 <= first < last <= len(documents):
            raise ValueError(f"mock data needs seq_length > 1, num_samples > 0 and a non-empty document range, got "
                             f"seq_length={seq_length}, num_samples={num_samples}, documents [{first}, {last})")
        self.documents, self.seq_length, self.pad = documents, seq_length, pad
        self.options = dict(reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
                            eod_mask_loss=eod_mask_loss)
        split = np.arange(first, last, dtype=np.int32)
        tokens_per_epoch = int(documents.sizes[split].sum())
        epochs = _num_epochs(tokens_per_epoch, num_samples, seq_length)
        separate_final, before_final = False, 0
        if epochs > 1:
            before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
            per_epoch = (tokens_per_epoch - 1) // seq_length
            separate_final = num_samples - before_final < int(FINAL_EPOCH_THRESHOLD * per_epoch)
        rng = np.random.RandomState(seed)
        self.document_index = _document_index(split, epochs, rng, separate_final)
        total = (epochs * tokens_per_epoch - 1) // seq_length
        self.sample_index = _sample_index(documents.sizes, self.document_index, seq_length, total)
        self.shuffle_index = _shuffle_index(before_final if separate_final else total, total, rng)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def text(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``index`` (after shuffling)."""
        sample = int(self.shuffle_index[index])
        (doc_first, offset_first), (doc_last, offset_last) = self.sample_index[sample], self.sample_index[sample + 1]
        get, docs = self.documents.get, self.document_index
        if doc_first == doc_last:
            return get(int(docs[doc_first]), int(offset_first), int(offset_last - offset_first + 1))
        parts = [get(int(docs[doc_first]), int(offset_first))]
        parts += [get(int(docs[d])) for d in range(doc_first + 1, doc_last)]
        parts.append(get(int(docs[doc_last]), 0, int(offset_last) + 1))
        return np.concatenate(parts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = gpt_sample(torch.from_numpy(self.text(index)), self.documents.eod, **self.options)
        if self.pad is not None:  # megatron-core's GPTDataset: a pad label is not trained, pad ids become 0
            sample["loss_mask"][sample["labels"] == self.pad] = 0.0
            sample["tokens"] = sample["tokens"].masked_fill(sample["tokens"] == self.pad, 0)
            sample["labels"] = sample["labels"].masked_fill(sample["labels"] == self.pad, 0)
        return sample


MOCK_SPLIT = "1,1,1"  # megatron-core's split for mock data, --split notwithstanding


def build_mock_datasets(seq_length: int, tokenizer, num_samples: tuple[int, int, int], *, seed: int = 1234,
                        reset_position_ids: bool = False, reset_attention_mask: bool = False,
                        eod_mask_loss: bool = False) -> tuple:
    """(train, valid, test) as ``data.builders.build_gpt_datasets`` returns them: a ``MockGPTDataset`` per
    split with a positive count (over a third of the mock documents each), else None (megatron-core
    would build a one-epoch dataset for a zero count). ``tokenizer`` gives ``vocab_size``, ``eod`` and
    ``pad`` (None, or an attribute it lacks: no pad), as Megatron's config.tokenizer does."""
    documents = MockDocuments(tokenizer.vocab_size, tokenizer.eod)
    pad = getattr(tokenizer, "pad", None)
    options = dict(reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
                   eod_mask_loss=eod_mask_loss)
    datasets = []
    for count, (first, last) in zip(num_samples, split_ranges(MOCK_DOCUMENTS, MOCK_SPLIT), strict=True):
        if count <= 0:
            datasets.append(None)
        else:
            datasets.append(MockGPTDataset(documents, first, last, int(count), seq_length, seed, pad=pad, **options))
    return tuple(datasets)
