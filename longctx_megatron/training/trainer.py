"""The training loop of pretrain_longctx.py: one step after another, evaluation, checkpoints, exits.

One step: this DP rank's micro-batches go through the pipeline schedule (gradients accumulate
in fp32 buckets, reduced over DP while backward runs); the buckets then divide the gradients
(DP mean or per-token mean, fp16 unscaling) and sum the tied-embedding copies' and the
sequence-parallel norms' gradients; the optimizer takes the global norm, clips and steps. A
non-finite loss or gradient norm skips the step (no update); the skips are counted, and too many
in a row stop training (recovery.SkipGuard).

The loop saves checkpoints every ``--save-interval`` iterations, at the end, and when an exit
condition (preemption signal, time budget, ``--exit-interval``) says to stop; ``--load`` resumes
from the newest sound checkpoint, under any parallel layout. What a checkpoint records of the
training (progress, schedule, layout) is ``state_dict()``; ``load_state_dict`` restores it.
Building a Trainer from a RunConfig is training/setup.py. What the loop reports is metrics.py (log
line, TensorBoard and wandb scalars), with timers.py (--timing-log-level), optimizer_stats.py
(--log-params-norm, --log-num-zeros-in-grad) and profiling.py (--profile) hooked in here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longctx_megatron.checkpoint import state as checkpoint_state
from longctx_megatron.checkpoint.compatibility import check_compatible
from longctx_megatron.checkpoint.manifest import Layout, TrainingMetadata
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.checkpoint.sharded import Checkpointer
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.serialization import config_to_dict
from longctx_megatron.model.loss import loss_weights
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.pipeline_schedule import forward_backward_pipelined
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.training.datasets import micro_batches
from longctx_megatron.training.lr_schedule import learning_rate
from longctx_megatron.training.metrics import Metrics
from longctx_megatron.training.optimizer_stats import num_zeros_in_grad, params_norm
from longctx_megatron.training.precision import LossScaler
from longctx_megatron.training.profiling import NsysRange, Profiler, build_profiler
from longctx_megatron.training.recovery import ExitConditions, SkipGuard
from longctx_megatron.training.run_config import RunConfig


@dataclass
class Trainer:
    run: RunConfig
    config: ModelConfig
    ctx: ParallelContext
    chunks: list  # this rank's model chunks (pipeline stages)
    grads: DataParallelGradients
    optimizer: object  # training/optimizer.py: grad_norm(), step(clip, norm), param_groups
    train_data: torch.utils.data.Dataset
    valid_data: torch.utils.data.Dataset | None
    device: torch.device
    scaler: LossScaler | None
    metrics: Metrics
    log: object
    tokenizer: object = None
    checkpointer: Checkpointer | None = None
    stage_sizes: list[int] = field(default_factory=list)  # layers of every (virtual) pipeline stage
    losses: list[float] = field(default_factory=list)
    iteration: int = 0  # iterations completed (the next one to run, 0-based)
    consumed_samples: int = 0
    last_saved: int | None = None  # iteration of the newest checkpoint this run saved or loaded
    skips: SkipGuard = None
    # Called after the iterations they are due at (``due(iteration)``) as ``probe(iteration, chunks)``,
    # on every rank: e.g. eval/training_probe.py's retrieval grid (--eval-longctx-interval).
    probes: list = field(default_factory=list)
    profiler: Profiler | NsysRange | None = None  # --profile (None: built from the run's flags)
    num_zeros: int | None = None  # the latest step's --log-num-zeros-in-grad count, when it was due

    def __post_init__(self):
        if self.skips is None:
            self.skips = SkipGuard(self.run.checkpointing.max_skipped_iters_in_a_row)
        if self.profiler is None:
            self.profiler = build_profiler(self.run, self.ctx.rank, self.device, self.log)

    @property
    def skipped(self) -> int:
        return self.skips.total

    def _hidden_shape(self) -> tuple[int, int, int]:
        seq = self.run.training.seq_length // self.ctx.cp_size
        seq //= self.ctx.tp_size if self.run.parallel.sequence_parallel else 1
        return (self.run.training.micro_batch_size, seq, self.config.d_model)

    def _token_count(self, batches: list[dict]) -> float:
        """The number of tokens in the loss (label not ignored, loss mask 1) over the whole global
        batch: this DP rank's micro-batches (this CP rank's part of them), summed over DP x CP."""
        count = sum(loss_weights(b["labels"], b.get("loss_mask")).double().sum() for b in batches).to(self.device)
        if self.ctx.dp_cp_size > 1:
            dist.all_reduce(count, group=self.ctx.dp_cp_group)
        return max(count.item(), 1.0)

    def _loss_sum(self, losses: list[torch.Tensor]) -> float:
        """The global batch's sum of token losses on every rank: the last stage's micro-batch sums,
        summed over the micro-batches and DP x CP ranks."""
        value = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        value = value.to(self.device, torch.float64)
        if self.ctx.pp_size > 1:
            dist.all_reduce(value, group=self.ctx.pp_group)  # only the last stage holds a loss
        if self.ctx.dp_cp_size > 1:
            dist.all_reduce(value, group=self.ctx.dp_cp_group)
        return value.item()

    def step(self, iteration: int) -> tuple[float, float, bool]:
        """Train on the next global batch; returns (loss, gradient norm, whether the update was applied)."""
        training = self.run.training
        step, warmup, decay = training.lr_schedule(self.run.global_batch)
        done = self.optimizer.steps * step  # samples of the updates applied so far (Megatron's num_steps)
        lr = learning_rate(done, training.lr, training.min_lr, warmup, decay, training.lr_decay_style)
        apart = lr if training.decoupled_lr is None else learning_rate(
            done, training.decoupled_lr, training.min_lr if training.decoupled_min_lr is None
            else training.decoupled_min_lr, warmup, decay, training.lr_decay_style)
        for group in self.optimizer.param_groups:
            group["lr"] = apart if group.get("decoupled") else lr
        timers = self.metrics.timers
        with timers("batch-generator", 2):
            batches = micro_batches(self.train_data, self.consumed_samples, self.run, self.ctx, self.device)
        self.metrics.batches(batches, self.ctx.dp_cp_size)
        tokens = self._token_count(batches)
        per_token = training.calculate_per_token_loss
        self.grads.start(len(batches))
        scale = self.scaler.scale if self.scaler else 1.0
        with timers("forward-backward", 1):
            losses = forward_backward_pipelined(self.chunks, batches, self.ctx, self._hidden_shape(), training.dtype,
                                                loss_scale=scale, per_token_loss=per_token, timers=timers)
        # DP mean (or per-token mean) and fp16 unscaling in one division of the fp32 gradients (summed
        # over DP x CP: the CP ranks' parts of a sample add up to its gradient).
        with timers("all-grads-sync", 1):
            self.grads.finish(divisor=(tokens if per_token else self.ctx.dp_size) * scale)
        loss = self._loss_sum(losses) / tokens  # reported as Megatron does in either mode
        with timers("optimizer", 1):
            with timers("optimizer-clip-main-grad", 1):
                norm = self.optimizer.grad_norm()
            finite = bool(torch.isfinite(norm)) and math.isfinite(loss)
            self.num_zeros = None
            if finite and self.run.logging.log_num_zeros_in_grad and self.metrics.wants_statistics(iteration + 1):
                with timers("optimizer-count-zeros", 1):
                    self.num_zeros = num_zeros_in_grad(self.optimizer, self.chunks, self.ctx)
            if finite:
                with timers("optimizer-inner-step", 1):
                    self.optimizer.step(training.clip_grad, norm)
        if self.scaler:
            self.scaler.update(not finite)
        self.consumed_samples += self.run.global_batch
        return loss, norm.item(), finite

    def evaluate(self, iteration: int, final: bool = False) -> float | None:
        """The loss over --eval-iters validation batches (every evaluated token counts once, as Megatron).
        Each evaluation reads fresh batches, as Megatron's validation iterator moves on: the one at
        iteration k x --eval-interval reads slot k - 1 of the validation set, the ``final`` one after
        training the slot after the last interval's (build_datasets sizes the set for all of them)."""
        if self.valid_data is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        interval, evals = self.run.logging.eval_interval, self.run.logging.eval_iters
        slot = (self.run.training.train_iters // interval if final else max(0, iteration // interval - 1)) if interval \
            else 0
        total, tokens = 0.0, 0.0
        for index in range(slot * evals, (slot + 1) * evals):
            batches = micro_batches(self.valid_data, index * self.run.global_batch, self.run, self.ctx, self.device)
            tokens += self._token_count(batches)
            total += self._loss_sum(forward_backward_pipelined(self.chunks, batches, self.ctx, self._hidden_shape(),
                                                               self.run.training.dtype, forward_only=True))
        for chunk in self.chunks:
            chunk.train()
        loss = total / tokens
        self.metrics.validation(iteration, loss, self.consumed_samples)
        return loss

    def train(self) -> list[float]:
        """Run from ``self.iteration`` to ``--train-iters`` (or an exit condition); returns this run's losses."""
        ckpt = self.run.checkpointing
        with ExitConditions(ckpt.exit_interval, ckpt.exit_duration_in_mins, self.device) as conditions:
            stopped = self._loop(conditions)
        self.profiler.stop()
        if not stopped:
            self.evaluate(self.iteration, final=True)
        if ckpt.save and self.last_saved != self.iteration:
            self.save()
        if self.checkpointer:
            self.checkpointer.wait()
        self.metrics.close()
        return self.losses

    def _loop(self, conditions: ExitConditions) -> str | None:
        """The iterations; returns why it stopped early, or None at --train-iters."""
        run, ckpt = self.run, self.run.checkpointing
        self.metrics.begin(self.iteration)
        self.profiler.begin()
        for iteration in range(self.iteration, run.training.train_iters):
            self.profiler.step(iteration)
            loss, norm, applied = self.step(iteration)
            self.losses.append(loss)
            done = self.iteration = iteration + 1
            if not applied:
                self.log(f"warning: update skipped at iteration {done}: loss {loss}, grad norm {norm} (non-finite)")
            self.skips.record(done, applied, self.last_saved)
            norm_of_params = params_norm(self.optimizer, self.chunks, self.ctx) \
                if run.logging.log_params_norm and self.metrics.wants_statistics(done) else None
            self.metrics.iteration(done, self.consumed_samples, self.optimizer.param_groups[0]["lr"], loss, norm,
                                   self.skipped, self.scaler.scale if self.scaler else None, norm_of_params,
                                   self.num_zeros)
            self.profiler.after(done)
            reason = conditions.reason(done)
            if ckpt.save and (reason or (ckpt.save_interval and done % ckpt.save_interval == 0)):
                self.save()
            if reason:
                self.log(f"stopping after iteration {done}: {reason}"
                         + (f"; checkpoint saved in {ckpt.save}" if ckpt.save else "; no --save, nothing saved"))
                return reason
            if run.logging.eval_interval and done % run.logging.eval_interval == 0:  # the last one too, as Megatron
                self.evaluate(done)
            for probe in self.probes:
                if probe.due(done):
                    started = time.perf_counter()
                    probe(done, self.chunks)
                    self.metrics.exclude(time.perf_counter() - started)
        return None

    def layout(self) -> Layout:
        """The parallel layout; RNG states are only restored under an identical one."""
        return Layout(tensor=self.ctx.tp_size, pipeline=self.ctx.pp_size, data=self.ctx.dp_size,
                      stage_layers=tuple(self.stage_sizes), sequence_parallel=self.run.parallel.sequence_parallel,
                      distributed_optimizer=self.run.parallel.distributed_optimizer, context=self.ctx.cp_size)

    def state_dict(self) -> TrainingMetadata:
        """What a checkpoint records of the training: progress, schedule, config, tokenizer and layout."""
        training = self.run.training
        return TrainingMetadata(
            consumed_samples=self.consumed_samples, skipped_iterations=self.skipped,
            optimizer_steps=self.optimizer.steps,
            loss_scaler=self.scaler.state_dict() if self.scaler else None,
            learning_rate={"lr": training.lr, "min_lr": training.min_lr, "warmup_iters": training.lr_warmup_iters,
                           "decay_iters": training.decay_iters, "decay_style": training.lr_decay_style},
            config=config_to_dict(self.config),
            tokenizer={"name": repr(self.tokenizer), "checksum": self.tokenizer.checksum()} if self.tokenizer
            else None,
            layout=self.layout(), params_dtype=str(training.dtype).removeprefix("torch."),
            global_batch_size=self.run.global_batch, seq_length=training.seq_length, seed=training.seed,
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def load_state_dict(self, iteration: int, state: TrainingMetadata) -> None:
        """Continue after ``iteration`` iterations from a checkpoint's training state."""
        self.iteration, self.consumed_samples = iteration, state.consumed_samples
        self.skips.total = state.skipped_iterations
        self.last_saved = iteration
        if self.scaler and state.loss_scaler:
            self.scaler.load_state_dict(state.loss_scaler)

    def save(self) -> None:
        self.checkpointer.save(self.iteration, self.state_dict(), self.chunks, self.optimizer, self.ctx, self.device)
        self.last_saved = self.iteration
        if self.checkpointer.async_save:
            self.log(f"checkpoint iteration {self.iteration}: training resumed after "
                     f"{self.checkpointer.last_stall_s:.3f} s; the files are written in the background")

    def restore(self, reader: CheckpointReader) -> None:
        """Load a checkpoint found by Checkpointer.find, as --finetune / --no-load-optim / --no-load-rng say."""
        ckpt, checkpoint = self.run.checkpointing, reader.checkpoint_metadata()
        state, saved = checkpoint.training, checkpoint.training.layout
        check_compatible(reader.metadata, self.config, self.tokenizer.checksum() if self.tokenizer else None,
                         reader.directory, self.log)
        load_rng = not (ckpt.no_load_rng or ckpt.finetune)
        if load_rng and saved != self.layout():
            self.log(f"note: RNG states not restored: saved under {dict(sorted(saved.to_json().items()))}, running "
                     f"under {self.layout().to_json()}")
            load_rng = False
        checkpoint_state.load(self.chunks, self.optimizer, self.ctx, self.device, reader, state.optimizer_steps,
                              load_optimizer=not (ckpt.no_load_optim or ckpt.finetune), load_rng=load_rng)
        reader.close()
        if ckpt.finetune:
            self.log(f"loaded the weights of {reader.directory} (--finetune): starting at iteration 0")
            return
        self.load_state_dict(checkpoint.iteration, state)
        self.log(f"resumed from {reader.directory}: iteration {self.iteration}, consumed samples "
                 f"{self.consumed_samples} (saved under tensor {saved.tensor} x pipeline {saved.pipeline} x "
                 f"data {saved.data}" + (f" x context {saved.context}" if saved.context > 1 else "") + ")")
