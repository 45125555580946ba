"""Entry point. With no flags: train the built-in tiny model on the built-in corpus (the demo).

    python pretrain_longctx.py [--config model.yaml] [--train-iters N] [--seq-length T] ...
    torchrun --nproc_per_node 2 pretrain_longctx.py --tensor-model-parallel-size 2 --sequence-parallel

Flag names follow Megatron-LM; pipeline and data parallelism arrive with the distributed trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch.distributed

from longctx_megatron.config import ConfigError, load_config
from longctx_megatron.model.attention import factory
from longctx_megatron.training.simple_trainer import RunSettings, demo_config, train


def parse_args(argv=None) -> argparse.Namespace:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="model config (.yaml/.json); default: the built-in tiny model")
    parser.add_argument("--attention-layout", help="override the layer plan, e.g. sliding:2,dilated:1,full:1")
    parser.add_argument("--train-iters", type=int, default=defaults.train_iters)
    parser.add_argument("--seq-length", type=int, default=defaults.seq_length)
    parser.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--lr-warmup-iters", type=int, default=defaults.warmup_iters)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--clip-grad", type=float, default=defaults.clip_grad)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-interval", type=int, default=defaults.log_interval)
    parser.add_argument("--attention-backend", default="auto", choices=["auto", *factory.list_variants()])
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="ranks that split every weight matrix (launch that many processes with torchrun)")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="shard norms and dropout along the sequence between tensor-parallel regions")
    args = parser.parse_args(argv)
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        parser.error("--sequence-parallel needs --tensor-model-parallel-size > 1")
    for name in ("train_iters", "seq_length", "micro_batch_size", "log_interval", "tensor_model_parallel_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config) if args.config else demo_config()
        if args.attention_layout:
            config = dataclasses.replace(config, attention_layout=args.attention_layout, layers=None)
    except (ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = RunSettings(
        train_iters=args.train_iters, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        lr=args.lr, warmup_iters=args.lr_warmup_iters, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        seed=args.seed, log_interval=args.log_interval, attention_backend=args.attention_backend, device=args.device,
        tensor_parallel=args.tensor_model_parallel_size, sequence_parallel=args.sequence_parallel,
    )
    try:
        losses = train(config, settings)
    except ValueError as error:  # ConfigError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
