"""What the training loop reports: the per-interval log line (throughput, TFLOP/s, MFU, memory) and
TensorBoard scalars. Only global rank 0 logs; the other ranks get a silent sink."""

from __future__ import annotations

import math
import resource
import time

import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.model.counting import flops_per_token
from longctx_megatron.packing import document_lengths
from longctx_megatron.training.run_config import RunConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process peak RSS


def tensorboard_writer(run: RunConfig, rank: int):
    """A SummaryWriter on global rank 0 when --tensorboard-dir is given, else None."""
    if not run.logging.tensorboard_dir or rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(run.logging.tensorboard_dir)


class Metrics:
    """Throughput over each logging window; MFU against ``--peak-tflops`` or a known GPU's peak."""

    def __init__(self, run: RunConfig, config: ModelConfig, device: torch.device, log, writer=None):
        self.run, self.log, self.writer = run, log, writer
        self.config = config
        self.tokens_per_iteration = run.global_batch * run.training.seq_length
        self.flops = flops_per_token(config, run.training.seq_length)  # per token of a sample without documents
        self.window_flops = 0.0
        self.peak = run.logging.peak_tflops or next(
            (v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)),
            None)
        self.device = device
        self.begin(0)

    def begin(self, first: int) -> None:
        """Start timing at iteration ``first`` (0-based: the next one to run)."""
        self.start = self.window_start = time.perf_counter()
        self.first, self.window_iters, self.window_flops = first, 0, 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent on something else (a retrieval grid) out of throughput and ETA."""
        self.start += seconds
        self.window_start += seconds

    def batches(self, batches: list[dict], dp_size: int) -> None:
        """Count the model FLOPs of one iteration from this rank's micro-batches: with packed
        documents (``document_ids``, the whole samples' even under context parallelism) each document
        is attended as a sequence of its own, so the FLOPs follow the batch; the other ``dp_size``
        data (x context) parallel ranks are taken to be alike."""
        for batch in batches:
            tokens = batch["tokens"].numel()
            ids = batch.get("document_ids")
            if ids is None:
                self.window_flops += tokens * self.flops * dp_size
                continue
            self.window_flops += tokens * flops_per_token(self.config, ids.shape[1],
                                                          documents=document_lengths(ids)) * dp_size

    def iteration(self, done: int, consumed_samples: int, lr: float, loss: float, norm: float, skipped: int,
                  loss_scale: float | None) -> None:
        """Record iteration ``done`` (1-based); logs the window at --log-interval and at the end."""
        self.window_iters += 1
        train_iters = self.run.training.train_iters
        if done % self.run.logging.log_interval and done != train_iters:
            return
        now = time.perf_counter()
        tokens_per_s = self.window_iters * self.tokens_per_iteration / (now - self.window_start)
        tflops = self.window_flops / (now - self.window_start) / self.run.world_size / 1e12
        eta = (now - self.start) / (done - self.first) * (train_iters - done)
        self.log(f"iteration {done:6d}/{train_iters} | consumed samples {consumed_samples} | "
                 f"lr {lr:.3e} | loss {loss:.4f} | grad norm {norm:.3f} | "
                 f"{tokens_per_s:,.0f} tokens/s | {tflops:.3f} TFLOP/s per device"
                 + (f" | MFU {tflops / self.peak:.1%}" if self.peak else "")
                 + f" | peak memory {peak_memory_gib(self.device):.2f} GiB | skipped {skipped}"
                 + (f" | loss scale {loss_scale:g}" if loss_scale is not None else "")
                 + f" | ETA {eta:.0f} s")
        if self.writer:
            for name, value in (("train/loss", loss), ("train/grad_norm", norm), ("train/tokens_per_s", tokens_per_s),
                                ("train/tflops_per_device", tflops), ("train/lr", lr),
                                ("train/skipped_iterations", skipped)):
                self.writer.add_scalar(name, value, done)
        self.window_start, self.window_iters, self.window_flops = time.perf_counter(), 0, 0.0

    def validation(self, iteration: int, loss: float) -> None:
        perplexity = math.exp(min(loss, 50))
        self.log(f"validation at iteration {iteration}: loss {loss:.4f} | perplexity {perplexity:.2f}")
        if self.writer:
            self.writer.add_scalar("validation/loss", loss, iteration)
            self.writer.add_scalar("validation/perplexity", perplexity, iteration)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
