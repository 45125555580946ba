"""The inference memory model against measurement: a grid of tiny models, each run through ``generate``.

Each cell builds a tiny model on the CPU, tracks its weights, and measures with ``PeakTracker`` the peak
of live tensor bytes over a real prefill and decode (``generate``); ``estimate_inference`` predicts it
from the config alone. The test holds every cell to 10%, and ``inference_rows`` gives a benchmark the
same grid as rows (estimate, measured, error).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.memory.inference import estimate_inference
from longctx_megatron.memory.measure import PeakTracker
from longctx_megatron.model.build import build_model

# Layer plans: each kind alone, and the design's mix. Head dim 32, 2 KV heads; window 64, a global
# token every 16 positions, dilated 16 x 2.
PLANS = {
    "full": dict(attention_layout="full:2"),
    "sliding": dict(attention_layout="sliding:2", global_every=0),
    "sliding+global": dict(attention_layout="sliding:2"),
    "dilated": dict(attention_layout="dilated:2"),
    "mixed": dict(attention_layout="sliding:2,dilated:2,full:1"),
}
# A short prompt (weights and the chunk's working set dominate) and a long one (full caches and the
# sliding layers' history dominate); both decode across a global position (48; 1504).
PROMPTS = {"short": 44, "long": 1500}
NEW_TOKENS = 6
CHUNK = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Cell:
    plan: str
    batch: int
    prompt: str
    dtype: str
    chunk: int = CHUNK
    new_tokens: int = NEW_TOKENS

    @property
    def name(self) -> str:
        return f"{self.plan}-b{self.batch}-{self.prompt}-{self.dtype}"

    @property
    def config(self) -> ModelConfig:
        fields = dict(d_model=128, n_layers=0, n_heads=4, n_kv_heads=2, d_ff=256, vocab_size=300, max_seq_len=2048,
                      sliding_window=64, global_every=16, dilated_window=16, dilation=2)
        fields.update(PLANS[self.plan])
        fields["n_layers"] = sum(int(item.split(":")[1]) for item in fields["attention_layout"].split(","))
        return ModelConfig(**fields)

    def estimate(self, phase: str = "generate"):
        return estimate_inference(self.config, self.batch, PROMPTS[self.prompt], self.new_tokens,
                                  DTYPES[self.dtype], self.chunk, phase=phase)


GRID = [Cell(*values) for values in itertools.product(PLANS, (1, 4), PROMPTS, DTYPES)]


@dataclass(frozen=True)
class Measured:
    """Peak bytes of live tensors over the prefill and over the decode steps (weights and caches included)."""

    prefill: int
    decode: int
    caches: dict[str, int]  # bytes each layer kind's caches hold (KVCache.nbytes)

    @property
    def peak(self) -> int:
        return max(self.prefill, self.decode)


def measure(cell: Cell) -> Measured:
    """Run the cell on the CPU as ``generate`` does (a prefill reserving room for the new tokens, then
    greedy decode steps) with its weights tracked first, the peak taken apart at the decode's start."""
    model = build_model(cell.config, seed=0, dtype=DTYPES[cell.dtype]).eval()
    engine = InferenceEngine(model, prefill_chunk=cell.chunk)
    generator = torch.Generator().manual_seed(0)
    length = PROMPTS[cell.prompt]
    prompts = torch.randint(0, cell.config.vocab_size, (cell.batch, length), generator=generator).tolist()
    with PeakTracker() as tracker:
        for param in model.parameters():
            tracker.track(param)
        cache, logits = engine.prefill(prompts, capacity=length + cell.new_tokens)
        prefill = tracker.peak
        tracker.reset_peak()
        for _ in range(cell.new_tokens - 1):  # generate samples the last token without decoding it
            logits = engine.decode(cache, logits.argmax(dim=-1))
    kinds = {kind: size for kind, size in cache.nbytes().items() if kind not in ("device", "history")}
    return Measured(prefill, tracker.peak, kinds)


def inference_rows(cells: list[Cell] = GRID) -> list[tuple[str, int, int, float]]:
    """(cell name, estimated bytes, measured bytes, relative error of the estimate) per cell."""
    rows = []
    for cell in cells:
        estimated, measured = cell.estimate().total, measure(cell).peak
        rows.append((cell.name, estimated, measured, estimated / measured - 1))
    return rows
