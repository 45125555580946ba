"""Context-parallel traffic per layer kind: the window halo and the causal prefix against all-gather and the ring.

    python benchmarks/cp_traffic.py [--repeats 3] [--steps 3]

1. Measured: one training step of a small model (T = 2048, every layer kind) under CP 2 and 4 on
   gloo; the bytes each rank puts into the context-parallel exchanges (parallel/context.py's
   ``record_traffic``), per layer and forward pass, next to what the plans say (``rows_sent`` times
   the row sizes) and to ``--cp-comm-type allgather`` measured the same way.
2. Computed from the same plans for the design's 7B (32 query heads, 8 KV heads of 128, bf16, one
   sample, TP 1; sliding W 4096 with a global token every 128, dilated W 1024 r 4) at 102,400 and
   1,048,576 tokens for CP 2, 4, 8, 16. All-gather and the ring move the same K/V bytes per rank,
   (N - 1) T / N rows; the ring overlaps them with compute and keeps one block in flight. Ours for
   full layers is the causal prefix: only the positions before a rank's last query.
3. Balance of the zigzag split: the visible query-key pairs each rank computes, max / mean over
   ranks, per layer kind, against a contiguous split (at 100K, CP 8).
4. Full-layer compute on one thread, per CP rank's queries (T = 2048, CP 2 and 4, fp32, the
   design's heads, forward and backward): a zigzag ring's arithmetic without its messages (per
   step, each of my chunks over each visible chunk of that step's block, with log-sum-exp, merged
   by ``merge_by_lse``; invisible chunks skipped) against what the layer runs (each chunk in one
   fused attention over its causal prefix): medians of alternating repeats. Both compute the same
   visible pairs; what differs is the kernel. On CPU SDPA's fused kernel returns no log-sum-exp,
   so the ring needs the recomputing kernel; on GPUs flash attention returns it at no cost.
5. Tokens/s of CP2 (2 ranks) against CP1 (1 rank) on this machine: medians of alternating repeats;
   informational, the ranks share the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longctx_megatron.model.attention.patterns import DilatedPattern, FullPattern, SlidingPattern  # noqa: E402
from longctx_megatron.model.attention.positional import attend_at_positions  # noqa: E402
from longctx_megatron.model.attention.softmax import merge_by_lse  # noqa: E402
from longctx_megatron.parallel.context import record_traffic, rows_sent, zigzag_positions  # noqa: E402
from longctx_megatron.training.arguments import parse_run_config  # noqa: E402
from longctx_megatron.training.setup import setup  # noqa: E402
from tests.distributed import run_on_ranks  # noqa: E402

SMALL = ["--seq-length", "2048", "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8",
         "--num-query-groups", "4", "--ffn-hidden-size", "256", "--sliding-window", "256", "--global-every", "32",
         "--dilated-window", "64", "--dilation", "4", "--attention-layout", "sliding:2,dilated:1,full:1",
         "--attention-backend", "chunked", "--micro-batch-size", "1", "--global-batch-size", "1", "--log-interval",
         "1000", "--eval-iters", "1", "--group-query-attention", "--swiglu", "--normalization", "RMSNorm",
         "--position-embedding-type", "rope", "--disable-bias-linear", "--hidden-dropout", "0",
         "--attention-dropout", "0"]
SMALL_PATTERNS = {"sliding": SlidingPattern(256, 32), "dilated": DilatedPattern(64, 4, 2), "full": FullPattern()}
SMALL_LAYERS = {"sliding": 2, "dilated": 1, "full": 1}
SMALL_HEADS, SMALL_KV, SMALL_DIM = 8, 4, 16  # fp32

DESIGN_PATTERNS = {"sliding": SlidingPattern(4096, 128), "dilated": DilatedPattern(1024, 4, 4), "full": FullPattern()}
DESIGN_HEADS, DESIGN_KV, DESIGN_DIM = 32, 8, 128  # bf16
DESIGN_LOCAL_LAYERS = {"sliding": 16, "dilated": 12}  # the design's 28 local layers (and 4 full)


def row_bytes(heads: int, kv_heads: int, dim: int, element: int) -> dict[str, int]:
    """Bytes of one row of each message: K and V of a position; a global query; its answer and lse (fp32)."""
    return {"kv": 2 * kv_heads * dim * element, "queries": heads * dim * element,
            "answers": heads * dim * element + heads * 4}


def planned_bytes(pattern, seq_len: int, cp: int, comm: str, sizes: dict[str, int]) -> list[int]:
    return [sum(rows * sizes[part] for part, rows in rank.items()) for rank in rows_sent(pattern, seq_len, cp, comm)]


def _measure(rank, world, flags):
    """Forward bytes sent per (layer kind) in one training step, and its time."""
    trainer = setup(parse_run_config(SMALL + flags + ["--train-iters", "1"], world), log=lambda *_: None)
    with record_traffic() as sent:
        trainer.step(0)
    by_kind = {}
    for (kind, _, direction), nbytes in sent.items():
        if direction == "forward":
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
    return by_kind


def measured_table() -> None:
    sizes = row_bytes(SMALL_HEADS, SMALL_KV, SMALL_DIM, 4)
    print("\n1. measured on gloo: forward bytes sent per rank per layer (mean over ranks), T = 2048, fp32")
    print(f"{'CP':>3} {'kind':>8} {'p2p measured':>13} {'p2p planned':>12} {'allgather':>10} {'ratio':>6}")
    for cp in (2, 4):
        counted = {comm: run_on_ranks(_measure, cp, ["--context-parallel-size", str(cp), "--cp-comm-type", comm],
                                      timeout=600) for comm in ("p2p", "allgather")}
        for kind, pattern in SMALL_PATTERNS.items():
            per_layer = {comm: statistics.mean(ranks[rank].get(kind, 0) for rank in range(cp)) / SMALL_LAYERS[kind]
                         for comm, ranks in counted.items()}
            planned = statistics.mean(planned_bytes(pattern, 2048, cp, "p2p", sizes))
            print(f"{cp:>3} {kind:>8} {per_layer['p2p']:>13,.0f} {planned:>12,.0f} {per_layer['allgather']:>10,.0f} "
                  f"{per_layer['p2p'] / per_layer['allgather']:>6.3f}")


def computed_table() -> None:
    sizes = row_bytes(DESIGN_HEADS, DESIGN_KV, DESIGN_DIM, 2)
    print("\n2. computed from the plans: the design's 7B, bf16, TP 1, one sample; MB (1e6 bytes) sent per rank "
          "per layer, forward (backward sends the same back)")
    print(f"{'tokens':>9} {'CP':>3} {'kind':>8} {'ours mean':>10} {'ours max':>9} {'allgather':>10} {'ring':>8} "
          f"{'ours/allgather':>15}")
    for seq_len in (102_400, 1_048_576):
        for cp in (2, 4, 8, 16):
            gathered = planned_bytes(FullPattern(), seq_len, cp, "allgather", sizes)[0] / 1e6
            local = 0.0
            for kind, pattern in DESIGN_PATTERNS.items():
                ours = planned_bytes(pattern, seq_len, cp, "p2p", sizes)
                mean, peak = statistics.mean(ours) / 1e6, max(ours) / 1e6
                local += DESIGN_LOCAL_LAYERS.get(kind, 0) * mean
                print(f"{seq_len:>9,} {cp:>3} {kind:>8} {mean:>10.1f} {peak:>9.1f} {gathered:>10.1f} {gathered:>8.1f} "
                      f"{mean / gathered:>15.3f}")
            local /= sum(DESIGN_LOCAL_LAYERS.values())
            print(f"{seq_len:>9,} {cp:>3} {'local':>8} {local:>10.1f} {'':>9} {gathered:>10.1f} {gathered:>8.1f} "
                  f"{local / gathered:>15.3f}   (mean of the {sum(DESIGN_LOCAL_LAYERS.values())} local layers)")


def balance_table(seq_len: int = 102_400, cp: int = 8) -> None:
    print(f"\n3. attention work per rank (visible query-key pairs), max / mean over ranks, T = {seq_len:,}, CP {cp}")
    print(f"{'kind':>8} {'zigzag':>7} {'contiguous':>11}")
    for kind, pattern in DESIGN_PATTERNS.items():
        heads = range(pattern.group_size * pattern.dilation) if isinstance(pattern, DilatedPattern) else range(1)
        keys = torch.stack([pattern.keys_per_query(seq_len, head) for head in heads]).double().sum(0)
        chunk = seq_len // cp
        zigzag = [float(keys[zigzag_positions(seq_len, cp, rank)].sum()) for rank in range(cp)]
        contiguous = [float(keys[rank * chunk:(rank + 1) * chunk].sum()) for rank in range(cp)]
        ratio = [max(work) / statistics.mean(work) for work in (zigzag, contiguous)]
        print(f"{kind:>8} {ratio[0]:>7.3f} {ratio[1]:>11.3f}")


def _chunks(positions):
    """A rank's two zigzag chunks: (rows of its part, their positions) each."""
    half = positions.numel() // 2
    return [(rows, positions[rows]) for rows in (slice(0, half), slice(half, None))]


