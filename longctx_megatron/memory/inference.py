"""Per-rank memory of inference (prefill + decode with the per-layer KV caches), in closed form.

The terms follow what ``inference/`` and ``model/`` really allocate, so the sum is the peak of live
tensor storage that ``measure.PeakTracker`` sees around ``generate()`` (the tests hold it to 10%):

* weights: this tensor-parallel rank's shard (tied embeddings once);
* KV cache per layer kind, as ``inference/cache.py`` allocates it for ``prompt + new_tokens`` positions
  (``generate`` reserves that capacity): full layers in GROW-position steps, sliding rings of W plus
  global keys plus the global-query history (on the accelerator unless ``history_on_host``), dilated
  rings of W * r;
* the larger of the two working sets: one prefill chunk (the largest layer's forward at chunk length
  over the keys it reads) or one decode step.

Nothing is built or traced: a 7B model at 100K tokens is answered instantly. Scratch memory inside a
fused kernel (SDPA's, a GEMM's workspace) and the allocator's fragmentation are not counted, as in
``measure.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.inference.cache import GROW
from longctx_megatron.memory.params import layer_params, local_vocab
from longctx_megatron.memory.report import MemoryEstimate
from longctx_megatron.model.attention.backends.recompute import query_blocks

INT64 = 8
FP32 = 4
PHASES = ("generate", "prefill", "decode")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Rank:
    """Sizes one tensor-parallel rank sees: its heads, its d_ff and vocabulary slices, the dtype's bytes."""

    config: ModelConfig
    batch: int
    item: int
    tensor: int
    cuda: bool

    @property
    def heads(self) -> int:
        return self.config.n_heads // self.tensor

    @property
    def kv_heads(self) -> int:
        return self.config.n_kv_heads // self.tensor

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def d_ff(self) -> int:
        return self.config.d_ff // self.tensor

    @property
    def vocab(self) -> int:
        return local_vocab(self.config, self.tensor)

    def kv(self, positions: int, rows: int | None = None) -> int:
        """Bytes of keys and values of ``positions`` positions (all KV heads of the rank) for ``rows`` sequences."""
        return 2 * (self.batch if rows is None else rows) * self.kv_heads * positions * self.head_dim * self.item


def weight_bytes(config: ModelConfig, dtype: torch.dtype, tensor: int = 1) -> int:
    """This rank's parameters: projections split over ``tensor`` ranks, the embedding by (padded)
    vocabulary rows, norms whole; tied embeddings once."""
    embeddings = local_vocab(config, tensor) * config.d_model * (1 if config.tie_embeddings else 2)
    return (config.n_layers * layer_params(config, tensor) + embeddings + config.d_model) * dtype.itemsize


