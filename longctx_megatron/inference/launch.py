"""What the inference tools share: Megatron-style flags for the model and tokenizer, the process
group (one process per tensor x context-parallel rank, under torchrun or alone), the checkpoint loaded onto this
rank's shard, the tokenizer checked against the checkpoint's, and the engine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.hf import ConversionError
from longctx_megatron.config import ConfigError
from longctx_megatron.data.tokenizers import TOKENIZER_TYPES, Tokenizer, build_tokenizer, tokenizer_arguments
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.loading import LoadedModel, load_model
from longctx_megatron.inference.quantize import QUANTIZATIONS, quantize_weights
from longctx_megatron.parallel.state import (
    ParallelContext,
    ParallelLayoutError,
    default_backend,
    initialize_parallel,
)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="a --save directory or a Hugging Face model directory")
    parser.add_argument("--ckpt-step", type=int, help="this iteration instead of the tracker's")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--vocab-size", type=int, help="NullTokenizer: ids before eod")
    parser.add_argument("--vocab-file", help="GPT2BPETokenizer's vocab.json")
    parser.add_argument("--merge-file", help="GPT2BPETokenizer's merges.txt")
    parser.add_argument("--tiktoken-pattern", choices=["v1", "v2"])
    parser.add_argument("--tiktoken-num-special-tokens", type=int)
    parser.add_argument("--tiktoken-special-tokens", nargs="+")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1,
                        help="prefill long prompts split over this many ranks (parallel/context.py), then decode")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    parser.add_argument("--history-on-host", action="store_true",
                        help="keep the sliding layers' global-query history in host memory (ADR 0013)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="int8: weight-only int8 projections (torchao; longctx_megatron/inference/quantize.py)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")


@dataclass
class Session:
    ctx: ParallelContext
    tokenizer: Tokenizer
    loaded: LoadedModel
    engine: InferenceEngine

    @property
    def speaks(self) -> bool:
        """Whether this rank prints and writes files (rank 0)."""
        return self.ctx.rank == 0


def open_session(args, log=print) -> Session:
    """The engine for ``args`` (add_model_flags); every rank calls this together."""
    for flag in ("tensor_model_parallel_size", "context_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tensor_model_parallel_size * args.context_parallel_size:
        raise ParallelLayoutError(f"{world} processes for --tensor-model-parallel-size "
                                  f"{args.tensor_model_parallel_size} x --context-parallel-size "
                                  f"{args.context_parallel_size}: launch one process per tensor x context rank")
    tokenizer = build_tokenizer(**tokenizer_arguments(args))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    ctx = initialize_parallel(tensor=args.tensor_model_parallel_size, backend=default_backend(device),
                              context=args.context_parallel_size)
    quiet = log if ctx.rank == 0 else (lambda *_: None)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    loaded = load_model(args.load, ctx, device, dtype, step=args.ckpt_step, log=quiet)
    saved = (loaded.tokenizer or {}).get("checksum")
    if saved and saved != tokenizer.checksum():
        raise CheckpointError(f"{args.load} was trained with another tokenizer ({loaded.tokenizer.get('name')}) "
                              f"than --tokenizer-type {args.tokenizer_type} {args.tokenizer_model or ''}")
    if tokenizer.vocab_size > loaded.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {loaded.config.vocab_size}")
    quantize_weights(loaded.model, args.quantize)
    quantized = f", projections quantized to {args.quantize}" if args.quantize != "none" else ""
    quiet(f"loaded {loaded.source}{quantized}")
    engine = InferenceEngine(loaded.model, args.prefill_chunk, "cpu" if args.history_on_host else None, ctx.tp_group,
                             ctx)
    return Session(ctx, tokenizer, loaded, engine)


# A user's mistake (a flag, a file, a checkpoint, a missing package): a message and exit code 2.
USER_ERRORS = (ValueError, ConfigError, CheckpointError, ConversionError, ParallelLayoutError, OSError, ImportError)


def tool_main(args, run: Callable, log=print) -> int:
    """``run(args, log)`` as a command: 0 on success, 2 with ``error: ...`` on stderr for a user's
    mistake (no traceback), the process group torn down either way."""
    try:
        run(args, log)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
