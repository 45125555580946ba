"""Prefill and decode: a GPTModel (whole, or this rank's tensor-parallel shard) over per-layer caches.

``prefill`` runs the prompts through the model in chunks of ``prefill_chunk`` tokens (all
sequences of the batch in step; a shorter prompt's chunk is padded and its padding neither
attends nor is cached), so activation memory is bounded by the chunk, and computes the logits of
each prompt's last token only; ``logits`` keeps those of a range of positions instead (scoring).
``decode`` appends one token per sequence and returns the next logits. Logits come back as
full-vocabulary float32 on every rank: under tensor parallelism each rank's vocabulary shard is
gathered, so every rank samples the same token.
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
        cache, kept = self._prefill(prompts, capacity, [len(prompt) - 1 for prompt in prompts])
        return cache, torch.stack([logits[-1] for logits in kept])

    @torch.no_grad()
    def logits(self, prompts: list[list[int]], first: list[int]) -> list[torch.Tensor]:
        """For each prompt, the logits after each of its tokens from position ``first[i]`` on:
        (len(prompt) - first[i], V) float32 on the device (scoring: log-likelihoods, perplexity)."""
        if len(first) != len(prompts) or any(not 0 <= f < len(p) for f, p in zip(first, prompts, strict=False)):
            raise ValueError("first must hold, for each prompt, a position inside it")
        return self._prefill(prompts, 0, first)[1]

    def _prefill(self, prompts, capacity, first) -> tuple[KVCache, list[torch.Tensor]]:
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        first = torch.tensor(first)
        longest = int(lengths.max())
        cache = self.new_cache(len(prompts), max(capacity, longest))
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        kept: list[list[torch.Tensor]] = [[] for _ in prompts]
        for start in range(0, longest, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, longest)
            positions = torch.arange(start, stop)[None].expand(len(prompts), -1)
            positions = torch.where(positions < lengths[:, None], positions, -1)
            # The chunk's positions whose logits are kept: [first, length) of each row, from the chunk's start.
            begin = (first - start).clamp(0, stop - start)
            end = (lengths - start).clamp(0, stop - start)
            counts = (end - begin).clamp(min=0)
            width = max(1, int(counts.max()))
            at = (begin[:, None] + torch.arange(width)[None]).clamp(max=stop - start - 1)
            logits = self._forward(cache, tokens[:, start:stop], positions, at)
            for row, count in enumerate(counts.tolist()):
                if count:
                    kept[row].append(logits[row, :count])
        return cache, [torch.cat(row) for row in kept]

    @torch.no_grad()
    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,), one per sequence, and return the logits after them (B, V)."""
        positions = cache.lengths.clone()[:, None]
        return self._forward(cache, tokens.reshape(-1, 1).cpu(), positions, torch.zeros_like(positions))[:, 0]

    def _forward(self, cache: KVCache, tokens, positions, logits_at) -> torch.Tensor:
        positions = positions.to(self.device)
        cache.begin(positions)
        logits, _ = self.model(tokens.to(self.device), positions.clamp(min=0), kv_cache=cache,
                               logits_at=logits_at.to(self.device))
        logits = logits.float()  # (B, K, V): the positions logits_at picked
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.tp_group))]
            dist.all_gather(shards, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(shards, dim=-1)
        return logits[..., :self.vocab_size]