def layer_cache_bytes(spec: LayerSpec, rank: _Rank, capacity: int) -> tuple[int, int]:
    """(bytes on the accelerator, history bytes) of one layer's cache holding ``capacity`` positions:
    full: K and V grown to a multiple of GROW; sliding: the ring of W keys and their int64 positions,
    with global tokens also the global keys (ceil(N/G) plus GROW/G spare slots) and the history (a full
    cache); dilated: a ring of W * r keys and positions."""
    if spec.kind == "full":
        return rank.kv(_ceil(capacity, GROW) * GROW), 0
    span = spec.window * (spec.dilation if spec.kind == "dilated" else 1)
    ring = rank.kv(span) + rank.batch * span * INT64
    if spec.kind == "dilated" or not spec.global_every:
        return ring, 0
    global_slots = _ceil(capacity, spec.global_every) + max(1, GROW // spec.global_every)
    return ring + rank.kv(global_slots), rank.kv(_ceil(capacity, GROW) * GROW)


def _mask_bytes(spec: LayerSpec, rank: _Rank, queries: int, keys: int, rows: int) -> int:
    """Peak of building one (rows, 1, queries, keys) visibility mask by the layer's ``mask_mod``: the int64
    differences sliding and dilated rules compute (``q - k``; dilated also ``- s`` and ``% r``) and the
    boolean partial results; the full rule compares positions directly."""
    pairs = rows * queries * keys
    if spec.kind == "full":
        return 3 * pairs
    if spec.kind == "sliding":
        return INT64 * pairs + 2 * pairs
    return 2 * INT64 * pairs + 2 * pairs


def _attend_bytes(spec: LayerSpec, rank: _Rank, queries: int, keys: int, rows: int, heads: int) -> int:
    """Peak of one ``attend_by_rule`` group past its inputs: the mask being built, then the kept boolean
    mask with what the attention call allocates: on CPU SDPA's additive mask in the dtype, its output
    and log-sum-exp, the output zeroed where a row saw nothing; elsewhere the recomputing block kernel
    (``masked_sdpa`` cuts the queries into blocks of ``query_blocks`` rows, padded to whole blocks):
    the padded q and mask, the float32 output and log-sum-exp, K and V widened to float32 once, and one
    group's float32 scores (worked in place) with its q copy and its inverted mask or output; then the
    output in the dtype, and the zeroed output."""
    pairs = rows * queries * keys
    q_bytes = rows * heads * queries * rank.head_dim * rank.item
    build = _mask_bytes(spec, rank, queries, keys, rows)
    if not rank.cuda:
        call = pairs * (1 + rank.item) + 2 * q_bytes + rows * heads * queries * FP32
        return max(build, call)
    block, group = query_blocks(queries, rows * heads * keys)
    padded = _ceil(queries, block) * block
    padded_q = rows * heads * padded * rank.head_dim * rank.item  # also the output in the dtype
    widened = rank.item != FP32  # float32 inputs are used as they are, not copied
    held = pairs + rows * heads * padded * (rank.head_dim + 1) * FP32
    if padded > queries:
        held += padded_q + rows * padded * keys
    if widened:
        kv_heads = max(1, heads * rank.kv_heads // rank.heads)
        held += 2 * rows * kv_heads * keys * rank.head_dim * FP32
    group_rows = rows * heads * group
    work = group_rows * (keys + rank.head_dim) * FP32 + max(rows * group * keys, group_rows * rank.head_dim * FP32)
    call = max(held + max(work, padded_q if widened else 0), pairs + padded_q + q_bytes)
    return max(build, call)


def _rule_bytes(spec: LayerSpec, rank: _Rank, queries: int, keys: int, rows: int) -> int:
    """``attend_by_rule`` over ``keys`` keys: one call for every head, or for dilated layers one per KV-head
    offset, each on copies of its heads' q, K and V written into one output (and int64 key counts)."""
    groups = min(spec.dilation, rank.kv_heads) if spec.kind == "dilated" else 1
    if groups == 1:
        return _attend_bytes(spec, rank, queries, keys, rows, rank.heads)
    heads = rank.heads // groups
    q_bytes = rows * rank.heads * queries * rank.head_dim * rank.item
    copies = rows * heads * queries * rank.head_dim * rank.item + rank.kv(keys, rows) // groups
    held = q_bytes + rows * rank.heads * queries * INT64
    return held + copies + _attend_bytes(spec, rank, queries, keys, rows, heads)


def _global_queries_bytes(spec: LayerSpec, rank: _Rank, start: int, length: int) -> int:
    """A sliding layer's global queries in a chunk of ``length`` positions from ``start``: the history
    of every row fetched (a copy of ``start`` positions, ``FullCache.stored(rows)``), concatenated with
    the chunk's keys (another copy, also of the rows' new keys) for a few queries."""
    every = spec.global_every
    if spec.kind != "sliding" or not every or _ceil(start, every) * every >= start + length:
        return 0
    first = _ceil(start, every) * every
    count = (start + length - 1 - first) // every + 1
    keys = start + length
    fetched = rank.kv(start) + rank.batch * start * INT64
    joined = rank.kv(keys) + (rank.kv(length) if length > 1 else 0) + rank.batch * keys * INT64
    return fetched + joined + _rule_bytes(spec, rank, count, keys, rank.batch)


def _prefill_layer_bytes(spec: LayerSpec, rank: _Rank, start: int, length: int) -> int:
    """One layer's attention on the chunk [start, start + length): the keys the cache hands over (full:
    views of ``start`` positions; sliding: the ring, with global tokens concatenated with the global keys
    older than it; dilated: the ring) concatenated with the chunk's own (a copy), their int64 positions,
    the rule's attention over them, then the global queries over the history (sliding, G > 0)."""
    batch = rank.batch
    if spec.kind == "full":
        stored, copied = start, 0
    elif spec.kind == "dilated":
        stored, copied = spec.window * spec.dilation, 0
    elif spec.global_every:
        stored = spec.window + _ceil(start, spec.global_every)
        copied = rank.kv(stored)
    else:
        stored, copied = spec.window, 0
    keys = stored + length
    joined = copied + rank.kv(keys) + batch * (stored + keys) * INT64
    regular = joined + _rule_bytes(spec, rank, length, keys, batch)
    out = batch * rank.heads * length * rank.head_dim * rank.item
    return max(regular, out + _global_queries_bytes(spec, rank, start, length))


def _decode_layer_bytes(spec: LayerSpec, rank: _Rank, position: int) -> int:
    """One layer's attention of the token at ``position`` (its key already stored): full: int64 positions
    of every stored key (from an arange of the slots) and the rule over them; sliding: the ring
    (concatenated with the global keys when G > 0) and, at a global position, a copy of the whole
    history; dilated: K and V gathered per KV head (the W keys its offset sees) with int64 positions."""
    batch, keys = rank.batch, position + 1
    if spec.kind == "full":
        slots = keys * INT64 + batch * keys  # FullCache.stored: arange of the slots, compared with the lengths
        return batch * keys * INT64 + max(slots, _rule_bytes(spec, rank, 1, keys, batch))
    if spec.kind == "dilated":
        gathered = rank.kv(spec.window) + batch * rank.kv_heads * spec.window * INT64
        return gathered + _rule_bytes(spec, rank, 1, spec.window, batch)
    if not spec.global_every:
        return _rule_bytes(spec, rank, 1, spec.window, batch)
    stored = spec.window + _ceil(position, spec.global_every)
    regular = rank.kv(stored) + 2 * batch * stored * INT64 + _rule_bytes(spec, rank, 1, stored, batch)
    if position % spec.global_every:
        return regular
    return max(regular, rank.kv(position) + 3 * batch * keys * INT64 + _rule_bytes(spec, rank, 1, keys, batch))


def _forward_bytes(config: ModelConfig, rank: _Rank, length: int, held: int, attention: int) -> int:
    """A forward of ``length`` tokens per sequence beyond the weights and caches: ``held`` (what the engine
    keeps across the forward), the hidden state, the float32 RoPE tables of each RoPE config, int64
    positions; then the costliest moment of a block: its RMSNorm (float32 copies on the way), RoPE (the
    copied q, its float32 temporaries), the attention (the normed input, the QKV projection, q and k after
    RoPE, and ``attention``, the cache's part), or the MLP (the block input and the residual sum, the
    normed input, [gate; up], silu(gate) and the product); or the logits of one position per sequence (in
    the dtype, then float32; under TP the gathered full vocabulary)."""
    batch, item, d = rank.batch, rank.item, config.d_model
    tokens = batch * length
    ropes = len({spec.rope for spec in config.layer_plan()})
    ambient = held + tokens * d * item + ropes * 2 * tokens * rank.head_dim * FP32 + 4 * tokens * INT64
    hidden = tokens * d * item
    q_bytes = tokens * rank.heads * rank.head_dim * item
    norm = tokens * d * FP32 * (2 if item == FP32 else 3)
    qkv = hidden + tokens * (rank.heads + 2 * rank.kv_heads) * rank.head_dim * item
    rotary = q_bytes + q_bytes * FP32 // item * (4 if item == FP32 else 5)
    after_rope = q_bytes + tokens * rank.kv_heads * rank.head_dim * item
    mlp = hidden + max(norm, hidden + tokens * rank.d_ff * item * 4)
    head = batch * (rank.vocab * (item + FP32) + d * item)
    if rank.tensor > 1:
        head += 2 * batch * rank.vocab * rank.tensor * FP32
    return ambient + max(norm, qkv + max(rotary, after_rope + attention), mlp, head)


def _reads_bytes(config: ModelConfig, rank: _Rank, length: int) -> int:
    """Every layer's ``last_reads``: the int64 key counts of its last call's ``length`` queries, a (B, 1, C)
    tensor expanded over the heads, or (B, H, C) where a dilated layer attends per KV-head offset."""
    total = 0
    for spec in config.layer_plan():
        per_head = spec.kind == "dilated" and min(spec.dilation, rank.kv_heads) > 1
        total += rank.batch * length * (rank.heads if per_head else 1) * INT64
    return total


def prefill_bytes(config: ModelConfig, rank: _Rank, prompt_length: int, chunk: int) -> int:
    """The working set of the costliest prefill chunk (the last full chunk or the last, shorter one: a
    chunk's need grows with the keys before it), with what the prefill holds throughout: the int64
    prompts, the previous chunk's float32 logits and every layer's ``last_reads``."""
    last = (prompt_length - 1) // chunk * chunk
    starts = {last, max(0, last - chunk)} if prompt_length - last < chunk else {last}
    best = 0
    for start in starts:
        length = min(chunk, prompt_length - start)
        attention = max(_prefill_layer_bytes(spec, rank, start, length) for spec in config.layer_plan())
        held = rank.batch * (prompt_length * INT64 + config.vocab_size * FP32) + _reads_bytes(config, rank, chunk)
        best = max(best, _forward_bytes(config, rank, length, held, attention))
    return best


def decode_bytes(config: ModelConfig, rank: _Rank, prompt_length: int, new_tokens: int, chunk: int) -> int:
    """The working set of the costliest decode step (generate decodes positions prompt .. prompt +
    new_tokens - 2), with the previous step's float32 logits and the layers' ``last_reads`` of the
    prefill still held."""
    if new_tokens < 2:
        return 0
    plan = config.layer_plan()
    last = prompt_length + new_tokens - 2
    positions = {last}
    for spec in plan:  # a sliding layer's global positions fetch its history
        if spec.kind == "sliding" and spec.global_every:
            latest = last // spec.global_every * spec.global_every
            if latest >= prompt_length:
                positions.add(latest)
    attention = max(_decode_layer_bytes(spec, rank, p) for spec in plan for p in positions)
    last_chunk = prompt_length - (prompt_length - 1) // chunk * chunk
    held = rank.batch * config.vocab_size * FP32 + _reads_bytes(config, rank, last_chunk)
    return _forward_bytes(config, rank, 1, held, attention)


def estimate_inference(config: ModelConfig, batch: int, prompt_length: int, new_tokens: int, dtype: torch.dtype,
                       prefill_chunk: int = 512, tensor: int = 1, history_on_host: bool = False,
                       device_type: str = "cpu", phase: str = "generate") -> MemoryEstimate:
    """Peak bytes of one tensor-parallel rank generating ``new_tokens`` after prompts of ``prompt_length``
    tokens (``batch`` of them) with ``InferenceEngine(prefill_chunk=...)`` in ``dtype``.

    ``history_on_host`` moves the sliding layers' global-query history off the accelerator (it is
    then a note, not a term; on CPU it stays in the same memory). ``device_type`` picks the attention
    kernel the code runs there (fused SDPA on CPU, the block kernel elsewhere). ``phase`` "prefill" or
    "decode" gives the peak of that phase alone (its working set over the weights and the caches);
    "generate" the larger of the two. Weight-only int8 (``--quantize int8``) is not modelled."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {', '.join(PHASES)}")
    if config.n_kv_heads % tensor:
        raise ValueError(f"n_kv_heads={config.n_kv_heads} does not split over tensor={tensor} ranks")
    rank = _Rank(config, batch, dtype.itemsize, tensor, device_type != "cpu")
    capacity = prompt_length + new_tokens
    on_host = history_on_host and device_type != "cpu"
    terms = {"weights": weight_bytes(config, dtype, tensor)}
    kinds: dict[str, list[int]] = {}
    host = 0
    for spec in config.layer_plan():
        device, history = layer_cache_bytes(spec, rank, capacity)
        kinds.setdefault(spec.kind, []).append(device + (0 if on_host else history))
        host += history if on_host else 0
    for kind, sizes in kinds.items():
        terms[f"kv cache: {kind} ({len(sizes)} layer{'s' if len(sizes) > 1 else ''})"] = sum(sizes)
    prefill = prefill_bytes(config, rank, prompt_length, prefill_chunk)
    decode = decode_bytes(config, rank, prompt_length, new_tokens, prefill_chunk)
    if phase == "prefill" or phase == "generate" and prefill >= decode:
        terms[f"prefill working set (chunk {min(prefill_chunk, prompt_length)})"] = prefill
        notes = [f"decode working set: {decode:,} bytes"]
    else:
        terms["decode working set"] = decode
        notes = [f"prefill working set: {prefill:,} bytes"]
    if host:
        notes.append(f"global-query history on the host: {host:,} bytes")
    where = f"tensor rank of {tensor}, batch {batch}, {prompt_length} + {new_tokens} tokens, {device_type}"
    return MemoryEstimate(terms, where, tuple(notes))
