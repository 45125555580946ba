"""GPT samples of ``seq_length + 1`` tokens drawn across document boundaries, as in Megatron-LM.

Three index arrays define the dataset, all built with vectorised numpy and cached next to the data:

* ``doc_idx``: the split's sequences, shuffled per epoch, for as many epochs as the samples need;
* ``sample_idx``: (num_samples + 1, 2) rows of (position in doc_idx, token offset) where sample k
  starts; sample k spans its start to the next sample's start plus one token (the last label);
* ``shuffle_idx``: the order in which samples are served.

Sequences are stored with their end-of-document token (preprocess ``--append-eod``), so joining
them yields documents separated by EOD. Each sample may carry position ids that restart after an
EOD, per-token ``document_ids`` for attention that stays within a document (Megatron-LM's
``--reset-attention-mask``), and a loss mask that is 0 at the positions whose *input* token is EOD
(as Megatron-LM's ``--eod-mask-loss``: the prediction made from an EOD, i.e. of the next
document's first token, is not trained; predicting the EOD itself still is). The EOD rule is
data/documents.py's, shared with the built-in corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.data.documents import gpt_sample
from longctx_megatron.data.indexed_dataset import IndexedDataset, index_file_path

INDEX_FORMAT_VERSION = 1  # bump when the index construction changes: invalidates caches
# Options that only shape a sample's extra tensors, not which tokens it holds, and joined the config
# after caches existed: left out of the cache key so those caches stay valid. (reset_position_ids
# and eod_mask_loss are sample-only too, but have always been in the key; dropping them would
# invalidate every existing cache.)
_NOT_IN_CACHE_KEY = ("reset_attention_mask",)


@dataclass(frozen=True)
class GPTDatasetConfig:
    seq_length: int
    num_samples: int
    seed: int = 1234
    eod: int | None = None  # needed by the three options below
    reset_position_ids: bool = False
    reset_attention_mask: bool = False  # each sample gets "document_ids" (data/documents.py)
    eod_mask_loss: bool = False

    def __post_init__(self) -> None:
        if self.seq_length <= 0 or self.num_samples <= 0:
            raise ValueError(f"seq_length ({self.seq_length}) and num_samples ({self.num_samples}) must be positive")
        if (self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss) and self.eod is None:
            raise ValueError("reset_position_ids, reset_attention_mask and eod_mask_loss need the tokenizer's eod id")


def split_ranges(num_sequences: int, split: str) -> list[tuple[int, int]]:
    """Sequence ranges [begin, end) for train/valid/test from weights like ``"969,30,1"``.

    Megatron-core's rule for GPT data: the weights are normalised, their cumulative sums are the
    split's book-ends, and each book-end b becomes ``int(round(b * num_sequences))``. It counts
    sequences, not documents (``GPTDataset.numel_low_level_dataset``): an empty document holds no
    sequence and moves no boundary.
    """
    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r} must be comma-separated numbers, e.g. 969,30,1") from None
    if any(w < 0 for w in weights) or not sum(weights) > 0 or len(weights) > 3:
        raise ValueError(f"--split {split!r} needs up to three non-negative weights with a positive sum")
    weights = np.array((weights + [0.0, 0.0])[:3], dtype=np.float64)
    bookends = [0.0]
    for fraction in (weights / weights.sum()).tolist():
        bookends.append(bookends[-1] + fraction)
    bounds = [int(round(b * float(num_sequences))) for b in bookends]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _build_indices(sizes: np.ndarray, first: int, last: int, config: GPTDatasetConfig):
    """(doc_idx, sample_idx, shuffle_idx) for sequences [first, last) of a dataset with ``sizes``."""
    sequences = np.arange(first, last, dtype=np.int64)
    tokens_per_epoch = int(sizes[first:last].sum())
    needed = config.num_samples * config.seq_length + 1
    if tokens_per_epoch == 0:
        raise ValueError("the split holds no tokens; check --split and the dataset")
    epochs = -(-needed // tokens_per_epoch)
    rng = np.random.RandomState(config.seed)
    doc_idx = np.concatenate([rng.permutation(sequences) for _ in range(epochs)])
    ends = np.cumsum(sizes[doc_idx].astype(np.int64))
    starts = np.arange(config.num_samples + 1, dtype=np.int64) * config.seq_length
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - np.where(position > 0, ends[np.maximum(position - 1, 0)], 0)
    sample_idx = np.stack([position, offset], axis=1)
    shuffle_idx = np.random.RandomState(config.seed + 1).permutation(config.num_samples)
    return doc_idx, sample_idx, shuffle_idx


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples from sequences ``[first, last)`` of ``prefix`` (one sequence per
    non-empty document, as tools/preprocess_data.py writes them; ``split_ranges`` gives the ranges)."""

    def __init__(self, prefix: str, first: int, last: int, config: GPTDatasetConfig,
                 cache_dir: str | None = None, name: str = "train"):
        self.config = config
        self.indexed = IndexedDataset(prefix)
        if not 0 <= first < last <= len(self.indexed):
            raise ValueError(f"{prefix}: sequence range [{first}, {last}) is empty or out of bounds (the dataset "
                             f"has {len(self.indexed)} sequences)")
        options = {field: value for field, value in asdict(config).items() if field not in _NOT_IN_CACHE_KEY}
        description = dict(
            version=INDEX_FORMAT_VERSION, name=name, index=os.path.abspath(index_file_path(prefix)),
            index_bytes=os.path.getsize(index_file_path(prefix)), sequences=[first, last], **options,
        )
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir or f"{prefix}_cache")
        paths = {part: cache / f"{key}-{name}-{part}.npy" for part in ("doc_idx", "sample_idx", "shuffle_idx")}
        self.cache_paths = paths
        _build_once(paths, cache / f"{key}-{name}-description.json", description,
                    lambda: _build_indices(self.indexed.sizes, first, last, config))
        self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(paths[p], mmap_mode="r") for p in paths)

    def __len__(self) -> int:
        return self.config.num_samples

    def tokens(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``index`` (after shuffling)."""
        sample = int(self.shuffle_idx[index])
        (doc_first, offset_first), (doc_last, offset_last) = self.sample_idx[sample], self.sample_idx[sample + 1]
        if doc_first == doc_last:
            length = int(offset_last - offset_first + 1)
            return self.indexed.get(int(self.doc_idx[doc_first]), int(offset_first), length)
        parts = [self.indexed.get(int(self.doc_idx[doc_first]), int(offset_first))]
        parts += [self.indexed.get(int(self.doc_idx[d])) for d in range(doc_first + 1, doc_last)]
        parts.append(self.indexed.get(int(self.doc_idx[doc_last]), 0, int(offset_last) + 1))
        return np.concatenate(parts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.tokens(index).astype(np.int64))
        config = self.config
        return gpt_sample(text, config.eod, reset_position_ids=config.reset_position_ids,
                          reset_attention_mask=config.reset_attention_mask, eod_mask_loss=config.eod_mask_loss)


def _build_once(paths: dict[str, Path], description_path: Path, description: dict, build) -> None:
    """Build and cache the index arrays on one rank (global rank 0) while the others wait."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        if not all(path.exists() for path in paths.values()):
            description_path.parent.mkdir(parents=True, exist_ok=True)
            for path, array in zip(paths.values(), build(), strict=True):
                with atomic_write(path, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
            with atomic_write(description_path) as handle:
                handle.write(json.dumps(description, indent=2, sort_keys=True) + "\n")
    if distributed:
        dist.barrier()
