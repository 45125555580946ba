"""Train/valid/test datasets from Megatron-style ``--data-path`` and ``--split`` arguments."""

from __future__ import annotations

import dataclasses

from longctx_megatron.data.blended import BlendedDataset, blend_counts, parse_data_path
from longctx_megatron.data.gpt_dataset import GPTDataset, GPTDatasetConfig, split_ranges
from longctx_megatron.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def build_gpt_datasets(
    data_path: list[str],
    split: str,
    num_samples: tuple[int, int, int],
    config: GPTDatasetConfig,
    cache_dir: str | None = None,
) -> tuple:
    """One dataset (or None when it gets no samples) per split; several prefixes are blended.

    ``config.num_samples`` is ignored: each split's count comes from ``num_samples``, and each
    prefix is asked for exactly its share of the blend.
    """
    weighted = parse_data_path(data_path)
    ranges = {prefix: split_ranges(len(IndexedDataset(prefix)), split) for _, prefix in weighted}
    datasets = []
    for index, (name, total) in enumerate(zip(SPLIT_NAMES, num_samples, strict=True)):
        if total <= 0:
            datasets.append(None)
            continue
        counts = blend_counts([weight for weight, _ in weighted], total)
        parts = []
        for (_, prefix), count in zip(weighted, counts, strict=True):
            first, last = ranges[prefix][index]
            if count and first == last:
                raise ValueError(f"{prefix}: --split {split} leaves no sequences for the {name} split "
                                 f"({len(IndexedDataset(prefix))} in the dataset)")
            if count:
                split_config = dataclasses.replace(config, num_samples=int(count))
                parts.append((int(count), GPTDataset(prefix, first, last, split_config, cache_dir, name)))
        if len(parts) == 1:
            datasets.append(parts[0][1])
        else:  # weights = the counts themselves, so the blend asks each dataset for exactly its count
            datasets.append(BlendedDataset([d for _, d in parts], [c for c, _ in parts], total))
    return tuple(datasets)