def _ring(q, k, v, q_pos, blocks):
    """The ring's arithmetic for one rank: at each step, each of my chunks attends over each chunk of that
    step's block that it can see (causal inside its own chunk, unmasked where the block's chunk lies
    wholly before it; a chunk wholly after is skipped, as a zigzag ring skips it), merged by log-sum-exp."""
    outs = []
    for rows, mine in _chunks(q_pos):
        out = lse = None
        for k_pos in blocks:
            for _, keys in _chunks(k_pos):
                if keys[0] > mine[-1]:
                    continue
                part, part_lse = attend_at_positions(q[:, :, rows], k[:, :, keys], v[:, :, keys], FullPattern(), mine,
                                                      keys)
                out, lse = (part, part_lse) if out is None else merge_by_lse(out, lse, part, part_lse)
        outs.append(out)
    return torch.cat(outs, dim=2)


def _prefix(q, k, v, q_pos, blocks):
    """What the layer runs: each chunk in one fused attention over its causal prefix (every position up to
    its last query)."""
    outs = []
    for rows, mine in _chunks(q_pos):
        k_pos = torch.arange(int(mine[-1]) + 1)
        outs.append(attend_at_positions(q[:, :, rows], k[:, :, k_pos], v[:, :, k_pos], FullPattern(), mine, k_pos,
                                        need_lse=False)[0])
    return torch.cat(outs, dim=2)


