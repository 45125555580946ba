"""Everything a run needs, from its RunConfig: model, checks, process groups, chunks, optimizer, data, resume.

The order matters and is the same on every rank: what can be checked without process groups is
checked first (the model against the layout, the data paths), then the groups are created, the
model chunks built and parallelized, and only then are collective objects (checkpointer) made.
"""

from __future__ import annotations

import dataclasses

import torch

from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.sharded import Checkpointer
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.model_config import describe_plan
from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.data.blended import parse_data_path
from longctx_megatron.data.indexed_dataset import dataset_exists
from longctx_megatron.data.tokenizers import ByteTokenizer, build_tokenizer, check_vocab_matches, tokenizer_arguments
from longctx_megatron.memory.estimate import estimate_training
from longctx_megatron.model.counting import estimate_params
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.pipeline_plan import describe_split, plan_pipeline
from longctx_megatron.parallel.state import check_model_fits_layout, initialize_parallel
from longctx_megatron.training.arguments import validate
from longctx_megatron.training.datasets import build_datasets
from longctx_megatron.training.memory_check import check_fits, describe, device_capacity_gib, training_setup
from longctx_megatron.training.metrics import Metrics, tensorboard_writer
from longctx_megatron.training.optimizer import build_optimizer
from longctx_megatron.training.precision import LossScaler
from longctx_megatron.training.profiling import check_profile
from longctx_megatron.training.run_config import RunConfig, demo_config
from longctx_megatron.training.stages import build_pipeline_chunks
from longctx_megatron.training.trainer import Trainer
from longctx_megatron.training.wandb_logging import check_wandb, wandb_writer


def tokenizer_and_model(run: RunConfig):
    """The tokenizer and the model config it fits: the built-in bytes and demo model without
    --data-path; else the tokenizer's padded vocabulary under --config and the model flags."""
    if not (run.data.data_path or run.data.mock_data):
        tokenizer = ByteTokenizer()
        config = run.model.resolve(demo_config(), run.training.seq_length)
    else:  # --vocab-size is NullTokenizer's id count (as in Megatron), not the model's vocabulary
        data = run.data
        tokenizer = build_tokenizer(**tokenizer_arguments(data))
        model = run.model
        if data.tokenizer_type in ("NullTokenizer", "TikTokenizer"):
            overrides = {key: value for key, value in model.overrides.items() if key != "vocab_size"}
            model = dataclasses.replace(model, overrides=overrides)
        vocab = padded_vocab_size(tokenizer.vocab_size, divisible_by=model.make_vocab_size_divisible_by)
        config = model.resolve(ModelConfig(vocab_size=vocab), run.training.seq_length)
    check_vocab_matches(config.vocab_size, tokenizer)
    return tokenizer, config


def check_model_and_data(run: RunConfig, config: ModelConfig) -> None:
    """What needs the model config: its length and shape against the flags, and the data files."""
    if run.training.seq_length > config.max_seq_len:
        raise ValueError(f"--seq-length {run.training.seq_length} exceeds the model's max_seq_len={config.max_seq_len}")
    if run.parallel.recompute_granularity != "none" and run.parallel.tensor > 1 and config.attention_dropout > 0:
        raise ValueError("--recompute-granularity with attention dropout under tensor parallelism is not supported "
                         "yet: the recomputed dropout masks would differ from the first forward's")
    check_model_fits_layout(config, run.parallel.tensor)
    for _, prefix in parse_data_path(list(run.data.data_path)) if run.data.data_path else ():
        if not dataset_exists(prefix):
            raise ValueError(f"--data-path {prefix}: no {prefix}.bin/.idx pair (tools/preprocess_data.py writes one)")


