"""Weight-only int8 against fp32 and bf16 on the demo's checkpoint: weight memory, decode speed, perplexity.

Run ``make demo`` first, then ``python benchmarks/quantization.py`` (``--help`` for the flags). The
checkpoint (TP2 x PP2, resharded on load to one process) is loaded four ways: fp32, bf16, int8
projections with fp32 activations, and int8 with bf16 activations. For each: the bytes its
weights hold (int8 data and scales for the quantized ones), the median decode ms/token of batch 1
after a ``--context``-token prompt (``--steps`` steps, the variants alternating step by step), and
the perplexity of the validation documents (the last 5% of the built-in corpus's documents,
which the demo's ``--split 95,5,0`` holds out), scored in non-overlapping windows of
``--window`` tokens through the chunked prefill. Ratios are against bf16 (memory) and fp32
(perplexity).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.data.builtin_corpus import builtin_documents
from longctx_megatron.data.tokenizers import build_tokenizer
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.loading import load_model
from longctx_megatron.inference.quantize import is_projection, quantize_weights, weight_bytes
from longctx_megatron.inference.scoring import continuation_logprob
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.state import initialize_parallel

VARIANTS = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"),
            "int8 (fp32 activations)": (torch.float32, "int8"), "int8 (bf16 activations)": (torch.bfloat16, "int8")}


def validation_tokens(tokenizer, fraction: float = 0.05) -> list[list[int]]:
    documents = builtin_documents()
    held_out = documents[len(documents) - max(1, round(len(documents) * fraction)):]
    return [tokenizer.encode(text) + [tokenizer.eod] for text in held_out]


def perplexity(engine: InferenceEngine, documents: list[list[int]], window: int) -> float:
    total, count = 0.0, 0
    for tokens in documents:
        for start in range(0, len(tokens) - 1, window):
            piece = tokens[start:start + window + 1]
            if len(piece) < 2:
                continue
            total -= continuation_logprob(engine, piece[:1], piece[1:])[0]
            count += len(piece) - 1
    return math.exp(total / count)


def design_7b_weight_bytes() -> tuple[int, int]:
    """(bf16 bytes, int8-projection bytes) of the design's 7B by parameter count: the projections'
    int8 data and one bf16 scale per output row, everything else in bf16 (meta device, nothing allocated)."""
    model = build_model(ModelConfig(), "meta")
    bf16 = sum(p.numel() for p in model.parameters()) * 2
    int8 = bf16
    for name, module in model.named_modules():
        if is_projection(module, name):
            rows, columns = module.weight.shape
            int8 -= rows * columns * 2 - (rows * columns + rows * 2)
    return bf16, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default="runs/tiny-cpu/checkpoints")
    parser.add_argument("--tokenizer-model", default="runs/tiny-cpu/tokenizer.model")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--window", type=int, default=512, help="perplexity window (the demo's --seq-length)")
    args = parser.parse_args()

    ctx = initialize_parallel()
    tokenizer = build_tokenizer("SentencePieceTokenizer", args.tokenizer_model)
    engines = {}
    for name, (dtype, method) in VARIANTS.items():
        model = load_model(args.load, ctx, torch.device("cpu"), dtype, log=lambda *_: None).model
        engines[name] = InferenceEngine(quantize_weights(model, method))
    documents = validation_tokens(tokenizer)
    prompt = [token for document in documents for token in document][:args.context]
    caches, tokens = {}, torch.tensor([tokenizer.eod])
    for name, engine in engines.items():
        caches[name] = engine.prefill([prompt], capacity=len(prompt) + args.steps + 1)[0]
    times = {name: [] for name in engines}
    for _ in range(args.steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.decode(caches[name], tokens)
            times[name].append(time.perf_counter() - start)
    rows = {name: (weight_bytes(engine.model), statistics.median(times[name]) * 1e3,
                   perplexity(engine, documents, args.window)) for name, engine in engines.items()}
    print(f"{args.load}: {len(documents)} validation documents ({sum(map(len, documents))} tokens), decode after "
          f"{len(prompt)} tokens, median of {args.steps} alternating steps, {torch.get_num_threads()} threads")
    print(f"{'variant':>24} {'weights MB':>11} {'vs bf16':>8} {'decode ms':>10} {'perplexity':>11} {'vs fp32':>8}")
    for name, (held, ms, ppl) in rows.items():
        print(f"{name:>24} {held / 1e6:>11.3f} {held / rows['bf16'][0]:>8.2f} {ms:>10.2f} {ppl:>11.3f} "
              f"{ppl / rows['fp32'][2]:>8.4f}")
    bf16, int8 = design_7b_weight_bytes()
    demo = engines["fp32"].model
    share = demo.embedding.weight.numel() / sum(p.numel() for p in demo.parameters())
    print(f"the demo's tied embedding (kept in its dtype) is {share:.0%} of its parameters; the design 7B by "
          f"parameter count: bf16 {bf16 / 1e9:.3f} GB, int8 projections {int8 / 1e9:.3f} GB "
          f"({int8 / bf16:.2f} of bf16)")


if __name__ == "__main__":
    main()
