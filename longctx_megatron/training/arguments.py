"""Megatron-LM's command-line flags -> the typed RunConfig, by one table; checked before any process group starts.

``FLAGS`` lists every flag once: its argparse options and the RunConfig field it sets
(``section.field``; ``model.overrides.<field>`` overrides that ModelConfig field on top of
``--config``). The parser and the RunConfig are both built from it, so a flag cannot be parsed and
then ignored. Defaults live in the RunConfig dataclasses only: a flag that is not given parses as
None and leaves its field at the default. This module is the only one that sees argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from longctx_megatron.data.tokenizers import TOKENIZER_TYPES
from longctx_megatron.model.attention import factory
from longctx_megatron.parallel.context import check_comm_type
from longctx_megatron.parallel.parallelize import RECOMPUTE_GRANULARITIES
from longctx_megatron.parallel.state import check_layout
from longctx_megatron.training.lr_schedule import DECAY_STYLES
from longctx_megatron.training.run_config import LoggingSection, RunConfig


@dataclass(frozen=True)
class Flag:
    """One command-line flag: argparse ``options`` and the RunConfig fields it sets. ``convert`` maps
    the parsed value to the field's (None leaves the field at its default)."""

    name: str
    targets: tuple[str, ...]
    options: dict = field(default_factory=dict)
    convert: Callable | None = None


def _model(name: str, target: str, kind, **options) -> Flag:
    return Flag(name, (f"model.overrides.{target}",), {"type": kind, **options})