def stage_sizes(run: RunConfig, config: ModelConfig):
    """(layers of every (virtual) pipeline stage, per-layer costs, head cost); costs are None for
    the interleaved schedule's equal virtual stages."""
    stages, per = run.parallel.pipeline, run.parallel.layers_per_virtual_stage
    if per:
        if config.n_layers % (per * stages):
            raise ValueError(f"n_layers={config.n_layers} is not divisible by --num-layers-per-virtual-pipeline-stage "
                             f"({per}) x --pipeline-model-parallel-size ({stages})")
        return [per] * (config.n_layers // per), None, None
    return plan_pipeline(config, stages, run.training.seq_length, run.parallel.pipeline_layer_split)


def setup(run: RunConfig, log=print) -> Trainer:
    """A Trainer ready to ``train()``, resumed from ``--load`` when it holds a checkpoint."""
    validate(run)
    check_profile(run)
    check_wandb(run)
    tokenizer, config = tokenizer_and_model(run)
    check_model_and_data(run, config)
    sizes, costs, head = stage_sizes(run, config)
    parallel, training = run.parallel, run.training
    device = torch.device(training.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    memory_setup = training_setup(run, config, sizes, device.type)
    memory = estimate_training(memory_setup)
    check_fits(run, memory_setup, memory, device_capacity_gib(run, device))
    ctx = initialize_parallel(tensor=parallel.tensor, pipeline=parallel.pipeline, backend=parallel.backend_for(device),
                              timeout_minutes=parallel.timeout_minutes, context=parallel.context)
    if ctx.world_size != run.world_size:
        raise ValueError(f"the run is configured for {run.world_size} processes but {ctx.world_size} were launched")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if ctx.rank != 0:
        log = _silent
    for notice in run.notices:
        log(notice)
    log(describe_plan(config))
    log(describe(memory))
    log(f"model: {estimate_params(config):,} parameters; layout: tensor {ctx.tp_size} x pipeline {ctx.pp_size} x "
        f"data {ctx.dp_size}" + (f" x context {ctx.cp_size} ({parallel.cp_comm_type})" if ctx.cp_size > 1 else "")
        + (" with sequence parallelism" if parallel.sequence_parallel else ""))
    if costs is not None and parallel.pipeline > 1:
        log(describe_split(config, sizes, costs, head))
    chunks = build_pipeline_chunks(config, ctx, sizes, device=device, seed=training.seed,
                                   attention_backend=run.model.attention_backend, dtype=training.dtype,
                                   sequence_parallel=parallel.sequence_parallel,
                                   recompute_granularity=parallel.recompute_granularity,
                                   recompute_first_layers=parallel.recompute_first_layers,
                                   cp_comm_type=parallel.cp_comm_type)
    grads = DataParallelGradients(chunks, ctx, distributed_optimizer=parallel.distributed_optimizer)
    optimizer = build_optimizer(run, chunks, grads, ctx, device)
    train_data, valid_data = build_datasets(run, tokenizer)
    source = (list(run.data.data_path) if run.data.data_path else "mock data (Megatron's MockGPTDataset)"
              if run.data.mock_data else "built-in corpus (CPython reference docs, bytes)")
    log(f"data: {source}; "
        f"{len(train_data):,} training samples of {training.seq_length} tokens; global batch {run.global_batch}")
    metrics = Metrics(run, config, device, log, tensorboard_writer(run, ctx.rank), wandb_writer(run, ctx.rank))
    scaler = LossScaler(training.initial_loss_scale) if training.precision == "fp16" else None
    ckpt = run.checkpointing
    checkpointer = Checkpointer(ckpt.save, ckpt.keep_last, ckpt.async_save, log) if ckpt.save or ckpt.load else None
    trainer = Trainer(run, config, ctx, chunks, grads, optimizer, train_data, valid_data, device, scaler, metrics,
                      log, tokenizer, checkpointer, sizes)
    if ckpt.load:
        reader = checkpointer.find(ckpt.load, ckpt.ckpt_step)
        if reader is not None:
            trainer.restore(reader)
        elif ckpt.finetune:
            raise CheckpointError(f"--finetune: no checkpoint in --load {ckpt.load}")
        else:
            log(f"no checkpoint in {ckpt.load} yet: starting from iteration 0")
    return trainer


def _silent(*_args) -> None:
    """Log sink of every rank but global rank 0."""
