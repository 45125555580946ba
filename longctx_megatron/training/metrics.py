"""What the training loop reports, as Megatron's training_log does: the per-interval log line
(throughput, TFLOP/s, MFU, memory, and with the flags Megatron's throughput, params norm, num zeros
and timers) and the scalars for TensorBoard and wandb. Only global rank 0 writes; every rank calls
``iteration`` (the timers are gathered from all ranks).

Scalars, under Megatron's tags, every --tensorboard-log-interval iterations: "lm loss",
"learning-rate", "batch-size", "loss-scale" (unless --no-log-loss-scale-to-tensorboard; 1 without
fp16), "grad-norm", "world-size" (--log-world-size-to-tensorboard), "num-zeros"
(--log-num-zeros-in-grad), "params-norm" (--log-params-norm), each also as "<tag> vs samples"
(x = consumed samples); with --log-memory-to-tensorboard on CUDA "mem-reserved-bytes",
"mem-allocated-bytes", "mem-max-allocated-bytes", "mem-allocated-count" (torch.cuda.memory_stats),
and on CPU, where none of those exists, "mem-max-rss-bytes" (the process's peak resident set size,
this project's tag). At each --log-interval with --log-timers-to-tensorboard: "iteration-time"
(seconds), "throughput" (with --log-throughput; TFLOP/s per device) and "<timer>-time" (timers.py).
After an evaluation: "lm loss validation" (+ vs samples) and with
--log-validation-ppl-to-tensorboard "lm loss validation ppl" (+ vs samples), exp(min(20, loss)) as Megatron.
wandb (--wandb-project) gets the same tags without the " vs samples" ones, and "samples vs steps".
"""

from __future__ import annotations

import math
import resource
import time

