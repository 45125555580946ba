"""Prefill and decode: a GPTModel (whole, or this rank's tensor-parallel shard) over per-layer caches.

``prefill`` runs the prompts through the model in chunks of ``prefill_chunk`` tokens (all
sequences of the batch in step; a shorter prompt's chunk is padded and its padding neither
attends nor is cached), so activation memory is bounded by the chunk, and computes the logits of
each prompt's last token only; ``logits`` keeps those of a range of positions instead (scoring).
``decode`` appends one token per sequence and returns the next logits. Logits come back as
full-vocabulary float32 on every rank: under tensor parallelism each rank's vocabulary shard is
gathered, so every rank samples the same token.

With a context-parallel group (``context``, CP > 1), a prefill first runs the longest prefix that
splits into 2 x CP chunks and needs no logits over the group: each rank takes its zigzag part
through the model with context-parallel attention (parallel/context.py: a halo for local layers,
the causal prefix for full ones), and every layer's keys and values are gathered over the group into the
caches; the rest of the prompts (at least their last token) and decoding run as without CP, on
every rank alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.inference.cache import KVCache
from longctx_megatron.parallel.context import apply_context_parallel, zigzag_positions
from longctx_megatron.parallel.state import ParallelContext


class InferenceEngine:
    def __init__(self, model, prefill_chunk: int = 512, history_device=None, tp_group=None,
                 context: ParallelContext | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
        if not (model.pre_process and model.post_process):
            raise ValueError("inference needs the whole layer stack on this rank (no pipeline stage split)")
        self.model = model.eval()
        self.prefill_chunk, self.history_device, self.tp_group = prefill_chunk, history_device, tp_group
        weight = model.embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = model.config.vocab_size
        self.context = context if context is not None and context.cp_size > 1 else None
        if self.context is not None:
            apply_context_parallel(self.model, self.context)  # used by uncached forwards only: the CP prefill

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
        done = self._context_parallel_prefix(cache, tokens, int(first.min())) if self.context is not None else 0
        for start in range(done, longest, self.prefill_chunk):
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

    def _context_parallel_prefix(self, cache: KVCache, tokens: torch.Tensor, first: int) -> int:
        """Prefill positions [0, L) of every sequence over the CP group, L the largest multiple of
        2 x CP up to ``first`` (the first position whose logits are wanted); returns L."""
        ctx, batch = self.context, tokens.shape[0]
        length = first // (2 * ctx.cp_size) * 2 * ctx.cp_size
        if length == 0:
            return 0
        here = zigzag_positions(length, ctx.cp_size, ctx.cp_rank, self.device)
        captured = {}
        hooks = [block.attention.core_attention.register_forward_hook(
            lambda _module, inputs, _out, index=int(index): captured.__setitem__(index, inputs[1:3]))
            for index, block in self.model.layers.items()]
        try:
            self.model(tokens[:, here.cpu()].to(self.device), here.expand(batch, -1),
                       logits_at=torch.zeros(batch, 1, dtype=torch.long, device=self.device))
        finally:
            for hook in hooks:
                hook.remove()
        order = torch.argsort(torch.cat([zigzag_positions(length, ctx.cp_size, rank, self.device)
                                         for rank in range(ctx.cp_size)]))
        positions = torch.arange(length, device=self.device).expand(batch, -1)
        for index, (k, v) in captured.items():
            local = torch.cat([k, v], dim=1).contiguous()
            parts = [torch.empty_like(local) for _ in range(ctx.cp_size)]
            dist.all_gather(parts, local, group=ctx.cp_group)
            whole = torch.cat(parts, dim=2)[:, :, order]
            cache.layer(index).write(whole[:, :k.shape[1]], whole[:, k.shape[1]:], positions)
        cache.begin(positions)
        return length

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
