"""Per-process memory of a training run (or of inference) from its command line, without running it.

    python tools/estimate_memory.py [pretrain_longctx.py flags] [--world-size N] [--device cuda|cpu]
        [--memory-per-device GiB] [--largest seq-length|micro-batch] [--layouts DEVICES]
    python tools/estimate_memory.py --inference --batch 8 --prompt-length 102400 [model flags]

Takes pretrain_longctx.py's flags as they are (a Megatron-style script's line with the script name
changed) and prints every pipeline rank's estimated peak, term by term (longctx_megatron/memory).
With --memory-per-device it says whether the run fits; --largest gives the longest sequence (in
steps of 1024 tokens) or the largest micro-batch that fits; --layouts N ranks every layout of N
devices that fits by a simple cost model (memory/planner.py). --inference estimates generation
instead: weights, each layer kind's KV cache and the prefill working set. No data or tokenizer
file is read unless given, and nothing is allocated: a 7B model at 100K tokens answers at once.
"""

from __future__ import annotations

import argparse
import sys

import torch

from longctx_megatron.config import ConfigError, ModelConfig
from longctx_megatron.memory.estimate import estimate_training
from longctx_megatron.memory.inference import estimate_inference
from longctx_megatron.memory.planner import largest_fitting, rank_layouts
from longctx_megatron.memory.report import GIB, peak_of
from longctx_megatron.parallel.state import check_model_fits_layout
from longctx_megatron.training.arguments import build_parser, parse_run_config
from longctx_megatron.training.memory_check import device_capacity_gib, training_setup
from longctx_megatron.training.setup import check_model_and_data, stage_sizes, tokenizer_and_model

SEARCH_LIMIT = 1 << 22  # --largest seq-length searches up to this many tokens


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--world-size", type=_positive,
                        help="processes (default: TP x PP x CP, one data-parallel rank)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="where it runs: the attention kernels differ (default cuda)")
    parser.add_argument("--largest", choices=["seq-length", "micro-batch"],
                        help="the largest value that fits --memory-per-device")
    parser.add_argument("--layouts", type=_positive, metavar="DEVICES", help="rank the layouts of this many devices")
    parser.add_argument("--inference", action="store_true", help="estimate generation instead of training")
    parser.add_argument("--batch", type=_positive, default=1, help="--inference: sequences generated together")
    parser.add_argument("--prompt-length", type=_positive, help="--inference: prompt tokens (default --seq-length)")
    parser.add_argument("--new-tokens", type=_positive, default=256, help="--inference: tokens generated")
    parser.add_argument("--prefill-chunk", type=_positive, default=512, help="--inference: prompt tokens per forward")
    return parser


def _world_size(argv: list[str], given: int | None) -> int:
    if given:
        return given
    args, _ = build_parser().parse_known_args(argv)
    return ((args.tensor_model_parallel_size or 1) * (args.pipeline_model_parallel_size or 1)
            * (args.context_parallel_size or 1))


def _inference(tool, run, config: ModelConfig) -> None:
    check_model_fits_layout(config, run.parallel.tensor)
    if run.parallel.pipeline > 1 or run.parallel.context > 1:
        raise ValueError("--inference: generation runs without pipeline or context parallelism here "
                         "(drop --pipeline-model-parallel-size / --context-parallel-size)")
    length = tool.prompt_length or run.training.seq_length
    estimate = estimate_inference(config, tool.batch, length, tool.new_tokens, run.training.dtype,
                                  prefill_chunk=tool.prefill_chunk, tensor=run.parallel.tensor,
                                  device_type=tool.device)
    print(f"inference: batch {tool.batch}, prompt {length:,} tokens + {tool.new_tokens} new, "
          f"{run.training.precision}, TP {run.parallel.tensor}, {tool.device}")
    print(estimate.table())
    for note in estimate.notes:
        print(f"note: {note}")


def _training(tool, run, config: ModelConfig) -> None:
    check_model_and_data(run, config)
    sizes, _, _ = stage_sizes(run, config)
    setup = training_setup(run, config, sizes, tool.device)
    print(f"training: {config.n_layers} layers, hidden {config.d_model}, seq {run.training.seq_length:,}, "
          f"micro-batch {run.training.micro_batch_size} x {run.microbatches}, {run.training.precision}, "
          f"TP {setup.tensor}{' + SP' if setup.sequence_parallel else ''} x PP {setup.pipeline} x CP {setup.context} "
          f"x DP {setup.data}, recompute {setup.recompute}, {tool.device}")
    estimates = estimate_training(setup)
    for estimate in estimates:
        print(f"\n{estimate.where}")
        print(estimate.table())
    for note in estimates[0].notes:
        print(f"note: {note}")
    capacity = device_capacity_gib(run, torch.device("cpu"))  # --memory-per-device (0 or absent: none)
    if capacity is None:
        if tool.largest or tool.layouts:
            raise ValueError("--largest and --layouts need --memory-per-device")
        return
    worst = peak_of(estimates)
    verdict = "fits" if worst.total <= capacity * GIB else "does NOT fit"
    print(f"\npeak {worst.total / GIB:.2f} GiB ({worst.where}): {verdict} in {capacity:g} GiB per device")
    if tool.largest:
        field, step = ("seq_length", 1024) if tool.largest == "seq-length" else ("micro_batch", 1)
        # (the pipeline keeps the stages planned for --seq-length; a longer length may balance otherwise)
        best = largest_fitting(setup, int(capacity * GIB), field, step, limit=SEARCH_LIMIT)
        if not best:
            print(f"no {tool.largest} fits")
        else:
            bound = "at least " if best + step > SEARCH_LIMIT else ""
            print(f"largest {tool.largest} that fits: {bound}{best:,}")
    if tool.layouts:
        ranked = rank_layouts(setup, tool.layouts, run.global_batch, int(capacity * GIB))
        if not ranked:
            print(f"no layout of {tool.layouts} devices fits {capacity:g} GiB")
        for place, layout in enumerate(ranked[:10], 1):
            print(f"{place:2}. {layout.describe():<52} peak {layout.peak / GIB:6.2f} GiB  "
                  f"step time x{layout.seconds / ranked[0].seconds:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = _tool_parser()
    tool, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nand every flag of pretrain_longctx.py:\n")
    try:
        run = parse_run_config(rest, _world_size(rest, tool.world_size))
        _, config = tokenizer_and_model(run)
        (_inference if tool.inference else _training)(tool, run, config)
    except (ValueError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
