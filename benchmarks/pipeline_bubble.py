"""Pipeline bubble: measured idle fraction per stage vs theory, for 1F1B and interleaved 1F1B.

    python benchmarks/pipeline_bubble.py [--stages 2] [--microbatches 2 4 8] [--chunks 1 2]

Each layout runs in spawned gloo processes on a model whose stages do equal work. A stage's idle
time is the time it spends blocked receiving activations or gradients (torch.distributed.recv is
wrapped); the idle fraction is that over the step time, next to the theoretical bubble
(p - 1) / (v m + p - 1) for p stages, m micro-batches and v chunks per stage (v = 1: plain 1F1B).
On a CPU the ranks share cores, so compute does not truly overlap and measured idle time also
includes waiting for a core: read the trend with m and v, not the exact values. The last line runs
the demo trainer briefly and prints its tokens/s and TFLOP/s (MFU needs --peak-tflops on CPU).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx_megatron.config import ModelConfig
from longctx_megatron.parallel.pipeline_schedule import forward_backward_pipelined
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.training.stages import build_pipeline_chunks


def _worker(rank, world, port, args, microbatches, chunks, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = initialize_parallel(pipeline=world, backend="gloo")
    layers = world * chunks * args.layers_per_chunk
    config = ModelConfig(d_model=args.d_model, n_layers=layers, n_heads=4, n_kv_heads=2, d_ff=4 * args.d_model,
                         vocab_size=256, max_seq_len=args.seq_length, attention_layout=f"sliding:{layers}",
                         sliding_window=128, global_every=0)
    model_chunks = build_pipeline_chunks(config, ctx, [args.layers_per_chunk] * (world * chunks),
                                         attention_backend="chunked")
    generator = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 256, (1, args.seq_length), generator=generator),
                "labels": torch.randint(0, 256, (1, args.seq_length), generator=generator)}
               for _ in range(microbatches)]
    waited = [0.0]
    receive = dist.recv

    def timed_recv(*a, **k):
        start = time.perf_counter()
        result = receive(*a, **k)
        waited[0] += time.perf_counter() - start
        return result

    dist.recv = timed_recv
    shape = (1, args.seq_length, args.d_model)
    forward_backward_pipelined(model_chunks, batches, ctx, shape)  # warm-up
    fractions = []
    for _ in range(args.repeats):
        dist.barrier()
        waited[0] = 0.0
        start = time.perf_counter()
        forward_backward_pipelined(model_chunks, batches, ctx, shape)
        fractions.append(waited[0] / (time.perf_counter() - start))
    results.put((rank, sorted(fractions)[len(fractions) // 2]))
    dist.destroy_process_group()


def measure(args, microbatches: int, chunks: int, port: int) -> list[float]:
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(r, args.stages, port, args, microbatches, chunks, results))
                 for r in range(args.stages)]
    for process in processes:
        process.start()
    outcome = dict(results.get(timeout=600) for _ in processes)
    for process in processes:
        process.join()
    return [outcome[r] for r in range(args.stages)]


def demo_line() -> str:
    from longctx_megatron.training.arguments import parse_run_config
    from longctx_megatron.training.setup import setup

    lines = []
    setup(parse_run_config(["--train-iters", "10", "--log-interval", "10", "--eval-iters", "1"], 1),
          log=lines.append).train()
    dist.destroy_process_group()
    return next(line for line in lines if line.startswith("iteration"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers-per-chunk", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    p = args.stages
    print(f"{p} stages, equal work per chunk ({args.layers_per_chunk} layer(s), d_model {args.d_model}, "
          f"{args.seq_length} tokens per micro-batch); CPU, gloo, median of {args.repeats} steps\n")
    header = f"{'schedule':<16} {'m':>3} {'theory':>7}  " + "  ".join(f"{'stage ' + str(r):>8}" for r in range(p))
    print(header + "\n" + "-" * len(header))
    port = 29700
    for chunks in args.chunks:
        for m in args.microbatches:
            if chunks > 1 and m % p:
                continue
            theory = (p - 1) / (chunks * m + p - 1)
            measured = measure(args, m, chunks, port)
            port += 1
            name = "1F1B" if chunks == 1 else f"interleaved v={chunks}"
            print(f"{name:<16} {m:>3} {theory:>7.1%}  " + "  ".join(f"{f:>8.1%}" for f in measured))
    print(f"\ndemo (python pretrain_longctx.py, 10 iterations): {demo_line()}")


if __name__ == "__main__":
    main()
