"""Single-process training of a model on a token stream: the built-in demo job.

The distributed trainer (pipeline, data parallel, checkpoints) replaces this loop; until then it
shows the model end to end on real text and measures tokens/s and model TFLOP/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.data.builtin_corpus import builtin_token_stream, random_batches
from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.model.build import build_model


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


def demo_config() -> ModelConfig:
    """A 4-layer model with every attention pattern, sized to train in about a minute on 2 CPU cores."""
    return ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=320, max_seq_len=4096,
        sliding_window=128, global_every=64, dilated_window=64, dilation=2,
    )


def train(config: ModelConfig, settings: RunSettings, log=print) -> list[float]:
    """Train on the built-in corpus; returns the loss of every iteration."""
    tokenizer = ByteTokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the byte tokenizer's {tokenizer.vocab_size}")
    if settings.seq_length > config.max_seq_len:
        raise ValueError(f"seq_length={settings.seq_length} exceeds the model's max_seq_len={config.max_seq_len}")
    torch.manual_seed(settings.seed)
    model = build_model(config, settings.device, settings.seed, settings.attention_backend)
    stream = builtin_token_stream(tokenizer)
    batches = random_batches(stream, settings.micro_batch_size, settings.seq_length, settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95),
        fused=settings.device.startswith("cuda"),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: min(1.0, (it + 1) / max(1, settings.warmup_iters))
    )
    flops_per_token = config.flops_per_token(settings.seq_length)
    log(
        f"model: {config.estimate_params():,} parameters, layers: "
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
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
                f"{rate:,.0f} tokens/s | {rate * flops_per_token / 1e12:.4f} TFLOP/s"
            )
            window_tokens, window_start = 0, time.perf_counter()
    return losses
