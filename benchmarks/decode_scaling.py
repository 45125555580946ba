"""Decode cost against context length: the design's layer plan vs every layer full, one run.

Run ``python benchmarks/decode_scaling.py`` (``--help`` for the flags). Four tables:

1. Decode on CPU. A model with the design's 16/12/4 sliding/dilated/full plan scaled to 4/3/1
   layers (sliding W=1024 with a global token every 128, dilated W=256 r=4, as the design's
   4096/128 and 1024/4 scaled by 1/4 in window), and the same model with every layer full, at each
   context T. The caches are filled to T by their own ``write`` with random keys (decode time does
   not depend on the keys' values, and prefilling the all-full model at 100K on 2 cores would take
   most of an hour); then ``--steps`` decode steps of batch 1, alternating between the two models,
   so one global step in every 128 is included. ms/token is the median and the mean (the mean holds
   the global steps); ``bytes/step`` is what the layer rules say one step reads (weights and the
   keys and values of every visible key, averaged over G steps), and ``ratio`` is against the
   first T.
2. Cache bytes per sequence of the design's 7B in bf16, per layer kind, at 4K and 100K: built on
   the meta device from the real cache classes (nothing is allocated), with the sliding layers'
   global-query history on the device or on the host.
3. The predicted 100K/4K decode ratio of the design's 7B in bf16 at batch 1 and 8, when a step
   costs what it reads (decode is bound by memory bandwidth): (weights + batch x cache reads at
   100K) / (the same at 4K). Next to it, the same prediction for the CPU model, and the ratio
   measured in table 1.
4. Peak memory of a prefill of ``--prefill-context`` tokens (the CPU model, random prompt) by
   chunk size: each in a fresh process, the growth of its resident high-water mark (VmHWM) during
   the prefill, and the time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.inference.cache import KVCache
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.model.attention.patterns import pattern_for
from longctx_megatron.model.build import build_model

CPU_MODEL = dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=688, vocab_size=512, max_seq_len=131072,
                 sliding_window=1024, global_every=128, dilated_window=256, dilation=4,
                 attention_layout="sliding:4,dilated:3,full:1")


def cpu_config(all_full: bool = False) -> ModelConfig:
    return ModelConfig(**{**CPU_MODEL, "attention_layout": "full:8" if all_full else CPU_MODEL["attention_layout"]})


def keys_read_per_step(config: ModelConfig, context: int) -> float:
    """Keys (per KV head, summed over layers and heads) one decode step at ``context`` reads by the
    rules, averaged over the next lcm-free G steps: every query position from context to context+G-1."""
    total = 0.0
    for spec in config.layer_plan():
        pattern = pattern_for(spec, config.group_size)
        period = spec.global_every or 1
        for head in range(0, config.n_heads, config.group_size):  # one query head per KV head
            counts = pattern.keys_per_query(context + period, head)[context:context + period]
            total += float(counts.float().mean())
    return total


def bytes_read_per_step(config: ModelConfig, context: int, batch: int, element_bytes: int) -> float:
    weights = sum(p.numel() for p in build_model(config, "meta").parameters()) * element_bytes
    per_key = 2 * config.head_dim * element_bytes  # its key and value
    return weights + batch * keys_read_per_step(config, context) * per_key


def fill(cache: KVCache, context: int, generator: torch.Generator, chunk: int = 4096) -> None:
    """Every layer's cache holding ``context`` random keys, written as a prefill would write them."""
    for start in range(0, context, chunk):
        positions = torch.arange(start, min(start + chunk, context))[None]
        for layer in cache.layers.values():
            shape = (1, layer.n_kv, positions.shape[1], layer.head_dim)
            layer.write(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), positions)
    cache.lengths = torch.tensor([context])


def decode_table(args) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    models = {name: build_model(cpu_config(name == "all full"), seed=1).eval() for name in ("design plan", "all full")}
    engines = {name: InferenceEngine(model) for name, model in models.items()}
    rows = []
    for context in args.contexts:
        caches = {}
        for name, engine in engines.items():
            caches[name] = engine.new_cache(1, context + args.steps)
            fill(caches[name], context, generator)
        times = {name: [] for name in engines}
        token = torch.tensor([1])
        for _ in range(args.steps):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.decode(caches[name], token)
                times[name].append(time.perf_counter() - start)
        for name in engines:
            config = models[name].config
            rows.append({"model": name, "context": context, "median_ms": statistics.median(times[name]) * 1e3,
                         "mean_ms": statistics.mean(times[name]) * 1e3,
                         "cache_bytes": caches[name].nbytes()["device"],
                         "bytes_per_step": bytes_read_per_step(config, context, 1, 4)})
        del caches
    print(f"\n1. decode on CPU, fp32, batch 1, {args.steps} steps per context alternating between the models, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':>12} {'context':>8} {'median ms':>10} {'mean ms':>9} {'ratio':>6} {'cache MB':>9} "
          f"{'MB/step':>8} {'ratio':>6}")
    for name in engines:
        mine = [row for row in rows if row["model"] == name]
        for row in mine:
            print(f"{name:>12} {row['context']:>8} {row['median_ms']:>10.2f} {row['mean_ms']:>9.2f} "
                  f"{row['mean_ms'] / mine[0]['mean_ms']:>6.2f} {row['cache_bytes'] / 1e6:>9.1f} "
                  f"{row['bytes_per_step'] / 1e6:>8.1f} {row['bytes_per_step'] / mine[0]['bytes_per_step']:>6.2f}")
    return rows


