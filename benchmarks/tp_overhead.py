"""Tensor-parallel overhead on one machine: tokens/s at TP=1 vs TP=2 (and SP), and bytes communicated.

    python benchmarks/tp_overhead.py [--seq-length 1024] [--steps 5] [--d-model 256] ...

Each layout runs in its own spawned process group (gloo on CPU, NCCL on CUDA) on the same tiny
model and batch; a step is forward + backward + AdamW with clipping, as in the demo trainer. The
CPU cores are shared: TP=1 uses all of them in one process, TP=N gives each rank cores/N threads,
so on CPU the table shows the cost of splitting and communicating, not a speed-up.

Bytes are counted per rank per step by wrapping the collectives: all-reduce counts its tensor,
all-gather its gathered output, reduce-scatter its input (the volume a ring moves is about
2(N-1)/N of an all-reduce's tensor, and (N-1)/N for the other two). Megatron's analytical minimum
without sequence parallelism is 4 all-reduces of b*s*h elements per layer per step (two forward,
two backward); with SP each becomes an all-gather + reduce-scatter pair of the same tensor.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx_megatron.config import ModelConfig
from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.grad_norm import clip_grad_norm
from longctx_megatron.parallel.parallelize import build_parallel_model
from longctx_megatron.parallel.state import initialize_parallel


class CollectiveCounter:
    """Counts calls and bytes of the three collectives, split into activation-sized and other."""

    def __init__(self, activation_bytes: int):
        self.activation_bytes = activation_bytes
        self.reset()

    def reset(self):
        self.calls = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
        self.bytes = {"activation": 0, "other": 0}

    def _add(self, kind: str, nbytes: int):
        self.calls[kind] += 1
        self.bytes["activation" if nbytes == self.activation_bytes else "other"] += nbytes

    def install(self):
        all_reduce, gather, scatter = dist.all_reduce, mappings.all_gather_single, mappings.reduce_scatter_single

        def counted_all_reduce(tensor, *args, **kwargs):
            self._add("all_reduce", tensor.numel() * tensor.element_size())
            return all_reduce(tensor, *args, **kwargs)

        def counted_gather(output, tensor, *args, **kwargs):
            self._add("all_gather", output.numel() * output.element_size())
            return gather(output, tensor, *args, **kwargs)

        def counted_scatter(output, tensor, *args, **kwargs):
            self._add("reduce_scatter", tensor.numel() * tensor.element_size())
            return scatter(output, tensor, *args, **kwargs)

        dist.all_reduce = counted_all_reduce
        mappings.all_gather_single, mappings.reduce_scatter_single = counted_gather, counted_scatter


def _worker(rank, world_size, port, args, sequence_parallel, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, args.threads // world_size))
    ctx = initialize_parallel(tensor=world_size)
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    config = ModelConfig(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, d_ff=args.d_ff,
        vocab_size=args.vocab, max_seq_len=args.seq_length, attention_layout=f"sliding:{args.layers}",
        sliding_window=args.window, global_every=0,
    )
    model = build_parallel_model(config, ctx, device, seed=1, sequence_parallel=sequence_parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grads = DataParallelGradients([model], ctx)  # fp32 gradients; sums the SP norms' over TP
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_length), generator=generator).to(device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_length), generator=generator).to(device)
    counter = CollectiveCounter(args.batch * args.seq_length * args.d_model * 4)
    counter.install()

    def step():
        _, loss = model(ids, labels=labels)
        grads.start(1)
        loss.backward()
        grads.finish()
        clip_grad_norm(model, 1.0, ctx)
        optimizer.step()

    step()  # warm-up
    counter.reset()
    step()
    calls, nbytes = dict(counter.calls), dict(counter.bytes)
    dist.barrier()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if rank == 0:
        results.put((sorted(times)[len(times) // 2], calls, nbytes))
    dist.destroy_process_group()


def run_layout(args, tp: int, sequence_parallel: bool, port: int):
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, tp, port, args, sequence_parallel, results))
                 for rank in range(tp)]
    for process in processes:
        process.start()
    outcome = results.get(timeout=args.timeout)
    for process in processes:
        process.join()
    return outcome


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (default: 1 2)")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by the ranks")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)

    minimum = 4 * args.batch * args.seq_length * args.d_model * 4  # bytes per layer per step, fp32
    tokens = args.batch * args.seq_length
    print(f"model: {args.layers} sliding layers, d_model={args.d_model}, heads={args.heads}/{args.kv_heads}, "
          f"d_ff={args.d_ff}, vocab={args.vocab}; batch {args.batch} x {args.seq_length} tokens; fp32; "
          f"{'cuda' if torch.cuda.is_available() else f'cpu, {args.threads} threads shared by the ranks'}")
    print(f"analytical minimum without SP: 4*b*s*h*4 bytes = {minimum / 2**20:.2f} MiB per layer per step\n")
    header = (f"{'TP':>2}  {'SP':>3}  {'step_ms':>8}  {'tokens/s':>9}  {'vs TP=1':>7}  {'AR':>3}  {'AG':>3}  "
              f"{'RS':>3}  {'act MiB/layer':>13}  {'vs minimum':>10}  {'other KiB':>9}")
    print(header)
    print("-" * len(header))
    baseline = None
    layouts = [(tp, sp) for tp in args.tp for sp in ((False, True) if tp > 1 else (False,))]
    for index, (tp, sp) in enumerate(layouts):
        step_time, calls, nbytes = run_layout(args, tp, sp, 29600 + index)
        rate = tokens / step_time
        baseline = baseline or rate
        per_layer = nbytes["activation"] / args.layers
        # With SP an all-reduce's volume is split over an all-gather and a reduce-scatter: compare
        # their sum with the all-reduce minimum at half weight each.
        effective = per_layer / 2 if sp else per_layer
        print(f"{tp:>2}  {'yes' if sp else 'no':>3}  {step_time * 1e3:>8.1f}  {rate:>9,.0f}  {rate / baseline:>7.2f}  "
              f"{calls['all_reduce']:>3}  {calls['all_gather']:>3}  {calls['reduce_scatter']:>3}  "
              f"{per_layer / 2**20:>13.2f}  {(effective / minimum if tp > 1 else 0):>10.2f}  "
              f"{nbytes['other'] / 2**10:>9.1f}")
    print("\nact MiB/layer: activation-sized collective bytes per layer per step (embedding and head included,"
          " spread over the layers); vs minimum: that over 4*b*s*h*4 (all-gather + reduce-scatter pairs count"
          " as one all-reduce); other: loss, norm and gradient-norm reductions.")


if __name__ == "__main__":
    main()
