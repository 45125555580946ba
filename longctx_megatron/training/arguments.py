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
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from longctx_megatron.config.megatron_args import MegatronArchitecture
from longctx_megatron.data.tokenizers import TOKENIZER_TYPES
from longctx_megatron.model.attention import factory
from longctx_megatron.parallel.context import check_comm_type
from longctx_megatron.parallel.parallelize import RECOMPUTE_GRANULARITIES
from longctx_megatron.parallel.state import check_layout
from longctx_megatron.training.lr_schedule import DECAY_STYLES
from longctx_megatron.training.megatron_compat import add_no_effect_flags, no_effect_given, refused_flags
from longctx_megatron.training.run_config import LoggingSection, RunConfig

# Megatron's --attention-backend names -> ours: fused (cuDNN) -> the compiled FlexAttention kernel,
# unfused and local (materialised scores) -> the reference.
MEGATRON_BACKENDS = {"fused": "flex", "unfused": "reference", "local": "reference"}


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


def _arch(name: str, kind=None, **options) -> Flag:
    """A Megatron architecture flag, under Megatron's dest name (config/megatron_args.MegatronArchitecture)."""
    dest = options.pop("dest", name.removeprefix("--").replace("-", "_"))
    if kind is bool:
        return _switch(name, f"model.megatron.{dest}", options.get("help"))
    return Flag(name, (f"model.megatron.{dest}",), {"type": kind, **options} if kind else options)


def _switch(name: str, target: str, help: str | None = None) -> Flag:
    return Flag(name, (target,), {"action": "store_true", **({"help": help} if help else {})},
                convert=lambda on: True if on else None)


def _skip_freq(text: str) -> int | list[int]:
    """Megatron's --window-attn-skip-freq: an integer, or a list expression of 0/1 lists joined by + and
    repeated by * N, with parentheses, such as "([1]*3+[0]*1)*3". Megatron evaluates it as Python; here
    that grammar alone is parsed and nothing is evaluated."""
    compact = text.replace(" ", "")
    if compact.isdigit():
        return int(compact)
    tokens = re.findall(r"\d+|[][()+*,]", compact)
    if "".join(tokens) != compact:
        raise argparse.ArgumentTypeError(f"expected an integer or a 0/1 list such as [1,1,1,0]*3, got {text!r}")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal position
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r}: expected {expected or 'more'} at "
                                             f"token {position + 1}")
        position += 1
        return token

    def atom() -> list[int]:
        if peek() == "(":
            take("(")
            value = total()
            take(")")
            return value
        take("[")
        values = [int(take())]
        while peek() == ",":
            take(",")
            values.append(int(take()))
        take("]")
        if any(value not in (0, 1) for value in values):
            raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r}: list entries must be 0 or 1")
        return values

    def term() -> list[int]:
        value = atom()
        while peek() == "*":
            take("*")
            count = take()
            if not count.isdigit():
                raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r}: * needs a count")
            value = value * int(count)
        return value

    def total() -> list[int]:
        value = term()
        while peek() == "+":
            take("+")
            value = value + term()
        return value

    result = total()
    if peek() is not None:
        raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r}: unexpected {peek()!r}")
    return result


