"""The run's tokenizer and datasets, and the micro-batches of each global batch on this DP rank (this
CP rank's part of each sample under context parallelism)."""

from __future__ import annotations

import torch

from longctx_megatron.data.builders import build_gpt_datasets
from longctx_megatron.data.builtin_corpus import BuiltinDataset
from longctx_megatron.data.gpt_dataset import GPTDatasetConfig
from longctx_megatron.data.mock import build_mock_datasets
from longctx_megatron.data.sampler import PretrainingSampler
from longctx_megatron.parallel.context import shard_batch
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.training.run_config import RunConfig


def build_datasets(run: RunConfig, tokenizer) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, validation): Megatron's mock datasets with --mock-data, the built-in corpus without
    --data-path, else Megatron's GPT datasets over the --split; sized for --train-iters and every evaluation."""
    training, data, logging = run.training, run.data, run.logging
    evaluations = training.train_iters // logging.eval_interval + 1 if logging.eval_interval else 1
    counts = (training.train_iters * run.global_batch, evaluations * logging.eval_iters * run.global_batch, 0)
    documents = dict(reset_position_ids=data.reset_position_ids, reset_attention_mask=data.reset_attention_mask,
                     eod_mask_loss=data.eod_mask_loss)
    if data.mock_data:
        train, valid, _ = build_mock_datasets(training.seq_length, tokenizer, counts, seed=training.seed, **documents)
        return train, valid
    if not data.data_path:
        return (BuiltinDataset(training.seq_length, counts[0], training.seed, **documents),
                BuiltinDataset(training.seq_length, counts[1], training.seed + 1, **documents))
    options = GPTDatasetConfig(seq_length=training.seq_length, num_samples=1, seed=training.seed, eod=tokenizer.eod,
                               **documents)
    train, valid, _ = build_gpt_datasets(list(data.data_path), data.split, counts, options, data.data_cache_path)
    return train, valid


def micro_batches(dataset, consumed: int, run: RunConfig, ctx: ParallelContext, device: torch.device) -> list[dict]:
    """This DP rank's micro-batches of the global batch that starts at sample ``consumed``: every CP
    rank of a DP replica reads the same samples and keeps its part (parallel/context.shard_batch)."""
    size = run.training.micro_batch_size
    sampler = PretrainingSampler(len(dataset), consumed, size, ctx.dp_rank, ctx.dp_size)
    batches = []
    for indices, _ in zip(sampler, range(run.microbatches), strict=False):
        samples = [dataset[i] for i in indices]
        batches.append(shard_batch({key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]},
                                   ctx))
    return batches
