"""Parameters that several ranks hold as copies fed different data, so their gradients are summed.

* The tied embedding: the first and the last pipeline stage each hold it (the input embedding and
  the output projection); the copies' gradients are summed over ``ctx.embedding_group``.
* Under sequence parallelism, the weights that tensor parallelism does not shard (the norms) see
  only their rank's sequence shard; their gradients are summed over the TP group.
"""

from __future__ import annotations

import torch

from longctx_megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.tensor import tensor_parallel_shards

_SEQUENCE_PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead)


def tied_embedding_weights(chunks: list, ctx: ParallelContext) -> list[torch.nn.Parameter]:
    """This rank's copy of the tied embedding when the first and last pipeline stages both hold one
    (their gradients are summed over ``ctx.embedding_group`` so the copies stay equal); else []."""
    if ctx.pp_size == 1 or ctx.embedding_group is None or not chunks[0].config.tie_embeddings:
        return []
    return [next(chunk for chunk in chunks if chunk.embedding is not None).embedding.weight]


def is_sequence_parallel(model: torch.nn.Module) -> bool:
    """Whether ``model``'s tensor-parallel layers run on sequence shards."""
    return any(isinstance(m, _SEQUENCE_PARALLEL_LAYERS) and m.sequence_parallel for m in model.modules())


def sequence_parallel_replicas(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Under sequence parallelism, the parameters TP replicates (every one without a TP shard: the
    norms), which see different sequence shards on each TP rank; [] otherwise."""
    if not is_sequence_parallel(model):
        return []
    sharded = tensor_parallel_shards(model)
    return [param for name, param in model.named_parameters() if name not in sharded]