def _window(text: str) -> tuple[int, ...]:
    """Megatron's --window-size: "L,R" or "(L,R)"."""
    try:
        return tuple(int(part) for part in text.strip("()").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers such as 4095,0, got {text!r}") from None


GROUPS: dict[str, tuple[str, list[Flag]]] = {
    "model": ("model: Megatron's architecture flags, with Megatron's meanings and defaults. Without --config, "
              "--num-layers, --hidden-size and --num-attention-heads describe the whole model as Megatron "
              "builds it (causal attention in every layer unless --window-size or --attention-layout); otherwise "
              "the flags adjust --config or the built-in model", [
        Flag("--config", ("model.config_file",), {"help": "model config, .yaml or .json"}),
        _arch("--num-layers", int), _arch("--hidden-size", int), _arch("--num-attention-heads", int),
        _arch("--group-query-attention", bool),
        _arch("--num-query-groups", int, help="KV heads (with --group-query-attention, as in Megatron)"),
        _arch("--ffn-hidden-size", int, help="default as Megatron: 4h, with --swiglu 2/3 of it rounded down to 64"),
        _arch("--kv-channels", int, help="must be --hidden-size / --num-attention-heads"),
        _arch("--max-position-embeddings", int),
        _arch("--swiglu", bool, help="required: the MLP is SwiGLU (Megatron's default is GeLU)"),
        _arch("--normalization", choices=["LayerNorm", "RMSNorm"],
              help="RMSNorm required (Megatron's default LayerNorm is refused)"),
        _arch("--norm-epsilon", float),
        _arch("--apply-layernorm-1p", bool, help="norm weights hold gamma - 1 (zero-centred)"),
        _arch("--position-embedding-type", choices=["learned_absolute", "rope", "yarn", "mrope", "relative", "none"],
              help="rope required (Megatron's default learned_absolute is refused)"),
        Flag("--use-rotary-position-embeddings", ("model.megatron.position_embedding_type",),
             {"action": "store_true", "help": "Megatron's older spelling of --position-embedding-type rope"},
             convert=lambda on: "rope" if on else None),
        _arch("--rotary-percent", float, help="1.0 required"), _arch("--rotary-base", float),
        _arch("--rotary-interleaved", bool, help="refused: RoPE here is rotate-half"),
        Flag("--disable-bias-linear", ("model.megatron.add_bias_linear",), {
            "action": "store_true", "help": "required: no biases (Megatron adds them by default)"},
            convert=lambda on: False if on else None),
        _arch("--add-qkv-bias", bool, help="refused"), _arch("--qk-layernorm", bool, help="refused"),
        _arch("--untie-embeddings-and-output-weights", bool),
        _arch("--hidden-dropout", float), _arch("--attention-dropout", float),
        _arch("--init-method-std", float),
        _arch("--window-size", _window, help="L,0: every layer a sliding window of L+1 keys (Megatron's)"),
        _arch("--window-attn-skip-freq", _skip_freq, help="N: every N-th layer full attention, the rest "
              "--window-size; or a list such as [1,1,1,0]*3 (1 sliding, 0 full)"),
        _arch("--use-rope-scaling", bool, help="Llama-3.1's RoPE scaling (megatron-core's parameters)"),
        _arch("--rope-scaling-factor", float),
        Flag("--make-vocab-size-divisible-by", ("model.make_vocab_size_divisible_by",), {
            "type": int, "help": "pad the tokenizer's vocabulary to a multiple of this (Megatron multiplies it by "
            "the TP size; here the model does not depend on the layout)"}),
        # With --data-path, the tokenizer's id count (NullTokenizer's, as in Megatron) as well.
        Flag("--vocab-size", ("model.overrides.vocab_size", "data.vocab_size"), {"type": int}),
        _model("--attention-layout", "attention_layout", str,
               help="this project's layer plan, e.g. sliding:16,dilated:12,full:4"),
        _model("--sliding-window", "sliding_window", int), _model("--global-every", "global_every", int),
        _model("--dilated-window", "dilated_window", int), _model("--dilation", "dilation", int),
        Flag("--attention-backend", ("model.attention_backend",), {
            "choices": ["auto", *factory.list_variants(), *MEGATRON_BACKENDS],
            "help": "Megatron's names map to ours: " + ", ".join(f"{k} -> {v}" for k, v in MEGATRON_BACKENDS.items())},
            convert=lambda name: MEGATRON_BACKENDS.get(name, name)),
        Flag("--use-flash-attn", ("model.attention_backend",), {"action": "store_true", "help": "--attention-backend "
             "flash"}, convert=lambda on: "flash" if on else None),
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
        Flag("--recompute-activations", ("parallel.recompute_granularity",),
             {"action": "store_true", "help": "--recompute-granularity selective (Megatron's)"},
             convert=lambda on: "selective" if on else None),
        Flag("--recompute-method", ("parallel.recompute_method",), {
            "choices": ["uniform", "block"], "help": "with --recompute-granularity full: uniform recomputes groups of "
            "--recompute-num-layers layers, block the first --recompute-num-layers layers of each stage"}),
        Flag("--recompute-num-layers", ("parallel.recompute_num_layers",), {"type": int}),
    ]),
    "training": ("training", [
        Flag("--seq-length", ("training.seq_length",), {"type": int}),
        Flag("--micro-batch-size", ("training.micro_batch_size",), {"type": int}),
        Flag("--global-batch-size", ("training.global_batch_size",),
             {"type": int, "help": "default: micro batch size x data-parallel size"}),
        Flag("--train-iters", ("training.train_iters",), {"type": int}),
        Flag("--train-samples", ("training.train_samples",), {
            "type": int, "help": "train for this many samples instead of --train-iters; the schedule counts samples"}),
        Flag("--lr", ("training.lr",), {"type": float}),
        Flag("--min-lr", ("training.min_lr",), {"type": float}),
        Flag("--lr-decay-style", ("training.lr_decay_style",), {"choices": DECAY_STYLES}),
        Flag("--lr-warmup-iters", ("training.lr_warmup_iters",), {"type": int}),
        Flag("--lr-decay-iters", ("training.lr_decay_iters",), {"type": int, "help": "default: --train-iters"}),
        Flag("--lr-warmup-samples", ("training.lr_warmup_samples",), {"type": int}),
        Flag("--lr-decay-samples", ("training.lr_decay_samples",), {"type": int, "help": "default: --train-samples"}),
        Flag("--lr-warmup-fraction", ("training.lr_warmup_fraction",),
             {"type": float, "help": "warm-up over this fraction of the decay span"}),
        Flag("--decoupled-lr", ("training.decoupled_lr",),
             {"type": float, "help": "peak lr of the embedding and output layer"}),
        Flag("--decoupled-min-lr", ("training.decoupled_min_lr",), {"type": float}),
        Flag("--weight-decay", ("training.weight_decay",), {"type": float}),
        Flag("--adam-beta1", ("training.adam_beta1",), {"type": float}),
        Flag("--adam-beta2", ("training.adam_beta2",), {"type": float}),
        Flag("--adam-eps", ("training.adam_eps",), {"type": float}),
        Flag("--memory-per-device", ("training.memory_per_device",), {
            "type": float, "help": "GiB each process may use (default on CUDA: the device's capacity; 0: no check); "
            "a run whose estimated peak (longctx_megatron/memory) exceeds it is refused before any process group "
            "starts"}),
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
        Flag("--mock-data", ("data.mock_data",), {"action": "store_true", "help": "synthetic samples instead of "
             "a corpus (Megatron's MockGPTDataset)"}),
        # Shell scripts pass "--split '99,1,0'" unquoted, leaving the quotes in the value.
        Flag("--split", ("data.split",), convert=lambda text: text.strip("'\"") if text else None),
        Flag("--tokenizer-type", ("data.tokenizer_type",), {"choices": TOKENIZER_TYPES}),
        Flag("--tokenizer-model", ("data.tokenizer_model",)),
        Flag("--vocab-file", ("data.vocab_file",), {"help": "GPT2BPETokenizer's vocab.json"}),
        Flag("--merge-file", ("data.merge_file",), {"help": "GPT2BPETokenizer's merges.txt"}),
        Flag("--tiktoken-pattern", ("data.tiktoken_pattern",), {"choices": ["v1", "v2"]}),
        Flag("--tiktoken-num-special-tokens", ("data.tiktoken_num_special_tokens",), {"type": int}),
        Flag("--tiktoken-special-tokens", ("data.tiktoken_special_tokens",), {"nargs": "+"},
             convert=lambda values: tuple(values) if values else None),
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
        Flag("--tensorboard-log-interval", ("logging.tensorboard_log_interval",), {"type": int}),
        Flag("--peak-tflops", ("logging.peak_tflops",),
             {"type": float, "help": "device peak for MFU (default: known GPUs only)"}),
        _switch("--log-throughput", "logging.log_throughput", "Megatron's 'throughput per GPU (TFLOP/s/GPU)' in "
                "the log line (and TensorBoard 'throughput' with --log-timers-to-tensorboard)"),
        _switch("--log-params-norm", "logging.log_params_norm", "the parameters' global L2 norm"),
        _switch("--log-num-zeros-in-grad", "logging.log_num_zeros_in_grad", "zeros in the gradients"),
        _switch("--log-validation-ppl-to-tensorboard", "logging.log_validation_ppl_to_tensorboard"),
        _switch("--log-memory-to-tensorboard", "logging.log_memory_to_tensorboard"),
        _switch("--log-timers-to-tensorboard", "logging.log_timers_to_tensorboard"),
        _switch("--log-world-size-to-tensorboard", "logging.log_world_size_to_tensorboard"),
        Flag("--no-log-loss-scale-to-tensorboard", ("logging.log_loss_scale_to_tensorboard",),
             {"action": "store_true"}, convert=lambda on: False if on else None),
        Flag("--timing-log-level", ("logging.timing_log_level",), {"type": int, "choices": [0, 1, 2], "help": "0: no "
             "timers; 1: forward-backward, all-grads-sync, optimizer (and its parts); 2: as 1 plus "
             "batch-generator, forward-/backward-compute and pipeline receives (Megatron's names)"}),
        Flag("--wandb-project", ("logging.wandb_project",), {"help": "log to Weights & Biases (wandb must be "
             "installed; WANDB_MODE=offline works without a server)"}),
        Flag("--wandb-exp-name", ("logging.wandb_exp_name",)),
        Flag("--wandb-save-dir", ("logging.wandb_save_dir",)),
        Flag("--wandb-entity", ("logging.wandb_entity",)),
        _switch("--profile", "logging.profile", "profile iterations --profile-step-start .. --profile-step-end: "
                "an Nsight Systems range (cudaProfilerStart/Stop) on CUDA, as Megatron"),
        _switch("--use-pytorch-profiler", "logging.use_pytorch_profiler", "with --profile: a torch.profiler trace "
                "written to <--tensorboard-dir>/../torch_profile (as Megatron)"),
        Flag("--profile-step-start", ("logging.profile_step_start",), {"type": int}),
        Flag("--profile-step-end", ("logging.profile_step_end",), {"type": int}),
        Flag("--profile-ranks", ("logging.profile_ranks",), {"type": int, "nargs": "+", "help": "default: every rank"},
             convert=lambda values: tuple(values) if values else None),
    ]),
}
FLAGS = [flag for _, flags in GROUPS.values() for flag in flags]
_DEST = {flag.name: flag.options.get("dest", flag.name.removeprefix("--").replace("-", "_")) for flag in FLAGS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pre-train a long-context GPT. With no flags: the built-in tiny model on the built-in corpus.",
        allow_abbrev=False,
    )
    for title, flags in GROUPS.values():
        group = parser.add_argument_group(title)
        for flag in flags:
            group.add_argument(flag.name, **flag.options)
    add_no_effect_flags(parser)
    return parser


def run_config(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The checked RunConfig of parsed flags ``args`` for a job of ``world_size`` processes."""
    sections: dict[str, dict] = {"model": {"overrides": {}, "megatron": {}}, "parallel": {}, "training": {},
                                 "data": {}, "checkpointing": {}, "logging": {}}
    for flag in FLAGS:
        value = getattr(args, _DEST[flag.name])
        value = flag.convert(value) if flag.convert else value
        if value is None:
            continue
        for target in flag.targets:
            section, name = target.split(".", 1)
            for nested in ("overrides.", "megatron."):
                if name.startswith(nested):
                    sections[section][nested[:-1]][name.removeprefix(nested)] = value
                    break
            else:
                sections[section][name] = value
    notices = [f"accepted for compatibility, no effect here: {flag}" for flag in no_effect_given(args)]
    parallel, training = sections["parallel"], sections["training"]
    if parallel.get("sequence_parallel") and parallel.get("tensor", 1) == 1:
        parallel["sequence_parallel"] = False  # as Megatron: SP at TP 1 would only change the numerics
        notices.append("--sequence-parallel is turned off: --tensor-model-parallel-size is 1 (as Megatron does)")
    if sections["data"].get("mock_data") and "split" in sections["data"]:
        notices.append("--split has no effect with --mock-data (as in Megatron: mock data is split 1,1,1)")
    if training.get("train_samples") is not None:
        if args.train_iters is not None:
            raise ValueError("--train-iters and --train-samples are exclusive (as in Megatron)")
        if args.lr_decay_iters is not None or args.lr_warmup_iters:  # Megatron asserts None and 0
            raise ValueError("with --train-samples the schedule counts samples: use --lr-decay-samples and "
                             "--lr-warmup-samples (or --lr-warmup-fraction), not the -iters flags")
    elif args.lr_decay_samples is not None or args.lr_warmup_samples:
        raise ValueError("--lr-decay-samples / --lr-warmup-samples need --train-samples (use the -iters flags with "
                         "--train-iters)")
    if args.lr_warmup_fraction is not None and (args.lr_warmup_iters or args.lr_warmup_samples):
        raise ValueError("--lr-warmup-fraction and --lr-warmup-iters / --lr-warmup-samples are exclusive")
    defaults = RunConfig()
    run = RunConfig(world_size=world_size, **{name: dataclasses.replace(getattr(defaults, name), **values)
                                              for name, values in sections.items()})
    megatron = run.model.megatron
    if run.model.from_megatron_flags and "num_query_groups" in megatron and not megatron.get("group_query_attention"):
        notices.append("--num-query-groups has no effect without --group-query-attention (as in Megatron): "
                       "every query head has its own KV head")
    run = dataclasses.replace(run, notices=tuple(notices))
    if run.training.train_samples is not None:
        if run.training.train_samples < run.global_batch:
            raise ValueError(f"--train-samples {run.training.train_samples} is less than one global batch "
                             f"({run.global_batch})")
        run = dataclasses.replace(run, training=dataclasses.replace(
            run.training, train_iters=run.training.train_samples // run.global_batch))
    validate(run, precision_clash=args.bf16 and args.fp16)  # both set training.precision
    return run


def parse_run_config(argv: list[str] | None, world_size: int) -> RunConfig:
    """``run_config`` of a command line (None: sys.argv); refused Megatron flags are named before parsing."""
    refused = refused_flags(sys.argv[1:] if argv is None else argv)
    if refused:
        raise ValueError("refused Megatron-LM flags: " + "; ".join(refused))
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
    if run.model.from_megatron_flags:  # the architecture first: nothing else matters if it cannot be built
        MegatronArchitecture(**run.model.megatron).check()
    length = run.model.megatron.get("max_position_embeddings")
    if length is not None and length < training.seq_length:
        fail(f"--max-position-embeddings {length} is less than --seq-length {training.seq_length} (Megatron asserts "
             "the same)")
    if training.min_lr > training.lr:
        fail(f"--min-lr {training.min_lr} exceeds --lr {training.lr} (Megatron asserts min_lr <= lr)")
    for target in ("parallel.tensor", "parallel.pipeline", "parallel.context", "training.seq_length",
                   "training.micro_batch_size", "training.train_iters", "logging.log_interval", "logging.eval_iters"):
        if value(target) <= 0:
            fail(f"{_FLAG_OF[target]} must be positive, got {value(target)}")
    if training.clip_grad < 0:
        fail(f"--clip-grad must be >= 0 (0: no clipping), got {training.clip_grad}")
    if precision_clash:
        fail("--bf16 and --fp16 are exclusive")
    if parallel.recompute_method is not None and parallel.recompute_granularity != "full":
        fail("--recompute-method needs --recompute-granularity full (as in Megatron)")
    if parallel.recompute_num_layers is not None:
        if parallel.recompute_method is None:
            fail("--recompute-num-layers needs --recompute-method uniform or block")
        if parallel.recompute_num_layers < 1:
            fail(f"--recompute-num-layers must be positive, got {parallel.recompute_num_layers}")
        if parallel.recompute_method == "uniform" and parallel.recompute_num_layers != 1:
            fail("--recompute-method uniform with --recompute-num-layers > 1 (groups of layers recomputed as one) is "
                 "not supported: use 1 (every layer) or --recompute-method block")
    if parallel.recompute_method == "block" and parallel.recompute_num_layers is None:
        fail("--recompute-method block needs --recompute-num-layers (layers recomputed per stage)")
    for target in ("training.decoupled_lr", "training.decoupled_min_lr", "training.lr_warmup_fraction"):
        if value(target) is not None and value(target) < 0:
            fail(f"{_FLAG_OF[target]} must be >= 0, got {value(target)}")
    if training.decoupled_min_lr is not None and training.decoupled_lr is None:
        fail("--decoupled-min-lr needs --decoupled-lr")
    if data.mock_data and data.data_path:
        fail("--mock-data and --data-path are exclusive")
    if run.logging.profile and run.logging.profile_step_end <= run.logging.profile_step_start:
        fail(f"--profile-step-end ({run.logging.profile_step_end}) must be after --profile-step-start "
             f"({run.logging.profile_step_start})")
    if run.logging.tensorboard_log_interval <= 0:
        fail(f"--tensorboard-log-interval must be positive, got {run.logging.tensorboard_log_interval}")
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
    if (data.data_path or data.mock_data) and not data.tokenizer_type:
        fail(f"{'--data-path' if data.data_path else '--mock-data'} needs --tokenizer-type (and its files: "
             "--tokenizer-model, or --vocab-file and --merge-file)")
    if not (data.data_path or data.mock_data) and data.tokenizer_type:
        fail("--tokenizer-type is only used with --data-path or --mock-data (the built-in corpus uses bytes)")
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