GROUPS: dict[str, tuple[str, list[Flag]]] = {
    "model": ("model (override --config; default: the built-in tiny model)", [
        Flag("--config", ("model.config_file",), {"help": "model config, .yaml or .json"}),
        _model("--num-layers", "n_layers", int), _model("--hidden-size", "d_model", int),
        _model("--num-attention-heads", "n_heads", int), _model("--num-query-groups", "n_kv_heads", int),
        _model("--ffn-hidden-size", "d_ff", int), _model("--max-position-embeddings", "max_seq_len", int),
        # With --data-path, the tokenizer's id count (NullTokenizer's, as in Megatron) as well.
        Flag("--vocab-size", ("model.overrides.vocab_size", "data.vocab_size"), {"type": int}),
        _model("--attention-layout", "attention_layout", str), _model("--sliding-window", "sliding_window", int),
        _model("--global-every", "global_every", int), _model("--dilated-window", "dilated_window", int),
        _model("--dilation", "dilation", int), _model("--init-method-std", "init_std", float),
        _model("--hidden-dropout", "hidden_dropout", float), _model("--attention-dropout", "attention_dropout", float),
        _model("--rotary-base", "rope_theta", float, help="RoPE theta of every layer"),
        Flag("--untie-embeddings-and-output-weights", ("model.overrides.tie_embeddings",), {"action": "store_true"},
             convert=lambda untie: False if untie else None),
        Flag("--attention-backend", ("model.attention_backend",),
             {"choices": ["auto", *factory.list_variants()]}),
    ]),
    "parallel": ("parallelism", [
        Flag("--tensor-model-parallel-size", ("parallel.tensor",), {"type": int}),
        Flag("--pipeline-model-parallel-size", ("parallel.pipeline",), {"type": int}),
        Flag("--sequence-parallel", ("parallel.sequence_parallel",), {"action": "store_true"}),
        Flag("--context-parallel-size", ("parallel.context",), {
            "type": int, "help": "split every sample's sequence over this many ranks (zigzag; full layers receive "
            "their causal prefix's K/V, local ones a window halo)"}),
        Flag("--cp-comm-type", ("parallel.cp_comm_type",), {
            "help": "p2p (the causal prefix for full layers, a halo for local ones; default) or allgather "
            "(every layer gathers all K/V)"}),
        Flag("--pipeline-layer-split", ("parallel.pipeline_layer_split",),
             {"help": "layers per stage, e.g. 10,8,7,7 (default: by cost)"}),
        Flag("--num-layers-per-virtual-pipeline-stage", ("parallel.layers_per_virtual_stage",),
             {"type": int, "help": "interleaved 1F1B with this many layers per virtual stage"}),
        Flag("--use-distributed-optimizer", ("parallel.distributed_optimizer",), {
            "action": "store_true", "help": "shard Adam state and fp32 master weights over data-parallel ranks "
            "(ZeRO-1)"}),
        Flag("--distributed-backend", ("parallel.backend",), {"choices": ["nccl", "gloo"]}),
        Flag("--distributed-timeout-minutes", ("parallel.timeout_minutes",), {"type": float}),
        Flag("--recompute-granularity", ("parallel.recompute_granularity",),
             {"choices": RECOMPUTE_GRANULARITIES[1:]}),
    ]),
    "training": ("training", [
        Flag("--seq-length", ("training.seq_length",), {"type": int}),
        Flag("--micro-batch-size", ("training.micro_batch_size",), {"type": int}),
        Flag("--global-batch-size", ("training.global_batch_size",),
             {"type": int, "help": "default: micro batch size x data-parallel size"}),
        Flag("--train-iters", ("training.train_iters",), {"type": int}),
        Flag("--lr", ("training.lr",), {"type": float}),
        Flag("--min-lr", ("training.min_lr",), {"type": float}),
        Flag("--lr-decay-style", ("training.lr_decay_style",), {"choices": DECAY_STYLES}),
        Flag("--lr-warmup-iters", ("training.lr_warmup_iters",), {"type": int}),
        Flag("--lr-decay-iters", ("training.lr_decay_iters",), {"type": int, "help": "default: --train-iters"}),
        Flag("--weight-decay", ("training.weight_decay",), {"type": float}),
        Flag("--adam-beta1", ("training.adam_beta1",), {"type": float}),
        Flag("--adam-beta2", ("training.adam_beta2",), {"type": float}),
        Flag("--adam-eps", ("training.adam_eps",), {"type": float}),
        Flag("--clip-grad", ("training.clip_grad",),
             {"type": float, "help": "global gradient-norm clip (0: none)"}),
        Flag("--calculate-per-token-loss", ("training.calculate_per_token_loss",), {
            "action": "store_true", "help": "gradients of sum of token losses / unmasked tokens of the global batch "
            "(default, as in Megatron: of the mean over micro-batches and DP ranks of each micro-batch's token "
            "mean)"}),
        Flag("--bf16", ("training.precision",), {"action": "store_true"}, convert=lambda on: "bf16" if on else None),
        Flag("--fp16", ("training.precision",), {"action": "store_true"}, convert=lambda on: "fp16" if on else None),
        Flag("--initial-loss-scale", ("training.initial_loss_scale",),
             {"type": float, "help": "fp16 dynamic loss scale start"}),
        Flag("--seed", ("training.seed",), {"type": int}),
        Flag("--device", ("training.device",), {"help": "default: cuda when available, else cpu"}),
    ]),
    "data": ("data (default: the built-in corpus with the byte tokenizer)", [
        Flag("--data-path", ("data.data_path",), {"nargs": "+", "help": "prefix, or weight prefix pairs: 0.3 dataA "
                                                  "0.7 dataB"}, convert=lambda paths: tuple(paths) if paths else None),
        Flag("--split", ("data.split",)),
        Flag("--tokenizer-type", ("data.tokenizer_type",), {"choices": TOKENIZER_TYPES}),
        Flag("--tokenizer-model", ("data.tokenizer_model",)),
        Flag("--data-cache-path", ("data.data_cache_path",)),
        Flag("--reset-position-ids", ("data.reset_position_ids",), {"action": "store_true"}),
        Flag("--reset-attention-mask", ("data.reset_attention_mask",), {"action": "store_true"}),
        Flag("--eod-mask-loss", ("data.eod_mask_loss",), {"action": "store_true"}),
    ]),
    "checkpointing": ("checkpointing and recovery (give --save and --load the same directory to resume "
                      "automatically)", [
        Flag("--save", ("checkpointing.save",),
             {"help": "directory for checkpoints: iter_NNNNNNN/ and latest_checkpointed_iteration.txt"}),
        Flag("--save-interval", ("checkpointing.save_interval",), {"type": int, "help": "iterations between "
             "checkpoints (one is always saved at the end and on preemption)"}),
        Flag("--keep-last", ("checkpointing.keep_last",), {"type": int, "help": "keep only the newest N checkpoints"}),
        Flag("--async-save", ("checkpointing.async_save",),
             {"action": "store_true", "help": "write checkpoints in the background"}),
        Flag("--load", ("checkpointing.load",),
             {"help": "resume from the newest sound checkpoint here (none yet: start fresh)"}),
        Flag("--ckpt-step", ("checkpointing.ckpt_step",),
             {"type": int, "help": "load this iteration instead of the newest"}),
        Flag("--finetune", ("checkpointing.finetune",),
             {"action": "store_true", "help": "load weights only; start at iteration 0"}),
        Flag("--no-load-optim", ("checkpointing.no_load_optim",),
             {"action": "store_true", "help": "do not load optimizer state"}),
        Flag("--no-load-rng", ("checkpointing.no_load_rng",), {"action": "store_true", "help": "do not load RNG "
                                                               "states"}),
        Flag("--exit-interval", ("checkpointing.exit_interval",),
             {"type": int, "help": "save and exit when the iteration is a multiple of this"}),
        Flag("--exit-duration-in-mins", ("checkpointing.exit_duration_in_mins",),
             {"type": float, "help": "save and exit after this many minutes"}),
        Flag("--max-skipped-iters-in-a-row", ("checkpointing.max_skipped_iters_in_a_row",),
             {"type": int, "help": "stop after this many consecutive non-finite steps (0: never)"}),
    ]),
    "logging": ("logging and evaluation", [
        Flag("--log-interval", ("logging.log_interval",), {"type": int}),
        Flag("--eval-interval", ("logging.eval_interval",),
             {"type": int, "help": "0: evaluate only after training"}),
        Flag("--eval-iters", ("logging.eval_iters",), {"type": int}),
        Flag("--eval-longctx-interval", ("logging.eval_longctx_interval",),
             {"type": int, "help": "score a small passkey/needle retrieval grid every N iterations and log it "
              "(TensorBoard: retrieval/<task>/...); 0: never"}),
        Flag("--eval-longctx-lengths", ("logging.eval_longctx_lengths",),
             {"type": int, "nargs": "+", "help": "context lengths of the grid (default: --seq-length, or "
              "max_seq_len - 16 if shorter)"}, convert=lambda values: tuple(values) if values else None),
        Flag("--eval-longctx-depths", ("logging.eval_longctx_depths",),
             {"type": float, "nargs": "+", "help": "depths of the fact, 0 (start) .. 1 (end); default 0 0.5 1"},
             convert=lambda values: tuple(values) if values else None),
        Flag("--eval-longctx-samples", ("logging.eval_longctx_samples",), {"type": int, "help": "cases per cell"}),
        Flag("--eval-longctx-tasks", ("logging.eval_longctx_tasks",),
             {"nargs": "+", "help": "passkey and/or needle (default: both)"},
             convert=lambda values: tuple(values) if values else None),
        Flag("--tensorboard-dir", ("logging.tensorboard_dir",)),
        Flag("--peak-tflops", ("logging.peak_tflops",),
             {"type": float, "help": "device peak for MFU (default: known GPUs only)"}),
    ]),
}
FLAGS = [flag for _, flags in GROUPS.values() for flag in flags]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pre-train a long-context GPT. With no flags: the built-in tiny model on the built-in corpus.",
        allow_abbrev=False,
    )
    for title, flags in GROUPS.values():
        group = parser.add_argument_group(title)
        for flag in flags:
            group.add_argument(flag.name, **flag.options)
    return parser