import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.model.counting import flops_per_token
from longctx_megatron.packing import document_lengths
from longctx_megatron.training.run_config import RunConfig
from longctx_megatron.training.timers import Timers, log_block

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU
CUDA_MEMORY = (("mem-reserved-bytes", "reserved_bytes.all.current"),
               ("mem-allocated-bytes", "allocated_bytes.all.current"),
               ("mem-max-allocated-bytes", "allocated_bytes.all.peak"),
               ("mem-allocated-count", "allocation.all.current"))


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
    """Throughput over each logging window; MFU against ``--peak-tflops`` or a known GPU's peak.
    ``writer`` (TensorBoard) and ``wandb`` are None except on global rank 0; ``timers`` default to
    --timing-log-level's."""

    def __init__(self, run: RunConfig, config: ModelConfig, device: torch.device, log, writer=None, wandb=None,
                 timers: Timers | None = None):
        self.run, self.log, self.writer, self.wandb = run, log, writer, wandb
        self.flags = run.logging
        self.config = config
        self.timers = timers if timers is not None else Timers(self.flags.timing_log_level, device)
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

    def logs(self, done: int) -> bool:
        """Whether iteration ``done`` (1-based) prints the log line: every --log-interval and the last."""
        return done % self.flags.log_interval == 0 or done == self.run.training.train_iters

    def writes(self, done: int) -> bool:
        """Whether iteration ``done`` writes scalars (--tensorboard-log-interval, with TensorBoard or wandb);
        the same answer on every rank."""
        return bool(self.flags.tensorboard_dir or self.flags.wandb_project) \
            and done % self.flags.tensorboard_log_interval == 0

    def wants_statistics(self, done: int) -> bool:
        """Whether iteration ``done`` reports --log-params-norm / --log-num-zeros-in-grad values (collectives:
        every rank computes them at these iterations only)."""
        return self.logs(done) or self.writes(done)

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

    def scalar(self, tag: str, value: float, step: int, samples: int | None = None, to_wandb: bool = True) -> None:
        """Write one scalar at ``step``: TensorBoard (and "<tag> vs samples" at x = ``samples``), wandb."""
        if self.writer:
            self.writer.add_scalar(tag, value, step)
            if samples is not None:
                self.writer.add_scalar(f"{tag} vs samples", value, samples)
        if self.wandb and to_wandb:
            self.wandb.log({tag: value}, step=step)

    def _write_iteration(self, done: int, samples: int, lr: float, loss: float, norm: float,
                         loss_scale: float | None, params_norm: float | None, num_zeros: int | None) -> None:
        """Megatron's per-iteration scalars, in its order."""
        if self.wandb:
            self.wandb.log({"samples vs steps": samples}, step=done)
        self.scalar("learning-rate", lr, done, samples)
        self.scalar("batch-size", self.run.global_batch, done, samples)
        self.scalar("lm loss", loss, done, samples)
        if self.flags.log_loss_scale_to_tensorboard:
            self.scalar("loss-scale", 1.0 if loss_scale is None else loss_scale, done, samples)
        if self.flags.log_world_size_to_tensorboard:
            self.scalar("world-size", self.run.world_size, done, samples)
        self.scalar("grad-norm", norm, done, samples)
        if num_zeros is not None:
            self.scalar("num-zeros", num_zeros, done, samples)
        if params_norm is not None:
            self.scalar("params-norm", params_norm, done, samples)
        if self.flags.log_memory_to_tensorboard and self.writer:
            if self.device.type == "cuda":
                stats = torch.cuda.memory_stats(self.device)
                for tag, key in CUDA_MEMORY:
                    self.writer.add_scalar(tag, stats.get(key, 0), done)
            else:  # Linux reports KiB
                self.writer.add_scalar("mem-max-rss-bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                       done)

    def iteration(self, done: int, consumed_samples: int, lr: float, loss: float, norm: float, skipped: int,
                  loss_scale: float | None, params_norm: float | None = None, num_zeros: int | None = None) -> None:
        """Record iteration ``done`` (1-based): scalars every --tensorboard-log-interval, the log line (and
        the timers) at --log-interval and at the end. ``params_norm`` / ``num_zeros``: None unless asked for."""
        self.window_iters += 1
        if self.writes(done):
            self._write_iteration(done, consumed_samples, lr, loss, norm, loss_scale, params_norm, num_zeros)
        train_iters = self.run.training.train_iters
        if not self.logs(done):
            return
        now = time.perf_counter()
        seconds = (now - self.window_start) / self.window_iters
        tokens_per_s = self.tokens_per_iteration / seconds
        tflops = self.window_flops / (now - self.window_start) / self.run.world_size / 1e12
        eta = (now - self.start) / (done - self.first) * (train_iters - done)
        times = self.timers.min_max(self.window_iters)  # a collective: before any rank-0-only work
        throughput = (f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}" if self.flags.log_throughput
                      else f"{tflops:.3f} TFLOP/s per device")
        self.log(f"iteration {done:6d}/{train_iters} | consumed samples {consumed_samples} | "
                 f"lr {lr:.3e} | loss {loss:.4f} | grad norm {norm:.3f} | "
                 + (f"params norm {params_norm:.3f} | " if params_norm is not None else "")
                 + (f"num zeros {num_zeros} | " if num_zeros is not None else "")
                 + f"{tokens_per_s:,.0f} tokens/s | {throughput}"
                 + (f" | MFU {tflops / self.peak:.1%}" if self.peak else "")
                 + f" | peak memory {peak_memory_gib(self.device):.2f} GiB | skipped {skipped}"
                 + (f" | loss scale {loss_scale:g}" if loss_scale is not None else "")
                 + f" | ETA {eta:.0f} s")
        block = log_block(times)
        if block:
            self.log(block)
        if self.flags.log_timers_to_tensorboard:
            self.scalar("iteration-time", seconds, done)
            if self.flags.log_throughput:
                self.scalar("throughput", tflops, done)
            for name, (_, slowest) in times.items():
                self.scalar(f"{name}-time", slowest, done)
        self.window_start, self.window_iters, self.window_flops = time.perf_counter(), 0, 0.0

    def validation(self, iteration: int, loss: float, consumed_samples: int | None = None) -> None:
        """An evaluation's loss at ``iteration``: the log line and "lm loss validation" (+ its ppl)."""
        perplexity = math.exp(min(20.0, loss))
        self.log(f"validation at iteration {iteration}: loss {loss:.4f} | perplexity {perplexity:.2f}")
        self.scalar("lm loss validation", loss, iteration, consumed_samples)
        if self.flags.log_validation_ppl_to_tensorboard:
            self.scalar("lm loss validation ppl", perplexity, iteration, consumed_samples, to_wandb=False)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
