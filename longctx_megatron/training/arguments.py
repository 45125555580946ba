"""Command-line flags with Megatron-LM's names and meanings, checked before any process group starts."""

from __future__ import annotations

import argparse
import dataclasses
import os

from longctx_megatron.config import ModelConfig, load_config
from longctx_megatron.data.tokenizers import TOKENIZER_TYPES
from longctx_megatron.model.attention import factory
from longctx_megatron.parallel.parallelize import RECOMPUTE_GRANULARITIES
from longctx_megatron.parallel.state import check_layout
from longctx_megatron.training.lr_schedule import DECAY_STYLES

# Megatron flag -> (ModelConfig field, type), for flags that override the model section.
MODEL_FLAGS = {
    "num-layers": ("n_layers", int), "hidden-size": ("d_model", int), "num-attention-heads": ("n_heads", int),
    "num-query-groups": ("n_kv_heads", int), "ffn-hidden-size": ("d_ff", int),
    "max-position-embeddings": ("max_seq_len", int), "vocab-size": ("vocab_size", int),
    "attention-layout": ("attention_layout", str), "sliding-window": ("sliding_window", int),
    "global-every": ("global_every", int), "dilated-window": ("dilated_window", int), "dilation": ("dilation", int),
    "init-method-std": ("init_std", float), "hidden-dropout": ("hidden_dropout", float),
    "attention-dropout": ("attention_dropout", float),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pre-train a long-context GPT. With no flags: the built-in tiny model on the built-in corpus.",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model (override --config; default: the built-in tiny model)")
    model.add_argument("--config", help="model config, .yaml or .json")
    for flag, (_, kind) in MODEL_FLAGS.items():
        model.add_argument(f"--{flag}", type=kind)
    model.add_argument("--rotary-base", type=float, help="RoPE theta of every layer")
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--attention-backend", default="auto", choices=["auto", *factory.list_variants()])

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--pipeline-layer-split", help="layers per stage, e.g. 10,8,7,7 (default: by cost)")
    parallel.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                          help="interleaved 1F1B with this many layers per virtual stage")
    parallel.add_argument("--use-distributed-optimizer", action="store_true",
                          help="shard Adam state and fp32 master weights over data-parallel ranks (ZeRO-1)")
    parallel.add_argument("--distributed-backend", choices=["nccl", "gloo"])
    parallel.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    parallel.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES[1:])

    train = parser.add_argument_group("training")
    train.add_argument("--seq-length", type=int, default=1024)
    train.add_argument("--micro-batch-size", type=int, default=4)
    train.add_argument("--global-batch-size", type=int, help="default: micro batch size x data-parallel size")
    train.add_argument("--train-iters", type=int, default=60)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--min-lr", type=float, default=0.0)
    train.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    train.add_argument("--lr-warmup-iters", type=int, default=10)
    train.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.95)
    train.add_argument("--adam-eps", type=float, default=1e-8)
    train.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    train.add_argument("--calculate-per-token-loss", action="store_true",
                       help="gradients of sum of token losses / unmasked tokens of the global batch (default, as "
                       "in Megatron: of the mean over micro-batches and DP ranks of each micro-batch's token mean)")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--fp16", action="store_true")
    train.add_argument("--initial-loss-scale", type=float, default=2.0**16, help="fp16 dynamic loss scale start")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--device", help="default: cuda when available, else cpu")

    data = parser.add_argument_group("data (default: the built-in corpus with the byte tokenizer)")
    data.add_argument("--data-path", nargs="+", help="prefix, or weight prefix pairs: 0.3 dataA 0.7 dataB")
    data.add_argument("--split", default="969,30,1")
    data.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    data.add_argument("--tokenizer-model")
    data.add_argument("--data-cache-path")
    data.add_argument("--reset-position-ids", action="store_true")
    data.add_argument("--eod-mask-loss", action="store_true")

    ckpt = parser.add_argument_group("checkpointing and recovery (give --save and --load the same directory to "
                                     "resume automatically)")
    ckpt.add_argument("--save", help="directory for checkpoints: iter_NNNNNNN/ and latest_checkpointed_iteration.txt")
    ckpt.add_argument("--save-interval", type=int, help="iterations between checkpoints (one is always saved at the "
                      "end and on preemption)")
    ckpt.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints")
    ckpt.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    ckpt.add_argument("--load", help="resume from the newest sound checkpoint here (none yet: start fresh)")
    ckpt.add_argument("--ckpt-step", type=int, help="load this iteration instead of the newest")
    ckpt.add_argument("--finetune", action="store_true", help="load weights only; start at iteration 0")
    ckpt.add_argument("--no-load-optim", action="store_true", help="do not load optimizer state")
    ckpt.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    ckpt.add_argument("--exit-interval", type=int, help="save and exit when the iteration is a multiple of this")
    ckpt.add_argument("--exit-duration-in-mins", type=float, help="save and exit after this many minutes")
    ckpt.add_argument("--max-skipped-iters-in-a-row", type=int, default=10,
                      help="stop after this many consecutive non-finite steps (0: never)")

    log = parser.add_argument_group("logging and evaluation")
    log.add_argument("--log-interval", type=int, default=10)
    log.add_argument("--eval-interval", type=int, default=0, help="0: evaluate only after training")
    log.add_argument("--eval-iters", type=int, default=2)
    log.add_argument("--tensorboard-dir")
    log.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs only)")
    return parser


