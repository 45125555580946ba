"""Blending several datasets with weights, with exact proportions and even interleaving.

``--data-path 0.3 prefixA 0.7 prefixB`` asks for 30% / 70% of the samples. Counts are rounded by
largest remainder so they sum to the requested size and each is within one sample of its share;
each dataset's samples are then spread evenly over the blend (sample j of dataset k sits at
position (j + 0.5) / n_k of the way through), so every prefix of the blend is also close to the
weights. Vectorised: no Python loop per sample.
"""

from __future__ import annotations

import numpy as np
import torch


def parse_data_path(values: list[str]) -> list[tuple[float, str]]:
    """``["prefixA"]`` or ``["0.3", "prefixA", "0.7", "prefixB"]`` -> normalised (weight, prefix) pairs."""
    if not values:
        raise ValueError("--data-path needs at least one dataset prefix")
    if len(values) == 1:
        return [(1.0, values[0])]
    if len(values) % 2:
        raise ValueError(f"--data-path {' '.join(values)}: give weight prefix pairs, e.g. 0.3 dataA 0.7 dataB")
    pairs = []
    for weight, prefix in zip(values[::2], values[1::2], strict=True):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ValueError(f"--data-path: {weight!r} (before {prefix!r}) is not a weight") from None
    total = sum(weight for weight, _ in pairs)
    if any(weight < 0 for weight, _ in pairs) or not total > 0:
        raise ValueError("--data-path weights must be non-negative with a positive sum")
    return [(weight / total, prefix) for weight, prefix in pairs]


def blend_counts(weights: list[float], size: int) -> np.ndarray:
    """Samples per dataset: largest-remainder rounding of ``size * weights`` (sums to ``size``)."""
    exact = np.asarray(weights, dtype=np.float64) / np.sum(weights) * size
    counts = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: size - counts.sum()]] += 1
    return counts


def blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) for each of ``size`` blended samples."""
    counts = blend_counts(weights, size)
    dataset = np.repeat(np.arange(len(counts)), counts)
    within = np.concatenate([np.arange(n) for n in counts])
    position = (within + 0.5) / np.repeat(counts, counts)
    order = np.lexsort((dataset, position))  # by position, ties by dataset
    return dataset[order], within[order]


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: list, weights: list[float], size: int):
        counts = blend_counts(weights, size)
        for dataset, count in zip(datasets, counts, strict=True):
            if count > len(dataset):
                raise ValueError(f"blend asks {count} samples of a dataset that has {len(dataset)}; "
                                 "build each dataset with at least its share of the samples")
        self.datasets = datasets
        self.dataset_index, self.dataset_sample_index = blend_indices(weights, size)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int):
        return self.datasets[self.dataset_index[index]][int(self.dataset_sample_index[index])]
