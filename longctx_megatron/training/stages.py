"""This rank's model chunks: the pipeline stages it holds, each built and parallelized for it."""

from __future__ import annotations

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.parallel.parallelize import build_parallel_model
from longctx_megatron.parallel.pipeline_plan import stage_layers
from longctx_megatron.parallel.state import ParallelContext


def build_pipeline_chunks(config: ModelConfig, ctx: ParallelContext, sizes: list[int], **build_kwargs) -> list:
    """This rank's model chunks, TP-sharded by ``ctx``: ``sizes`` gives the layers of every virtual
    stage (len(sizes) = chunks x pp_size); chunk c holds virtual stage c * pp_size + pp_rank."""
    virtual = len(sizes)
    if virtual % ctx.pp_size:
        raise ConfigError(f"{virtual} virtual pipeline stages do not divide over {ctx.pp_size} pipeline ranks")
    chunks = []
    for chunk in range(virtual // ctx.pp_size):
        stage = chunk * ctx.pp_size + ctx.pp_rank
        chunks.append(build_parallel_model(
            config, ctx, layers=stage_layers(sizes, stage), pre_process=stage == 0,
            post_process=stage == virtual - 1, **build_kwargs,
        ))
    return chunks