def model_config(args: argparse.Namespace, default: ModelConfig) -> ModelConfig:
    """--config (or ``default``) with the model flags that were given applied on top."""
    config = load_config(args.config) if args.config else default
    given = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _) in MODEL_FLAGS.items()}
    overrides = {field: value for field, value in given.items() if value is not None}
    if args.attention_layout is not None:
        overrides["layers"] = None
    if args.rotary_base is not None:
        overrides["rope"] = dataclasses.replace(config.rope, theta=args.rotary_base)
    if args.untie_embeddings_and_output_weights:
        overrides["tie_embeddings"] = False
    if args.max_position_embeddings is None and args.seq_length > config.max_seq_len:
        overrides["max_seq_len"] = args.seq_length
    return dataclasses.replace(config, **overrides) if overrides else config


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Contradictions and impossible layouts, reported before any work starts."""

    def fail(message: str):
        raise ValueError(message)

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "seq_length", "micro_batch_size",
                 "train_iters", "log_interval", "eval_iters"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.clip_grad < 0:
        fail(f"--clip-grad must be >= 0 (0: no clipping), got {args.clip_grad}")
    if args.bf16 and args.fp16:
        fail("--bf16 and --fp16 are exclusive")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
    data_parallel = check_layout(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, None)
    global_batch = args.global_batch_size or args.micro_batch_size * data_parallel
    if global_batch % (args.micro_batch_size * data_parallel):
        fail(f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size x data-parallel size "
             f"= {args.micro_batch_size} x {data_parallel}")
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        fail(f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by "
             f"--tensor-model-parallel-size ({args.tensor_model_parallel_size})")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if args.pipeline_model_parallel_size == 1:
            fail("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if args.pipeline_layer_split:
            fail("--pipeline-layer-split and --num-layers-per-virtual-pipeline-stage are exclusive")
        microbatches = global_batch // (args.micro_batch_size * data_parallel)
        if microbatches % args.pipeline_model_parallel_size:
            fail(f"the interleaved schedule needs the micro-batches per step ({microbatches}) to be a multiple "
                 f"of --pipeline-model-parallel-size ({args.pipeline_model_parallel_size})")
    if args.data_path and not args.tokenizer_type:
        fail("--data-path needs --tokenizer-type (and --tokenizer-model for SentencePiece/HuggingFace)")
    if not args.data_path and args.tokenizer_type:
        fail("--tokenizer-type is only used with --data-path (the built-in corpus uses bytes)")
    for flag in ("save_interval", "keep_last", "exit_interval", "exit_duration_in_mins"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag in ("save_interval", "keep_last", "async_save"):
        if getattr(args, flag) and not args.save:
            fail(f"--{flag.replace('_', '-')} needs --save")
    for flag in ("ckpt_step", "finetune", "no_load_optim", "no_load_rng"):
        if getattr(args, flag) not in (None, False) and not args.load:
            fail(f"--{flag.replace('_', '-')} needs --load")
    for flag in ("save", "load"):
        path = getattr(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            fail(f"--{flag} {path}: exists and is not a directory")
    if args.config and not os.path.isfile(args.config):
        fail(f"--config {args.config}: no such file")