def run_config(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The checked RunConfig of parsed flags ``args`` for a job of ``world_size`` processes."""
    sections: dict[str, dict] = {"model": {"overrides": {}}, "parallel": {}, "training": {}, "data": {},
                                 "checkpointing": {}, "logging": {}}
    for flag in FLAGS:
        value = getattr(args, flag.name.removeprefix("--").replace("-", "_"))
        value = flag.convert(value) if flag.convert else value
        if value is None:
            continue
        for target in flag.targets:
            section, name = target.split(".", 1)
            if name.startswith("overrides."):
                sections[section]["overrides"][name.removeprefix("overrides.")] = value
            else:
                sections[section][name] = value
    defaults = RunConfig()
    run = RunConfig(world_size=world_size, **{name: dataclasses.replace(getattr(defaults, name), **values)
                                              for name, values in sections.items()})
    validate(run, precision_clash=args.bf16 and args.fp16)  # both set training.precision
    return run


def parse_run_config(argv: list[str] | None, world_size: int) -> RunConfig:
    """``run_config`` of a command line (None: sys.argv)."""
    return run_config(build_parser().parse_args(argv), world_size)


_FLAG_OF = {target: flag.name for flag in FLAGS for target in flag.targets}


def validate(run: RunConfig, precision_clash: bool = False) -> None:
    """Contradictions and impossible layouts, reported (by flag) before any work starts
    (``precision_clash``: both --bf16 and --fp16 were given)."""

    def fail(message: str):
        raise ValueError(message)

    def value(target: str):
        section, name = target.split(".")
        return getattr(getattr(run, section), name)

    parallel, training, data, ckpt = run.parallel, run.training, run.data, run.checkpointing
    for target in ("parallel.tensor", "parallel.pipeline", "parallel.context", "training.seq_length",
                   "training.micro_batch_size", "training.train_iters", "logging.log_interval", "logging.eval_iters"):
        if value(target) <= 0:
            fail(f"{_FLAG_OF[target]} must be positive, got {value(target)}")
    if training.clip_grad < 0:
        fail(f"--clip-grad must be >= 0 (0: no clipping), got {training.clip_grad}")
    if precision_clash:
        fail("--bf16 and --fp16 are exclusive")
    if parallel.sequence_parallel and parallel.tensor == 1:
        fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
    check_layout(run.world_size, parallel.tensor, parallel.pipeline, None, parallel.context)
    check_comm_type(parallel.cp_comm_type, parallel.context)
    if parallel.context > 1:
        if training.seq_length % (2 * parallel.context):
            fail(f"--context-parallel-size {parallel.context} needs --seq-length ({training.seq_length}) divisible "
                 f"by 2 x {parallel.context} (the zigzag split's chunks)")
    if run.global_batch % (training.micro_batch_size * run.data_parallel):
        fail(f"--global-batch-size {run.global_batch} must be a multiple of --micro-batch-size x data-parallel size "
             f"= {training.micro_batch_size} x {run.data_parallel}")
    if parallel.sequence_parallel and (training.seq_length // parallel.context) % parallel.tensor:
        fail(f"--sequence-parallel needs --seq-length ({training.seq_length})"
             + (f" / --context-parallel-size ({parallel.context})" if parallel.context > 1 else "")
             + f" divisible by --tensor-model-parallel-size ({parallel.tensor})")
    if parallel.layers_per_virtual_stage is not None:
        if parallel.pipeline == 1:
            fail("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if parallel.pipeline_layer_split:
            fail("--pipeline-layer-split and --num-layers-per-virtual-pipeline-stage are exclusive")
        if run.microbatches % parallel.pipeline:
            fail(f"the interleaved schedule needs the micro-batches per step ({run.microbatches}) to be a multiple "
                 f"of --pipeline-model-parallel-size ({parallel.pipeline})")
    if data.data_path and not data.tokenizer_type:
        fail("--data-path needs --tokenizer-type (and --tokenizer-model for SentencePiece/HuggingFace)")
    if not data.data_path and data.tokenizer_type:
        fail("--tokenizer-type is only used with --data-path (the built-in corpus uses bytes)")
    for target in ("checkpointing.save_interval", "checkpointing.keep_last", "checkpointing.exit_interval",
                   "checkpointing.exit_duration_in_mins"):
        if value(target) is not None and value(target) <= 0:
            fail(f"{_FLAG_OF[target]} must be positive, got {value(target)}")
    for target in ("checkpointing.save_interval", "checkpointing.keep_last", "checkpointing.async_save"):
        if value(target) and not ckpt.save:
            fail(f"{_FLAG_OF[target]} needs --save")
    for target in ("checkpointing.ckpt_step", "checkpointing.finetune", "checkpointing.no_load_optim",
                   "checkpointing.no_load_rng"):
        if value(target) not in (None, False) and not ckpt.load:
            fail(f"{_FLAG_OF[target]} needs --load")
    for flag, path in (("--save", ckpt.save), ("--load", ckpt.load)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            fail(f"{flag} {path}: exists and is not a directory")
    if run.logging.eval_longctx_interval < 0:
        fail(f"--eval-longctx-interval must be >= 0 (0: never), got {run.logging.eval_longctx_interval}")
    if run.logging.eval_longctx_samples < 1:
        fail(f"--eval-longctx-samples must be >= 1, got {run.logging.eval_longctx_samples}")
    if not run.logging.eval_longctx_interval:
        for target in ("logging.eval_longctx_lengths", "logging.eval_longctx_depths", "logging.eval_longctx_samples",
                       "logging.eval_longctx_tasks"):
            if value(target) != getattr(LoggingSection(), target.split(".")[1]):
                fail(f"{_FLAG_OF[target]} needs --eval-longctx-interval (the grid runs only with it)")
    if run.model.config_file and not os.path.isfile(run.model.config_file):
        fail(f"--config {run.model.config_file}: no such file")
