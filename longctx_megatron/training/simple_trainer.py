"""Training of one model replica, optionally tensor-parallel across ranks: the built-in demo job.

Every rank of the tensor-parallel group reads the same batches (same seed) and holds its shard of
the weights. The distributed trainer (pipeline, data parallel, checkpoints) replaces this loop; until
then it shows the model end to end on real text and measures tokens/s and model TFLOP/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.data.builtin_corpus import builtin_token_stream, random_batches
from longctx_megatron.data.tokenizers import ByteTokenizer, check_vocab_matches
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.grad_norm import clip_grad_norm
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.parallel.tensor import allreduce_sequence_parallel_grads


def _silent(*_args) -> None:
    """Log sink of ranks other than 0."""


@dataclass
class RunSettings:
    train_iters: int = 60
    seq_length: int = 1024
    micro_batch_size: int = 4
    lr: float = 3e-3
    warmup_iters: int = 10
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    attention_backend: str = "auto"
    device: str = "cpu"
    tensor_parallel: int = 1
    sequence_parallel: bool = False


def demo_config() -> ModelConfig:
    """A 4-layer model with every attention pattern, sized to train in about a minute on 2 CPU cores."""
    return ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=320, max_seq_len=4096,
        sliding_window=128, global_every=64, dilated_window=64, dilation=2,
    )


def check_settings(config: ModelConfig, settings: RunSettings) -> None:
    """Errors a run would otherwise hit only after start-up."""
    check_vocab_matches(config.vocab_size, ByteTokenizer())
    if settings.seq_length > config.max_seq_len:
        raise ValueError(f"seq_length={settings.seq_length} exceeds the model's max_seq_len={config.max_seq_len}")
    if settings.sequence_parallel and settings.seq_length % settings.tensor_parallel:
        raise ValueError(
            f"--sequence-parallel needs --seq-length ({settings.seq_length}) divisible by "
            f"--tensor-model-parallel-size ({settings.tensor_parallel})"
        )


def train(config: ModelConfig, settings: RunSettings, log=print) -> list[float]:
    """Train on the built-in corpus; returns the loss of every iteration."""
    check_settings(config, settings)
    tokenizer = ByteTokenizer()
    parallel = None
    if settings.tensor_parallel > 1:
        parallel = initialize_parallel(tensor=settings.tensor_parallel)
        if parallel.dp_size * parallel.pp_size > 1:
            raise ValueError(
                f"launched {parallel.world_size} processes for tensor-model-parallel size "
                f"{settings.tensor_parallel}: data and pipeline parallelism are not available yet"
            )
        if parallel.rank != 0:
            log = _silent
    torch.manual_seed(settings.seed)  # dropout outside tensor-parallel regions; TP reseeds per rank
    model = build_model(config, settings.device, settings.seed, settings.attention_backend,
                        parallel=parallel, sequence_parallel=settings.sequence_parallel)
    stream = builtin_token_stream(tokenizer)
    batches = random_batches(stream, settings.micro_batch_size, settings.seq_length, settings.seed)
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]  # norm weights: no weight decay, as Megatron
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95), fused=settings.device.startswith("cuda"),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: min(1.0, (it + 1) / max(1, settings.warmup_iters))
    )
    flops_per_token = config.flops_per_token(settings.seq_length)
    layout = f"tensor-parallel {settings.tensor_parallel}"
    if settings.sequence_parallel:
        layout += ", sequence-parallel"
    log(
        f"model: {config.estimate_params():,} parameters ({layout}), layers: "
        + ", ".join(spec.describe() for spec in config.layer_plan())
    )
    log(f"data: built-in corpus (CPython reference docs), {stream.numel():,} byte tokens")
    losses = []
    window_tokens, window_start = 0, time.perf_counter()
    for iteration in range(1, settings.train_iters + 1):
        tokens, labels = next(batches)
        tokens, labels = tokens.to(settings.device), labels.to(settings.device)
        _, loss = model(tokens, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.sequence_parallel:
            allreduce_sequence_parallel_grads(model, parallel)
        grad_norm = clip_grad_norm(model, settings.clip_grad, parallel)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        window_tokens += tokens.numel()
        if iteration % settings.log_interval == 0 or iteration == settings.train_iters:
            elapsed = time.perf_counter() - window_start
            rate = window_tokens / elapsed
            log(
                f"iteration {iteration:5d}/{settings.train_iters} | loss {losses[-1]:.4f} | "
                f"grad norm {grad_norm.item():.3f} | lr {schedule.get_last_lr()[0]:.2e} | "
                f"{rate:,.0f} tokens/s | {rate * flops_per_token / settings.tensor_parallel / 1e12:.4f} "
                "TFLOP/s per device"
            )
            window_tokens, window_start = 0, time.perf_counter()
    return losses