def full_layer_compute_table(repeats: int, seq_len: int = 2048) -> None:
    print(f"\n4. full-layer attention per CP rank, forward + backward, ms on one thread (T = {seq_len:,}, fp32, "
          f"the design's {DESIGN_HEADS} heads / {DESIGN_KV} KV of {DESIGN_DIM}), medians of {repeats} alternating "
          f"repeats, summed over ranks")
    print(f"{'CP':>3} {'ring (LSE merge)':>17} {'fused prefix':>13} {'ring/prefix':>12}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, DESIGN_HEADS, seq_len, DESIGN_DIM, generator=generator)
    k, v = (torch.randn(1, DESIGN_KV, seq_len, DESIGN_DIM, generator=generator) for _ in range(2))
    for cp in (2, 4):
        mine = [zigzag_positions(seq_len, cp, rank) for rank in range(cp)]
        times = {"ring": [], "prefix": []}
        for _ in range(repeats):
            for name, attend in (("ring", _ring), ("prefix", _prefix)):  # alternating
                total = 0.0
                for rank in range(cp):
                    blocks = [mine[(rank - step) % cp] for step in range(cp)]
                    q_rank = q[:, :, mine[rank]].clone().requires_grad_(True)
                    k_leaf, v_leaf = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
                    started = time.perf_counter()
                    attend(q_rank, k_leaf, v_leaf, mine[rank], blocks).sum().backward()
                    total += time.perf_counter() - started
                times[name].append(total * 1e3)
        ring, prefix = (statistics.median(times[name]) for name in ("ring", "prefix"))
        print(f"{cp:>3} {ring:>17.1f} {prefix:>13.1f} {ring / prefix:>12.2f}")
    torch.set_num_threads(threads)


def _time_steps(rank, world, flags, steps):
    trainer = setup(parse_run_config(SMALL + flags + ["--train-iters", str(steps + 1)], world), log=lambda *_: None)
    trainer.step(0)  # warm-up
    started = time.perf_counter()
    for iteration in range(1, steps + 1):
        trainer.step(iteration)
    return time.perf_counter() - started


def throughput_table(repeats: int, steps: int) -> None:
    times = {1: [], 2: []}
    for _ in range(repeats):
        for cp in (1, 2):  # alternating, so drifts in the machine's speed hit both
            times[cp].append(max(run_on_ranks(_time_steps, cp, ["--context-parallel-size", str(cp)], steps,
                                              timeout=900)))
    tokens = steps * 2048
    rates = {cp: tokens / statistics.median(values) for cp, values in times.items()}
    print(f"\n5. tokens/s on this machine ({os.cpu_count()} cores shared), T = 2048, medians of {repeats} alternating "
          f"repeats of {steps} steps")
    print(f"{'CP1':>8} {'CP2':>8} {'CP2/CP1':>8}\n{rates[1]:>8.0f} {rates[2]:>8.0f} {rates[2] / rates[1]:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    measured_table()
    computed_table()
    balance_table()
    full_layer_compute_table(args.repeats)
    throughput_table(args.repeats, args.steps)


if __name__ == "__main__":
    main()
