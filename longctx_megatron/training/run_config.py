"""The typed configuration of a training run, in sections; built from Megatron's flags by arguments.py.

Code below the entry point reads these dataclasses, never an argparse Namespace. Values derived
from several settings (the global batch size, micro-batches per step, the process-group backend,
the parameter dtype) are defined here once, as properties or methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from longctx_megatron.config import ModelConfig, load_config
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.megatron_args import MegatronArchitecture, adjustments
from longctx_megatron.parallel.state import default_backend


def demo_config() -> ModelConfig:
    """A 4-layer model with every attention pattern, sized to train in about a minute on 2 CPU cores."""
    return ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=320, max_seq_len=4096,
        sliding_window=128, global_every=64, dilated_window=64, dilation=2,
    )


# Megatron's size flags: given together without --config, they describe the whole model (as Megatron reads them).
MEGATRON_SIZE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads")


@dataclass(frozen=True)
class ModelSection:
    """Where the model config comes from, and the model flags given.

    ``megatron`` holds Megatron's architecture flags that were given (MegatronArchitecture field ->
    value); ``overrides`` this project's own model flags (ModelConfig field -> value: the layer plan,
    --vocab-size). Without ``config_file``, Megatron's three size flags together make the model
    Megatron would build from the flags (config/megatron_args.py: full attention in every layer,
    Megatron's defaults); otherwise the flags adjust ``config_file`` (or the built-in default).
    """

    config_file: str | None = None
    overrides: dict = field(default_factory=dict)
    megatron: dict = field(default_factory=dict)
    attention_backend: str = "auto"
    make_vocab_size_divisible_by: int = 128

    @property
    def from_megatron_flags(self) -> bool:
        """Whether the model is the one Megatron builds from the flags (no --config, all three size flags)."""
        return not self.config_file and all(name in self.megatron for name in MEGATRON_SIZE_FIELDS)

    def resolve(self, default: ModelConfig, seq_length: int) -> ModelConfig:
        """The model: Megatron's from the flags, or ``config_file`` (else ``default``) adjusted by them;
        max_seq_len grows to the training sequence length unless it was given. ConfigError names what
        this model cannot build."""
        overrides = dict(self.overrides)
        if self.from_megatron_flags:
            config = MegatronArchitecture(**self.megatron).model_config(default.vocab_size, seq_length)
        else:
            config = load_config(self.config_file) if self.config_file else default
            adjusted = adjustments(config, self.megatron)
            clash = {"attention_layout", "sliding_window", "global_every"} & adjusted.keys() & overrides.keys()
            if clash:
                raise ConfigError("--window-size (Megatron's window in every layer) and this project's layer plan "
                                  f"flags ({', '.join(sorted(clash))}) are exclusive")
            overrides.update(adjusted)
        if "attention_layout" in overrides:
            overrides["layers"] = None
        given_length = "max_position_embeddings" in self.megatron
        if "max_seq_len" not in overrides and not given_length and seq_length > config.max_seq_len:
            overrides["max_seq_len"] = seq_length
        return dataclasses.replace(config, **overrides) if overrides else config


@dataclass(frozen=True)
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False
    pipeline_layer_split: str | None = None
    layers_per_virtual_stage: int | None = None
    distributed_optimizer: bool = False
    backend: str | None = None  # None: nccl on CUDA, gloo otherwise (see backend_for)
    timeout_minutes: float = 10.0
    recompute_granularity: str = "none"
    recompute_method: str | None = None  # full recomputation: "uniform" or "block" (Megatron's)
    recompute_num_layers: int | None = None  # uniform: layers per recomputed group; block: layers recomputed per stage
    context: int = 1  # --context-parallel-size: ranks sharing every sample's sequence (parallel/context.py)
    cp_comm_type: str = "p2p"

    @property
    def recompute_first_layers(self) -> int | None:
        """Full recomputation of only the first N layers of each model chunk (``--recompute-method block``);
        None: every layer."""
        return self.recompute_num_layers if self.recompute_method == "block" else None

    def backend_for(self, device: torch.device) -> str:
        """The process-group backend: the one asked for, else the device's (parallel/state.default_backend)."""
        return self.backend or default_backend(device)


@dataclass(frozen=True)
class TrainingSection:
    seq_length: int = 1024
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro batch size x data-parallel size
    # Megatron has no defaults for these two (its --train-iters or --train-samples and --lr are required).
    train_iters: int = 60
    lr: float = 3e-3
    # The rest are Megatron-LM's defaults.
    train_samples: int | None = None  # instead of train_iters: iterations = train_samples // global batch
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_warmup_samples: int = 0  # with train_samples: the schedule counts samples
    lr_decay_samples: int | None = None  # None: train_samples
    lr_warmup_fraction: float | None = None  # warm-up = this fraction of the decay span
    decoupled_lr: float | None = None  # embedding and output layer's peak lr (None: lr)
    decoupled_min_lr: float | None = None  # their min lr (None: min_lr)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    calculate_per_token_loss: bool = False
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    initial_loss_scale: float = 2.0**32
    seed: int = 1234
    device: str | None = None
    memory_per_device: float | None = None  # GiB per process; None: the CUDA device's capacity (no check on CPU)

    def global_batch(self, data_parallel: int) -> int:
        """Samples per iteration over all DP ranks: the one definition."""
        return self.global_batch_size or self.micro_batch_size * data_parallel

    def microbatches(self, data_parallel: int) -> int:
        """Micro-batches each DP rank runs per iteration: the one definition."""
        return self.global_batch(data_parallel) // (self.micro_batch_size * data_parallel)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    def lr_schedule(self, global_batch: int) -> tuple[int, float, int]:
        """(samples per update, warm-up, decay) of the learning-rate schedule in samples, as Megatron's
        scheduler counts them (iterations x the global batch when given in iterations; the warm-up
        fraction of the decay span kept as a float)."""
        if self.train_samples:
            decay, warmup = self.lr_decay_samples or self.train_samples, self.lr_warmup_samples
        else:
            decay, warmup = self.decay_iters * global_batch, self.lr_warmup_iters * global_batch
        if self.lr_warmup_fraction is not None:
            warmup = self.lr_warmup_fraction * decay
        return global_batch, warmup, decay

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


@dataclass(frozen=True)
class DataSection:
    data_path: tuple[str, ...] | None = None  # None: the built-in corpus with the byte tokenizer
    split: str = "969,30,1"
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None  # GPT2BPETokenizer's vocab.json
    merge_file: str | None = None  # GPT2BPETokenizer's merges.txt
    tiktoken_pattern: str | None = None
    tiktoken_num_special_tokens: int | None = None
    tiktoken_special_tokens: tuple[str, ...] | None = None
    mock_data: bool = False  # Megatron's --mock-data: synthetic samples, no corpus
    vocab_size: int | None = None  # NullTokenizer's id count (Megatron's --vocab-size with it)
    data_cache_path: str | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False  # samples carry "document_ids"; attention stays within a document
    eod_mask_loss: bool = False


@dataclass(frozen=True)
class CheckpointSection:
    save: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None
    async_save: bool = False
    load: str | None = None
    ckpt_step: int | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    max_skipped_iters_in_a_row: int = 10


@dataclass(frozen=True)
class LoggingSection:
    log_interval: int = 100
    eval_interval: int = 0  # 0: evaluate only after training
    eval_iters: int = 100
    eval_longctx_interval: int = 0  # 0: no retrieval grid during training
    eval_longctx_lengths: tuple[int, ...] | None = None  # None: --seq-length (or max_seq_len - 16)
    eval_longctx_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    eval_longctx_samples: int = 2
    eval_longctx_tasks: tuple[str, ...] = ("passkey", "needle")
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1
    peak_tflops: float | None = None
    log_throughput: bool = False
    log_params_norm: bool = False
    log_num_zeros_in_grad: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_timers_to_tensorboard: bool = False
    log_loss_scale_to_tensorboard: bool = True
    log_world_size_to_tensorboard: bool = False
    timing_log_level: int = 0
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    wandb_entity: str | None = None
    profile: bool = False  # profile iterations [profile_step_start, profile_step_end): an Nsight range on CUDA,
    use_pytorch_profiler: bool = False  # or with this, a torch.profiler trace (training/profiling.py)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple[int, ...] = ()  # empty: every rank (Megatron's default)


@dataclass(frozen=True)
class RunConfig:
    world_size: int = 1
    notices: tuple[str, ...] = ()  # said once at start-up: flags accepted without effect, settings Megatron adjusts
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.parallel.tensor * self.parallel.pipeline * self.parallel.context)

    @property
    def global_batch(self) -> int:
        return self.training.global_batch(self.data_parallel)

    @property
    def microbatches(self) -> int:
        return self.training.microbatches(self.data_parallel)
