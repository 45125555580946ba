"""Megatron's pretraining batch sampler: data-parallel shards of consecutive global batches.

Shuffling lives in the datasets' indices, so the sampler is a deterministic walk: the global batch
starting at ``consumed_samples`` holds samples [c, c + micro_batch * dp), and DP rank r takes its
contiguous micro-batch. Resuming with the consumed count of a checkpoint therefore continues the
exact stream of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1):
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} is not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is not below total_samples={total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will still yield (the last incomplete global batch is dropped)."""
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        first = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + self.global_micro_batch <= self.total_samples:
            yield list(range(start + first, start + first + self.micro_batch_size))
            start += self.global_micro_batch
