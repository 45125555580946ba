"""Long-range retrieval of a checkpoint on a grid of context lengths x depths: passkey and needle.

    python tools/evaluate_longctx.py --load runs/tiny-cpu/checkpoints --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model runs/tiny-cpu/tokenizer.model --lengths 256 512 1024 --depths 0 0.5 1 \\
        --output-json retrieval.json --heatmap retrieval.png
    torchrun --nproc-per-node 8 tools/evaluate_longctx.py --load ckpt --tensor-model-parallel-size 8 --bf16 ...

Each cell is ``--samples`` cases (different facts and filler, seeded), scored by exact match of the
greedy answer and by the answer's log-likelihood (longctx_megatron/eval/retrieval.py). Rank 0
prints one table per task (accuracy, and mean log-likelihood in brackets), shows progress on
stderr, and writes the JSON (every case and every cell) and a length x depth heatmap PNG per task.
The model flags are tools/generate.py's; bad ones end with exit code 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.eval.heatmap import write_heatmap
from longctx_megatron.eval.retrieval import TASKS, check_fits, grid, score, summary
from longctx_megatron.inference.launch import add_model_flags, open_session, tool_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_model_flags(parser)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="context tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=4, help="cases per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json")
    parser.add_argument("--heatmap", help="PNG path; with several tasks, one file per task (name-task.png)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _check(args) -> None:
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    if any(length < 1 for length in args.lengths):
        raise ValueError("--lengths must be positive")
    if any(not 0.0 <= depth <= 1.0 for depth in args.depths):
        raise ValueError("--depths must be within [0, 1]")
    for path in (args.output_json, args.heatmap):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{path}: its directory does not exist")


def _progress(done: int, total: int, start: float) -> None:
    width = 30
    filled = width * done // total
    elapsed = time.perf_counter() - start
    print(f"\r[{'#' * filled}{' ' * (width - filled)}] {done}/{total} cases, {elapsed:.0f} s", end="",
          file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def _tables(cells, args) -> str:
    lines = []
    for task in args.tasks:
        lines.append(f"{task}: exact-match accuracy (mean log-likelihood of the answer), {args.samples} per cell")
        lines.append("depth \\ length " + "".join(f"{length:>16}" for length in args.lengths))
        for depth in args.depths:
            row = "".join(f"{cells[(task, length, depth)][0]:>8.2f} ({cells[(task, length, depth)][1]:>5.1f})"
                          for length in args.lengths)
            lines.append(f"{depth:>15.2f} {row}")
    return "\n".join(lines)


def _heatmap_path(path: str, task: str, several: bool) -> str:
    if not several:
        return path
    stem, extension = os.path.splitext(path)
    return f"{stem}-{task}{extension or '.png'}"


def run(args, log=print) -> dict:
    _check(args)
    session = open_session(args, log)
    cases = list(grid(session.tokenizer, args.tasks, args.lengths, args.depths, args.samples, args.seed))
    check_fits(cases, session.loaded.config.max_seq_len, "--lengths")
    start = time.perf_counter()
    show = session.speaks and not args.no_progress
    results = score(session.engine, session.tokenizer, cases,
                    (lambda done, total: _progress(done, total, start)) if show else None)
    cells = summary(results)
    report = {"load": args.load, "tasks": args.tasks, "lengths": args.lengths, "depths": args.depths,
              "samples": args.samples, "seed": args.seed,
              "cells": [{"task": t, "length": n, "depth": d, "accuracy": acc, "mean_answer_logprob": lp}
                        for (t, n, d), (acc, lp) in cells.items()],
              "cases": [result.to_json() for result in results]}
    if session.speaks:
        log(_tables(cells, args))
        log(f"{len(cases)} cases in {time.perf_counter() - start:.1f} s")
        if args.output_json:
            with atomic_write(args.output_json) as file:
                json.dump(report, file, indent=1)
        if args.heatmap:
            for task in args.tasks:
                values = [[cells[(task, length, depth)][0] for length in args.lengths] for depth in args.depths]
                write_heatmap(_heatmap_path(args.heatmap, task, len(args.tasks) > 1), values)
    return report


def main(argv=None, log=print) -> int:
    return tool_main(build_parser().parse_args(argv), run, log)


if __name__ == "__main__":
    sys.exit(main())
