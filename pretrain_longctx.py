"""Pre-train a long-context GPT. With no flags: the built-in tiny model on the built-in corpus (the demo).

    python pretrain_longctx.py [--train-iters N] [--seq-length T] [--config model.yaml] ...
    torchrun --nproc_per_node 4 pretrain_longctx.py --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    torchrun --nproc_per_node 8 pretrain_longctx.py --tensor-model-parallel-size 8 --sequence-parallel --bf16 \\
        --config 7b.yaml --data-path corpus_text_document --tokenizer-type SentencePieceTokenizer ...

Flags follow Megatron-LM's names and meanings (``--help`` lists them). Bad or contradictory flags
fail before any process group starts.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from longctx_megatron.config import ConfigError
from longctx_megatron.eval.retrieval import ANSWER_ROOM
from longctx_megatron.eval.training_probe import RetrievalProbe, probe_cases
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.recovery import TrainingStopped
from longctx_megatron.training.run_config import RunConfig
from longctx_megatron.training.setup import setup, tokenizer_and_model
from longctx_megatron.training.trainer import Trainer


def retrieval_cases(run_config: RunConfig):
    """--eval-longctx-interval's (tokenizer, cases), built and checked before any process group
    starts; None without the flag."""
    flags = run_config.logging
    if not flags.eval_longctx_interval:
        return None
    tokenizer, config = tokenizer_and_model(run_config)
    lengths, where = flags.eval_longctx_lengths, "--eval-longctx-lengths"
    if not lengths:
        lengths = (min(run_config.training.seq_length, config.max_seq_len - ANSWER_ROOM),)
        where = f"--eval-longctx-lengths (not given: {lengths[0]}, from --seq-length)"
    return tokenizer, probe_cases(tokenizer, flags.eval_longctx_tasks, lengths, flags.eval_longctx_depths,
                                  flags.eval_longctx_samples, config.max_seq_len, where)


def build_trainer(argv=None, log=print) -> Trainer:
    """The Trainer of a command line, ready to ``train()``, with its retrieval probe if asked for."""
    run_config = parse_run_config(argv, int(os.environ.get("WORLD_SIZE", "1")))
    retrieval = retrieval_cases(run_config)
    trainer = setup(run_config, log=log)
    if retrieval:
        tokenizer, cases = retrieval
        trainer.probes.append(RetrievalProbe(
            run_config.logging.eval_longctx_interval, cases, tokenizer, trainer.config, trainer.ctx, trainer.device,
            run_config.model.attention_backend, log=trainer.log, writer=trainer.metrics.writer))
    return trainer


def run(argv=None, log=print) -> list[float]:
    """Train as the command line says; returns every iteration's loss."""
    return build_trainer(argv, log).train()


def main(argv=None) -> int:
    try:
        losses = run(argv)
        if (not dist.is_initialized() or dist.get_rank() == 0) and losses:
            print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} iterations")
    except (ValueError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
