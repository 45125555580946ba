"""What cutting a window to the longest packed document saves (decompose._window_cut_to_documents).

Run ``python benchmarks/document_window_cut.py`` (``--help`` for the flags). With packed documents
shorter than a sliding window, the keys of the window beyond the longest document are masked for
every query; the backends get the window cut to that length. This compares, in one process and with
alternating repeats, forward+backward of one sliding layer (chunked backend, documents of the given
maximum length packed into each sample) with the window cut (``attend``, what the model runs) and
uncut (the chunked window primitive called with the layer's own window: the code before the cut).
Both compute the same values (checked here on every case); ``cut/uncut`` is the ratio of the
medians, below 1 when the cut pays off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.backends.chunked import sdpa_window_attention
from longctx_megatron.model.attention.patterns import Documents, SlidingPattern


def documents(batch: int, seq_len: int, longest: int) -> Documents:
    """Documents of seeded random lengths in [longest / 4, longest], the first exactly ``longest``."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        lengths = [longest]
        while sum(lengths) < seq_len:
            lengths.append(int(torch.randint(longest // 4, longest + 1, (), generator=generator)))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq_len]
        rows.append(ids)
    return Documents(torch.stack(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--longest", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                        help="longest document of each case (default: 512 1024 2048 4096)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, alternating")
    args = parser.parse_args()

    backend = factory.create("chunked")
    pattern = SlidingPattern(args.window)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, args.heads, args.seq_len, args.head_dim, generator=generator).requires_grad_()
    k, v = (torch.randn(1, args.kv_heads, args.seq_len, args.head_dim, generator=generator).requires_grad_()
            for _ in range(2))
    grad = torch.randn(q.shape, generator=generator)
    print(f"chunked sliding W={args.window}, T={args.seq_len}, {args.heads}/{args.kv_heads} heads, "
          f"head dim {args.head_dim}, fwd+bwd, median of {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'longest doc':>12} {'cut ms':>9} {'uncut ms':>9} {'cut/uncut':>10}")
    for longest in args.longest:
        docs = documents(1, args.seq_len, longest)
        segments = (docs.ids, docs.ids)
        variants = {
            "cut": lambda docs=docs: backend.attend(q, k, v, pattern, 0.0, docs),
            "uncut": lambda segments=segments: sdpa_window_attention(q, k, v, args.window, segments),
        }
        with torch.no_grad():
            torch.testing.assert_close(variants["cut"](), variants["uncut"](), atol=1e-5, rtol=1e-5)
        times = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first round is a warm-up
            for name, run in variants.items():
                start = time.perf_counter()
                run().backward(grad)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        cut, uncut = (statistics.median(times[name]) * 1e3 for name in ("cut", "uncut"))
        print(f"{longest:>12} {cut:>9.1f} {uncut:>9.1f} {cut / uncut:>10.2f}")


if __name__ == "__main__":
    main()
