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
from longctx_megatron.parallel.state import default_backend


def demo_config() -> ModelConfig:
    """A 4-layer model with every attention pattern, sized to train in about a minute on 2 CPU cores."""
    return ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=320, max_seq_len=4096,
        sliding_window=128, global_every=64, dilated_window=64, dilation=2,
    )


@dataclass(frozen=True)
class ModelSection:
    """Where the model config comes from: ``config_file`` (or the default) with ``overrides`` applied
    (ModelConfig field -> value, from the model flags)."""

    config_file: str | None = None
    overrides: dict = field(default_factory=dict)
    attention_backend: str = "auto"

    def resolve(self, default: ModelConfig, seq_length: int) -> ModelConfig:
        """The model: ``config_file`` (or ``default``) with the overrides; max_seq_len grows to the
        training sequence length unless it was given."""
        config = load_config(self.config_file) if self.config_file else default
        overrides = dict(self.overrides)
        if "attention_layout" in overrides:
            overrides["layers"] = None
        if "rope_theta" in overrides:
            overrides["rope"] = dataclasses.replace(config.rope, theta=overrides.pop("rope_theta"))
        if "max_seq_len" not in overrides and seq_length > config.max_seq_len:
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
    context: int = 1  # --context-parallel-size: ranks sharing every sample's sequence (parallel/context.py)
    cp_comm_type: str = "p2p"

    def backend_for(self, device: torch.device) -> str:
        """The process-group backend: the one asked for, else the device's (parallel/state.default_backend)."""
        return self.backend or default_backend(device)


@dataclass(frozen=True)
class TrainingSection:
    seq_length: int = 1024
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro batch size x data-parallel size
    train_iters: int = 60
    lr: float = 3e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 10
    lr_decay_iters: int | None = None  # None: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    calculate_per_token_loss: bool = False
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    initial_loss_scale: float = 2.0**16
    seed: int = 1234
    device: str | None = None

    def global_batch(self, data_parallel: int) -> int:
        """Samples per iteration over all DP ranks: the one definition."""
        return self.global_batch_size or self.micro_batch_size * data_parallel

    def microbatches(self, data_parallel: int) -> int:
        """Micro-batches each DP rank runs per iteration: the one definition."""
        return self.global_batch(data_parallel) // (self.micro_batch_size * data_parallel)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


@dataclass(frozen=True)
class DataSection:
    data_path: tuple[str, ...] | None = None  # None: the built-in corpus with the byte tokenizer
    split: str = "969,30,1"
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
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
    log_interval: int = 10
    eval_interval: int = 0  # 0: evaluate only after training
    eval_iters: int = 2
    eval_longctx_interval: int = 0  # 0: no retrieval grid during training
    eval_longctx_lengths: tuple[int, ...] | None = None  # None: --seq-length (or max_seq_len - 16)
    eval_longctx_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    eval_longctx_samples: int = 2
    eval_longctx_tasks: tuple[str, ...] = ("passkey", "needle")
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None


@dataclass(frozen=True)
class RunConfig:
    world_size: int = 1
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
