"""Prefill and decode: a GPTModel (whole, or this rank's tensor-parallel shard) over per-layer caches.

``prefill`` runs the prompts through the model in chunks of ``prefill_chunk`` tokens (all
sequences of the batch in step; a shorter prompt's chunk is padded and its padding neither
attends nor is cached), so activation memory is bounded by the chunk, and computes the logits of
each prompt's last token only. ``decode`` appends one token per sequence and returns the next
logits. Logits come back as full-vocabulary float32 (B, V) on every rank: under tensor
parallelism each rank's vocabulary shard is gathered, so every rank samples the same token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.inference.cache import KVCache


class InferenceEngine:
    def __init__(self, model, prefill_chunk: int = 512, history_device=None, tp_group=None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
        if not (model.pre_process and model.post_process):
            raise ValueError("inference needs the whole layer stack on this rank (no pipeline stage split)")
        self.model = model.eval()
        self.prefill_chunk, self.history_device, self.tp_group = prefill_chunk, history_device, tp_group
        weight = model.embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = model.config.vocab_size

    def new_cache(self, batch: int, capacity: int = 0) -> KVCache:
        return KVCache(self.model, batch, self.device, self.dtype, capacity, self.history_device)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], capacity: int = 0) -> tuple[KVCache, torch.Tensor]:
        """Caches holding ``prompts`` (each at least one token) and the logits after each (B, V)."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        cache = self.new_cache(len(prompts), max(capacity, int(lengths.max())))
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        last = torch.zeros(len(prompts), self.vocab_size, dtype=torch.float32, device=self.device)
        for start in range(0, int(lengths.max()), self.prefill_chunk):
            stop = min(start + self.prefill_chunk, int(lengths.max()))
            positions = torch.arange(start, stop)[None].expand(len(prompts), -1)
            positions = torch.where(positions < lengths[:, None], positions, -1)
            ends_here = (lengths - 1 >= start) & (lengths - 1 < stop)
            at = (lengths - 1 - start).clamp(0, stop - start - 1)[:, None]
            logits = self._forward(cache, tokens[:, start:stop], positions, at)
            last[ends_here.to(self.device)] = logits[ends_here.to(self.device)]
        return cache, last

    @torch.no_grad()
    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,), one per sequence, and return the logits after them (B, V)."""
        positions = cache.lengths.clone()[:, None]
        return self._forward(cache, tokens.reshape(-1, 1).cpu(), positions, torch.zeros_like(positions))

    def _forward(self, cache: KVCache, tokens, positions, logits_at) -> torch.Tensor:
        positions = positions.to(self.device)
        cache.begin(positions)
        logits, _ = self.model(tokens.to(self.device), positions.clamp(min=0), kv_cache=cache,
                               logits_at=logits_at.to(self.device))
        logits = logits[:, 0].float()
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.tp_group))]
            dist.all_gather(shards, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(shards, dim=-1)
        return logits[:, :self.vocab_size]