def cache_bytes_table(contexts: list[int]) -> None:
    model = build_model(ModelConfig(), "meta")
    print("\n2. cache bytes per sequence, design 7B (32 layers: 16 sliding W=4096 G=128, 12 dilated W=1024 r=4, "
          "4 full; 8 KV heads of 128), bf16, from the cache classes on the meta device")
    print(f"{'context':>8} {'full GB':>8} {'sliding GB':>11} {'dilated GB':>11} {'history GB':>11} "
          f"{'device GB, history on device':>29} {'device GB, history on host':>27}")
    for context in contexts:
        held = KVCache(model, 1, "meta", torch.bfloat16, capacity=context).nbytes()
        print(f"{context:>8} {held['full'] / 1e9:>8.3f} {(held['sliding'] - held['history']) / 1e9:>11.3f} "
              f"{held['dilated'] / 1e9:>11.3f} {held['history'] / 1e9:>11.3f} {held['device'] / 1e9:>29.3f} "
              f"{(held['device'] - held['history']) / 1e9:>27.3f}")


def prediction_table(rows: list[dict], contexts: list[int]) -> None:
    short, long = min(contexts), max(contexts)
    design = ModelConfig()
    print(f"\n3. predicted decode ratio {long}/{short} when a step costs what it reads (memory bound)")
    print(f"{'model':>24} {'batch':>6} {'GB/step short':>14} {'GB/step long':>13} {'predicted':>10} {'measured':>9}")
    for batch in (1, 8):
        a, b = (bytes_read_per_step(design, context, batch, 2) for context in (short, long))
        print(f"{'design 7B, bf16':>24} {batch:>6} {a / 1e9:>14.3f} {b / 1e9:>13.3f} {b / a:>10.2f} {'-':>9}")
    for name, all_full in (("CPU design plan, fp32", False), ("CPU all full, fp32", True)):
        a, b = (bytes_read_per_step(cpu_config(all_full), context, 1, 4) for context in (short, long))
        mine = {row["context"]: row["mean_ms"] for row in rows if row["model"] == name.split(", ")[0][4:]}
        measured = f"{mine[long] / mine[short]:.2f}" if short in mine and long in mine else "-"
        print(f"{name:>24} {1:>6} {a / 1e9:>14.3f} {b / 1e9:>13.3f} {b / a:>10.2f} {measured:>9}")


def _high_water_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _prefill_case(context: int, chunk: int, results) -> None:
    engine = InferenceEngine(build_model(cpu_config(), seed=1).eval(), prefill_chunk=chunk)
    prompt = torch.randint(0, 512, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    before = _high_water_kib()
    start = time.perf_counter()
    cache, _ = engine.prefill([prompt], capacity=context)
    results.put((chunk, time.perf_counter() - start, (_high_water_kib() - before) * 1024, cache.nbytes()["device"]))


def prefill_table(args) -> None:
    print(f"\n4. prefill of {args.prefill_context} tokens, CPU design-plan model, fp32, each chunk size in a fresh "
          "process: growth of the resident high-water mark during the prefill, of which the caches it fills")
    print(f"{'chunk':>6} {'time s':>8} {'peak growth MB':>15} {'caches MB':>10} {'rest MB':>8}")
    context = multiprocessing.get_context("spawn")
    for chunk in args.prefill_chunks:
        results = context.Queue()
        process = context.Process(target=_prefill_case, args=(args.prefill_context, chunk, results))
        process.start()
        chunk_, seconds, growth, cache_bytes = results.get()
        process.join()
        print(f"{chunk_:>6} {seconds:>8.1f} {growth / 1e6:>15.1f} {cache_bytes / 1e6:>10.1f} "
              f"{(growth - cache_bytes) / 1e6:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 102400])
    parser.add_argument("--steps", type=int, default=128, help="decode steps per context and model (default: 128)")
    parser.add_argument("--prefill-context", type=int, default=102400)
    parser.add_argument("--prefill-chunks", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    args = parser.parse_args()
    rows = [] if args.skip_decode else decode_table(args)
    cache_bytes_table([min(args.contexts), max(args.contexts)])
    prediction_table(rows, args.contexts)
    if not args.skip_prefill:
        prefill_table(args)


if __name__ == "__main__":
    main()
