"""Megatron-LM flags that have no effect here, and those refused, each with the reason.

A Megatron launch script passes kernel, fusion and data-loader switches that mean nothing to this
project (there is no fused gradient accumulation to turn off, no data-loader worker to size). They
are accepted, listed under their own heading in ``--help``, and reported once at start-up, so that a
script runs with only the script name changed and nobody believes a switch did something.

FP8/FP4 training, mixture of experts and batch-size ramps change what is trained; they are refused
with the reason, never ignored. Any flag with a refused prefix is caught before argparse, so a
refused Megatron flag this table does not spell out still gets the reason rather than "unrecognized".
"""

from __future__ import annotations

NO_EFFECT: dict[str, tuple[dict, str]] = {
    "--use-mcore-models": ({"action": "store_true"}, "megatron-core's model is the only one (deprecated in Megatron)"),
    "--transformer-impl": ({"choices": ["local", "transformer_engine", "inference_optimized"]},
                           "the kernels are chosen by --attention-backend"),
    "--no-gradient-accumulation-fusion": ({"action": "store_true"},
                                          "gradients accumulate into fp32 buffers by a plain add"),
    "--cross-entropy-loss-fusion": ({"action": "store_true"}, "the vocab-parallel cross entropy is one function"),
    "--cross-entropy-fusion-impl": ({"choices": ["native", "te"]}, "the vocab-parallel cross entropy is one function"),
    "--no-masked-softmax-fusion": ({"action": "store_true"}, "attention never materialises a masked softmax kernel"),
    "--attention-softmax-in-fp32": ({"action": "store_true"}, "softmax statistics are always fp32"),
    "--no-bias-gelu-fusion": ({"action": "store_true"}, "the model has no biases"),
    "--no-bias-swiglu-fusion": ({"action": "store_true"}, "the model has no biases"),
    "--no-bias-dropout-fusion": ({"action": "store_true"}, "the model has no biases"),
    "--no-rope-fusion": ({"action": "store_true"}, "RoPE is one PyTorch function"),
    "--no-persist-layer-norm": ({"action": "store_true"}, "no persistent LayerNorm kernel is used"),
    "--no-position-embedding": ({"action": "store_true"}, "with RoPE there is no learned position embedding"),
    "--use-cpu-initialization": ({"action": "store_true"},
                                 "parameters are always initialised from global CPU tensors, one at a time"),
    "--manual-gc": ({"action": "store_true"}, "Python's garbage collector is left to itself"),
    "--manual-gc-interval": ({"type": int}, "Python's garbage collector is left to itself"),
    "--empty-unused-memory-level": ({"type": int, "choices": [0, 1, 2]}, "the CUDA cache is never emptied"),
    "--num-workers": ({"type": int}, "batches are read in the training process"),
    "--no-mmap-bin-files": ({"action": "store_true"}, ".bin files are always memory-mapped"),
    "--no-create-attention-mask-in-dataloader": ({"action": "store_true"},
                                                 "the data loader never builds attention masks"),
    "--grad-reduce-in-bf16": ({"action": "store_true"}, "gradients are always reduced in fp32"),
    "--accumulate-allreduce-grads-in-fp32": ({"action": "store_true"}, "gradients are always reduced in fp32"),
    "--overlap-grad-reduce": ({"action": "store_true"}, "already the behaviour: buckets reduce during backward"),
    "--overlap-param-gather": ({"action": "store_true"},
                               "the distributed optimizer gathers parameters after its step, not during forward"),
    "--exit-signal-handler": ({"action": "store_true"},
                              "already the behaviour: SIGTERM/SIGUSR1 save a checkpoint and exit"),
    "--ckpt-format": ({"choices": ["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"]},
                      "checkpoints are this project's sharded format; tools/checkpoint/convert.py --to megatron "
                      "writes Megatron's"),
    "--dist-ckpt-optim-fully-reshardable": ({"action": "store_true"},
                                            "checkpoints always reshard fully on load, optimizer state included"),
    "--dist-ckpt-strictness": ({}, "checkpoints are this project's format, checked in full on load"),
    "--use-persistent-ckpt-worker": ({"action": "store_true"}, "--async-save has one background writer"),
    "--tensorboard-queue-size": ({"type": int}, "TensorBoard events are flushed at every log interval"),
    "--log-progress": ({"action": "store_true"}, "progress is in the log lines"),
    "--distributed-timeout-seconds-after-init": ({"type": int}, "one timeout applies throughout"),
    "--report-theoretical-memory": ({"action": "store_true"},
                                    "the per-rank memory estimate is always printed at start-up; "
                                    "tools/estimate_memory.py itemises it"),
}

REFUSED_PREFIXES: dict[str, str] = {
    "--fp8": "FP8 training is not supported (bf16 and fp16 are)",
    "--fp4": "FP4 training is not supported (bf16 and fp16 are)",
    "--moe-": "mixture-of-experts models are not supported (dense models only)",
    "--num-experts": "mixture-of-experts models are not supported (dense models only)",
    "--expert-": "mixture-of-experts models are not supported (dense models only)",
    "--rampup-batch-size": "batch-size ramp-up (deprecated in Megatron-LM itself) is not supported: the global batch "
                           "is constant",
    "--step-batch-size-schedule": "batch-size schedules are not supported: the global batch is constant",
    "--multi-latent-attention": "multi-latent attention is not supported",
    "--mtp-num-layers": "multi-token prediction is not supported",
}


def refused_flags(argv: list[str]) -> list[str]:
    """'--flag: reason' for every refused Megatron flag in ``argv`` (``--flag=value`` included)."""
    found = []
    for token in argv:
        name = token.split("=", 1)[0]
        for prefix, reason in REFUSED_PREFIXES.items():
            if name.startswith(prefix) and f"{name}: {reason}" not in found:
                found.append(f"{name}: {reason}")
    return found


def add_no_effect_flags(parser) -> None:
    """The NO_EFFECT flags, under their own heading in --help (their values are kept, never used)."""
    group = parser.add_argument_group(
        "accepted for compatibility with Megatron-LM's scripts, with no effect here (reported at start-up)")
    for name, (options, reason) in NO_EFFECT.items():
        group.add_argument(name, dest=_dest(name), default=None, help=reason, **options)


def no_effect_given(args) -> list[str]:
    """'--flag (reason)' for each NO_EFFECT flag that was given."""
    return [f"{name} ({reason})" for name, (_, reason) in NO_EFFECT.items()
            if getattr(args, _dest(name)) not in (None, False)]


def _dest(name: str) -> str:
    return "compat_" + name.removeprefix("--").replace("-", "_")
