"""The training loop of pretrain_longctx.py: parallel layout, model chunks, data, optimizer, schedule, logs.

One step: this DP rank's micro-batches go through the pipeline schedule (gradients accumulate
in fp32 buckets, reduced over DP while backward runs); the buckets then divide the gradients
(DP mean or per-token mean, fp16 unscaling) and sum the tied-embedding copies' and the
sequence-parallel norms' gradients; the global norm is checked and clipped and the optimizer
steps. A non-finite loss or gradient norm skips the step (no update); the skips are counted, and
too many in a row stop training (recovery.SkipGuard).

The loop saves checkpoints every ``--save-interval`` iterations, at the end, and when an exit
condition (preemption signal, time budget, ``--exit-interval``) says to stop; ``--load`` resumes
from the newest sound checkpoint, under any parallel layout.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longctx_megatron.checkpoint import state as checkpoint_state
from longctx_megatron.checkpoint.compatibility import check_compatible
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.manifest import Layout, TrainingMetadata
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.checkpoint.sharded import Checkpointer
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.serialization import config_to_dict
from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.data.blended import parse_data_path
from longctx_megatron.data.builders import build_gpt_datasets
from longctx_megatron.data.builtin_corpus import BuiltinDataset
from longctx_megatron.data.gpt_dataset import GPTDatasetConfig
from longctx_megatron.data.indexed_dataset import dataset_exists
from longctx_megatron.data.sampler import PretrainingSampler
from longctx_megatron.data.tokenizers import ByteTokenizer, build_tokenizer, check_vocab_matches
from longctx_megatron.model.counting import estimate_params, flops_per_token
from longctx_megatron.model.loss import loss_weights
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.distributed_optimizer import DistributedOptimizer
from longctx_megatron.parallel.grad_norm import clip_grad_norm, norm_weights
from longctx_megatron.parallel.pipeline_plan import describe_split, plan_pipeline
from longctx_megatron.parallel.pipeline_schedule import forward_backward_pipelined
from longctx_megatron.parallel.state import ParallelContext, check_model_fits_layout, initialize_parallel
from longctx_megatron.training.arguments import model_config, validate_args
from longctx_megatron.training.lr_schedule import learning_rate
from longctx_megatron.training.recovery import ExitConditions, SkipGuard
from longctx_megatron.training.stages import build_pipeline_chunks

try:
    from apex.optimizers import FusedAdam
except ImportError:
    FusedAdam = None

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


def demo_config() -> ModelConfig:
    """A 4-layer model with every attention pattern, sized to train in about a minute on 2 CPU cores."""
    return ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=320, max_seq_len=4096,
        sliding_window=128, global_every=64, dilated_window=64, dilation=2,
    )


@dataclass
class LossScaler:
    """fp16 dynamic loss scaling: halve on overflow (step skipped), double after 1000 clean steps."""

    scale: float
    growth_interval: int = 1000
    clean_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.clean_steps = max(self.scale / 2, 1.0), 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale *= 2


@dataclass
class Trainer:
    args: argparse.Namespace
    config: ModelConfig
    ctx: ParallelContext
    chunks: list
    grads: DataParallelGradients
    optimizer: object
    train_data: torch.utils.data.Dataset
    valid_data: torch.utils.data.Dataset | None
    device: torch.device
    dtype: torch.dtype
    scaler: LossScaler | None
    log: object
    writer: object = None
    tokenizer: object = None
    checkpointer: Checkpointer | None = None
    stage_sizes: list[int] = field(default_factory=list)  # layers of every (virtual) pipeline stage
    losses: list[float] = field(default_factory=list)
    iteration: int = 0  # iterations completed (the next one to run, 0-based)
    consumed_samples: int = 0
    last_saved: int | None = None  # iteration of the newest checkpoint this run saved or loaded
    skips: SkipGuard = None

    def __post_init__(self):
        if self.skips is None:
            self.skips = SkipGuard(self.args.max_skipped_iters_in_a_row)

    @property
    def skipped(self) -> int:
        return self.skips.total

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.args.micro_batch_size * self.ctx.dp_size)

    @property
    def global_batch(self) -> int:
        return self.args.global_batch_size or self.args.micro_batch_size * self.ctx.dp_size

    def _batches(self, dataset, consumed: int) -> list[dict]:
        """This DP rank's micro-batches of the global batch that starts at ``consumed``."""
        sampler = PretrainingSampler(len(dataset), consumed, self.args.micro_batch_size, self.ctx.dp_rank,
                                     self.ctx.dp_size)
        batches = []
        for indices, _ in zip(sampler, range(self.microbatches), strict=False):
            samples = [dataset[i] for i in indices]
            batches.append({key: torch.stack([s[key] for s in samples]).to(self.device) for key in samples[0]})
        return batches

    def _hidden_shape(self) -> tuple[int, int, int]:
        seq = self.args.seq_length // (self.ctx.tp_size if self.args.sequence_parallel else 1)
        return (self.args.micro_batch_size, seq, self.config.d_model)

    def _token_count(self, batches: list[dict]) -> float:
        """The number of tokens in the loss (label not ignored, loss mask 1) over the whole global
        batch: this DP rank's micro-batches, summed over DP. Every rank computes it from the data."""
        count = sum(loss_weights(b["labels"], b.get("loss_mask")).double().sum() for b in batches)
        count = count.to(self.device)
        if self.ctx.dp_size > 1:
            dist.all_reduce(count, group=self.ctx.dp_group)
        return max(count.item(), 1.0)

    def _loss_sum(self, losses: list[torch.Tensor]) -> float:
        """The global batch's sum of token losses on every rank: the last stage's micro-batch sums,
        summed over the micro-batches and DP ranks."""
        value = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        value = value.to(self.device, torch.float64)
        if self.ctx.pp_size > 1:
            dist.all_reduce(value, group=self.ctx.pp_group)  # only the last stage holds a loss
        if self.ctx.dp_size > 1:
            dist.all_reduce(value, group=self.ctx.dp_group)
        return value.item()

    def step(self, iteration: int) -> tuple[float, float, bool]:
        """Train on the next global batch; returns (loss, gradient norm, whether the update was applied)."""
        args = self.args
        lr = learning_rate(iteration, args.lr, args.min_lr, args.lr_warmup_iters,
                           args.lr_decay_iters or args.train_iters, args.lr_decay_style)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._batches(self.train_data, self.consumed_samples)
        tokens = self._token_count(batches)
        per_token = args.calculate_per_token_loss
        self.grads.start(len(batches))
        scale = self.scaler.scale if self.scaler else 1.0
        losses = forward_backward_pipelined(self.chunks, batches, self.ctx, self._hidden_shape(), self.dtype,
                                            loss_scale=scale, per_token_loss=per_token)
        # DP mean (or per-token mean) and fp16 unscaling in one division of the fp32 gradients.
        self.grads.finish(divisor=(tokens if per_token else self.ctx.dp_size) * scale)
        loss = self._loss_sum(losses) / tokens  # reported as Megatron does in either mode
        if isinstance(self.optimizer, DistributedOptimizer):
            norm = self.optimizer.grad_norm()
            finite = bool(torch.isfinite(norm)) and math.isfinite(loss)
            if finite:
                self.optimizer.step(args.clip_grad, norm)
        else:
            norm = clip_grad_norm(self.chunks, args.clip_grad, self.ctx)
            finite = bool(torch.isfinite(norm)) and math.isfinite(loss)
            if finite:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update(not finite)
        self.consumed_samples += self.global_batch
        return loss, norm.item(), finite

    def evaluate(self, iteration: int) -> float | None:
        if self.valid_data is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        total, tokens = 0.0, 0.0
        for index in range(self.args.eval_iters):
            batches = self._batches(self.valid_data, index * self.global_batch)
            tokens += self._token_count(batches)
            total += self._loss_sum(forward_backward_pipelined(self.chunks, batches, self.ctx, self._hidden_shape(),
                                                               self.dtype, forward_only=True))
        for chunk in self.chunks:
            chunk.train()
        loss = total / tokens  # over every evaluated token, as Megatron
        self.log(f"validation at iteration {iteration}: loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}")
        if self.writer:
            self.writer.add_scalar("validation/loss", loss, iteration)
            self.writer.add_scalar("validation/perplexity", math.exp(min(loss, 50)), iteration)
        return loss

    def train(self) -> list[float]:
        """Run from ``self.iteration`` to ``--train-iters`` (or an exit condition); returns this run's losses."""
        args = self.args
        conditions = ExitConditions(args.exit_interval, args.exit_duration_in_mins, self.device)
        with conditions:
            stopped = self._loop(conditions)
        if not stopped:
            self.evaluate(self.iteration)
        if args.save and self.last_saved != self.iteration:
            self.save()
        if self.checkpointer:
            self.checkpointer.wait()
        if self.writer:
            self.writer.close()
        return self.losses

    def _loop(self, conditions: ExitConditions) -> str | None:
        """The iterations; returns why it stopped early, or None at --train-iters."""
        args, start, first = self.args, time.perf_counter(), self.iteration
        flops = flops_per_token(self.config, args.seq_length)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if self.device.type == "cuda"
                                         and k in torch.cuda.get_device_name(self.device)), None)
        devices = self.ctx.world_size
        window_start, window_iters = time.perf_counter(), 0
        for iteration in range(first, args.train_iters):
            loss, norm, applied = self.step(iteration)
            self.losses.append(loss)
            window_iters += 1
            done = self.iteration = iteration + 1
            if not applied:
                self.log(f"warning: update skipped at iteration {done}: loss {loss}, grad norm {norm} (non-finite)")
            self.skips.record(done, applied, self.last_saved)
            if done % args.log_interval == 0 or done == args.train_iters:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_iters * self.global_batch * args.seq_length / elapsed
                tflops = tokens_per_s * flops / devices / 1e12
                eta = (time.perf_counter() - start) / (done - first) * (args.train_iters - done)
                line = (f"iteration {done:6d}/{args.train_iters} | consumed samples {self.consumed_samples} | "
                        f"lr {self.optimizer.param_groups[0]['lr']:.3e} | loss {loss:.4f} | grad norm {norm:.3f} | "
                        f"{tokens_per_s:,.0f} tokens/s | {tflops:.3f} TFLOP/s per device"
                        + (f" | MFU {tflops / peak:.1%}" if peak else "")
                        + f" | peak memory {_peak_memory_gib(self.device):.2f} GiB | skipped {self.skipped}"
                        + (f" | loss scale {self.scaler.scale:g}" if self.scaler else "")
                        + f" | ETA {eta:.0f} s")
                self.log(line)
                if self.writer:
                    for name, value in (("train/loss", loss), ("train/grad_norm", norm), ("train/tokens_per_s",
                                        tokens_per_s), ("train/tflops_per_device", tflops),
                                        ("train/lr", self.optimizer.param_groups[0]["lr"]),
                                        ("train/skipped_iterations", self.skipped)):
                        self.writer.add_scalar(name, value, done)
                window_start, window_iters = time.perf_counter(), 0
            reason = conditions.reason(done)
            if args.save and (reason or (args.save_interval and done % args.save_interval == 0)):
                self.save()
            if reason:
                self.log(f"stopping after iteration {done}: {reason}"
                         + (f"; checkpoint saved in {args.save}" if args.save else "; no --save, nothing saved"))
                return reason
            if args.eval_interval and done % args.eval_interval == 0 and done < args.train_iters:
                self.evaluate(done)
        return None

    def checkpoint_metadata(self) -> TrainingMetadata:
        """The JSON part of a checkpoint: training progress, schedule, config, tokenizer and layout."""
        args = self.args
        return TrainingMetadata(
            consumed_samples=self.consumed_samples,
            skipped_iterations=self.skipped,
            optimizer_steps=checkpoint_state.optimizer_steps(self.optimizer),
            loss_scaler={"scale": self.scaler.scale, "clean_steps": self.scaler.clean_steps} if self.scaler
            else None,
            learning_rate={"lr": args.lr, "min_lr": args.min_lr, "warmup_iters": args.lr_warmup_iters,
                           "decay_iters": args.lr_decay_iters or args.train_iters, "decay_style": args.lr_decay_style},
            config=config_to_dict(self.config),
            tokenizer={"name": repr(self.tokenizer), "checksum": self.tokenizer.checksum()} if self.tokenizer
            else None,
            layout=self.layout(),
            params_dtype=str(self.dtype).removeprefix("torch."),
            global_batch_size=self.global_batch,
            seq_length=args.seq_length,
            seed=args.seed,
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def layout(self) -> Layout:
        """The parallel layout; RNG states are only restored under an identical one."""
        return Layout(tensor=self.ctx.tp_size, pipeline=self.ctx.pp_size, data=self.ctx.dp_size,
                      stage_layers=tuple(self.stage_sizes), sequence_parallel=bool(self.args.sequence_parallel),
                      distributed_optimizer=bool(self.args.use_distributed_optimizer))

    def save(self) -> None:
        self.checkpointer.save(self.iteration, self.checkpoint_metadata(), self.chunks, self.optimizer, self.ctx,
                               self.device)
        self.last_saved = self.iteration
        if self.args.async_save:
            self.log(f"checkpoint iteration {self.iteration}: training resumed after "
                     f"{self.checkpointer.last_stall_s:.3f} s; the files are written in the background")

    def restore(self, reader: CheckpointReader) -> None:
        """Load a checkpoint found by Checkpointer.find, as --finetune / --no-load-optim / --no-load-rng say."""
        args, checkpoint = self.args, reader.checkpoint_metadata()
        meta = checkpoint.training
        check_compatible(reader.metadata, self.config, self.tokenizer.checksum() if self.tokenizer else None,
                         reader.directory, self.log)
        saved = meta.layout
        load_rng = not (args.no_load_rng or args.finetune)
        if load_rng and saved != self.layout():
            self.log(f"note: RNG states not restored: saved under {saved.to_json()}, running under "
                     f"{self.layout().to_json()}")
            load_rng = False
        checkpoint_state.load(self.chunks, self.optimizer, self.ctx, self.device, reader, meta.optimizer_steps,
                              load_optimizer=not (args.no_load_optim or args.finetune), load_rng=load_rng)
        reader.close()
        if args.finetune:
            self.log(f"loaded the weights of {reader.directory} (--finetune): starting at iteration 0")
            return
        self.iteration, self.consumed_samples = checkpoint.iteration, meta.consumed_samples
        self.skips.total = meta.skipped_iterations
        self.last_saved = self.iteration
        if self.scaler and meta.loss_scaler:
            self.scaler.scale, self.scaler.clean_steps = meta.loss_scaler["scale"], meta.loss_scaler["clean_steps"]
        self.log(f"resumed from {reader.directory}: iteration {self.iteration}, consumed samples "
                 f"{self.consumed_samples} (saved under tensor {saved.tensor} x pipeline {saved.pipeline} x "
                 f"data {saved.data})")


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process peak RSS


def _datasets(args, config: ModelConfig, global_batch: int, tokenizer):
    valid_samples = (args.train_iters // args.eval_interval + 1 if args.eval_interval else 1) * args.eval_iters
    counts = (args.train_iters * global_batch, valid_samples * global_batch, 0)
    if not args.data_path:
        return BuiltinDataset(args.seq_length, counts[0], args.seed), BuiltinDataset(args.seq_length, counts[1],
                                                                                        args.seed + 1)
    options = GPTDatasetConfig(seq_length=args.seq_length, num_samples=1, seed=args.seed, eod=tokenizer.eod,
                               reset_position_ids=args.reset_position_ids, eod_mask_loss=args.eod_mask_loss)
    train, valid, _ = build_gpt_datasets(args.data_path, args.split, counts, options, args.data_cache_path)
    return train, valid


def setup(args: argparse.Namespace, world_size: int, log=print) -> Trainer:
    """Everything a run needs, validated before the process groups are created where possible."""
    validate_args(args, world_size)
    if args.data_path:  # --vocab-size is NullTokenizer's id count (as in Megatron), not the model's vocabulary
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        model_args = argparse.Namespace(**{**vars(args), "vocab_size": None}) if args.tokenizer_type == (
            "NullTokenizer") else args
        config = model_config(model_args, ModelConfig(vocab_size=padded_vocab_size(tokenizer.vocab_size)))
    else:
        tokenizer = ByteTokenizer()
        config = model_config(args, demo_config())
    check_vocab_matches(config.vocab_size, tokenizer)
    if args.seq_length > config.max_seq_len:
        raise ValueError(f"--seq-length {args.seq_length} exceeds the model's max_seq_len={config.max_seq_len}")
    if args.recompute_granularity and args.tensor_model_parallel_size > 1 and config.attention_dropout > 0:
        raise ValueError("--recompute-granularity with attention dropout under tensor parallelism is not supported "
                         "yet: the recomputed dropout masks would differ from the first forward's")
    check_model_fits_layout(config, args.tensor_model_parallel_size)
    for _, prefix in parse_data_path(args.data_path) if args.data_path else ():
        if not dataset_exists(prefix):
            raise ValueError(f"--data-path {prefix}: no {prefix}.bin/.idx pair (tools/preprocess_data.py writes one)")
    stages = args.pipeline_model_parallel_size
    if args.num_layers_per_virtual_pipeline_stage:
        per = args.num_layers_per_virtual_pipeline_stage
        if config.n_layers % (per * stages):
            raise ValueError(f"n_layers={config.n_layers} is not divisible by --num-layers-per-virtual-pipeline-stage "
                             f"({per}) x --pipeline-model-parallel-size ({stages})")
        sizes = [per] * (config.n_layers // per)
        costs = head = None
    else:
        sizes, costs, head = plan_pipeline(config, stages, args.seq_length, args.pipeline_layer_split)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    ctx = initialize_parallel(tensor=args.tensor_model_parallel_size, pipeline=stages, backend=backend,
                              timeout_minutes=args.distributed_timeout_minutes)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if ctx.rank != 0:
        log = _silent
    log(f"model: {estimate_params(config):,} parameters; layout: tensor {ctx.tp_size} x pipeline {ctx.pp_size} x "
        f"data {ctx.dp_size}" + (" with sequence parallelism" if args.sequence_parallel else ""))
    if costs is not None and stages > 1:
        log(describe_split(config, sizes, costs, head))
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    chunks = build_pipeline_chunks(config, ctx, sizes, device=device, seed=args.seed,
                                   attention_backend=args.attention_backend, dtype=dtype,
                                   sequence_parallel=args.sequence_parallel,
                                   recompute_granularity=args.recompute_granularity or "none")
    grads = DataParallelGradients(chunks, ctx, distributed_optimizer=args.use_distributed_optimizer)
    betas = (args.adam_beta1, args.adam_beta2)
    if args.use_distributed_optimizer or dtype != torch.float32:  # fp32 master weights live in the optimizer
        optimizer = DistributedOptimizer(grads, norm_weights(chunks, ctx), lr=args.lr, betas=betas,
                                         eps=args.adam_eps, weight_decay=args.weight_decay)
    else:
        params = [p for chunk in chunks for p in chunk.parameters()]
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": args.weight_decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]  # no decay on norm weights
        if FusedAdam is not None and device.type == "cuda":
            optimizer = FusedAdam(groups, lr=args.lr, betas=betas, eps=args.adam_eps, adam_w_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.adam_eps,
                                          fused=device.type == "cuda")
    global_batch = args.global_batch_size or args.micro_batch_size * ctx.dp_size
    train_data, valid_data = _datasets(args, config, global_batch, tokenizer)
    log(f"data: {'built-in corpus (CPython reference docs, bytes)' if not args.data_path else args.data_path}; "
        f"{len(train_data):,} training samples of {args.seq_length} tokens; global batch {global_batch}")
    writer = None
    if args.tensorboard_dir and ctx.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)
    scaler = LossScaler(args.initial_loss_scale) if args.fp16 else None
    checkpointer = (Checkpointer(args.save, args.keep_last, args.async_save, log) if args.save or args.load
                    else None)
    trainer = Trainer(args, config, ctx, chunks, grads, optimizer, train_data, valid_data, device, dtype, scaler, log,
                      writer, tokenizer, checkpointer, sizes)
    if args.load:
        reader = checkpointer.find(args.load, args.ckpt_step)
        if reader is not None:
            trainer.restore(reader)
        elif args.finetune:
            raise CheckpointError(f"--finetune: no checkpoint in --load {args.load}")
        else:
            log(f"no checkpoint in {args.load} yet: starting from iteration 0")
    return trainer


def _silent(*_args) -> None:
    """Log sink of every rank but global rank 0."""
