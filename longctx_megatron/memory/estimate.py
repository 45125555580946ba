"""Per-rank peak memory of a training step: model states, activations walked through the pipeline
schedule, and the working set of the moment the peak falls on.

Model states are exact from the layout: weights in the training dtype, fp32 gradient buckets, and
AdamW's state (local: two fp32 moments per weight; distributed optimizer / 16-bit weights: fp32
masters, moments, decay mask, norm weights and gradient shard for this DP x CP rank's 1/n of
every bucket). Activations come from activations.py per layer kind; the pipeline rank's own
schedule (parallel/pipeline_schedule.py, the order the executor runs) is replayed action by action,
so the number of micro-batches in flight, their stages and interleaved chunks, and the moment of the
peak (the head's backward, a layer's backward, the optimizer step) are those of the real run.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.memory.activations import (
    F32,
    LayerShape,
    embedding_bytes,
    head_bytes,
    head_forward_extra,
    layer_bytes,
)
from longctx_megatron.memory.params import layer_params, local_vocab
from longctx_megatron.memory.report import MemoryEstimate
from longctx_megatron.parallel.pipeline_plan import stage_layers
from longctx_megatron.parallel.pipeline_schedule import schedule_1f1b, schedule_interleaved

BUCKET_MB = 25.0  # DataParallelGradients' bucket size
MOMENTS = 2  # AdamW's exp_avg and exp_avg_sq
SHARD_STATE = 6  # fp32 per value of a DP shard: master, 2 moments, decay mask, norm weight, gradient copy


@dataclass(frozen=True)
class TrainingSetup:
    """What a training step's memory depends on (training/memory_check.py builds it from a RunConfig)."""

    config: ModelConfig
    seq_length: int
    micro_batch: int
    microbatches: int  # per DP rank per step
    element: int  # bytes per weight and activation element: 4 fp32, 2 bf16/fp16
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    context: int = 1
    sequence_parallel: bool = False
    stage_sizes: tuple[int, ...] | None = None  # layers per (virtual) stage; None: equal stages
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_first_layers: int | None = None  # full recomputation of only the first N layers of each chunk
    attention_backend: str = "auto"
    cp_comm_type: str = "p2p"  # p2p: a full layer's prefix, a local layer's halo; allgather: every key
    documents: bool = False  # --reset-attention-mask: samples packed with documents (not modelled)
    device_type: str = "cpu"

    @property
    def sizes(self) -> tuple[int, ...]:
        if self.stage_sizes is not None:
            return tuple(self.stage_sizes)
        per, extra = divmod(self.config.n_layers, self.pipeline)
        return tuple(per + (stage < extra) for stage in range(self.pipeline))

    @property
    def cuda(self) -> bool:
        """Whether the CUDA kernels' terms apply (flash / flex, fused norms) instead of the CPU ones."""
        return self.device_type == "cuda"

    @property
    def chunks(self) -> int:
        return len(self.sizes) // self.pipeline

    @property
    def sharded_optimizer(self) -> bool:
        return self.distributed_optimizer or self.element < F32

    def layer_shape(self) -> LayerShape:
        config, tp = self.config, self.tensor
        return LayerShape(
            batch=self.micro_batch, seq=self.seq_length // self.context, d_model=config.d_model,
            heads=config.n_heads // tp, kv_heads=config.n_kv_heads // tp, head_dim=config.head_dim,
            ffn=config.d_ff // tp, element=self.element,
            sequence_parallel_ranks=tp if self.sequence_parallel else 1, hidden_dropout=config.hidden_dropout,
            cuda=self.cuda, context=self.context, cp_allgather=self.cp_comm_type == "allgather",
        )


def _chunk_params(setup: TrainingSetup, virtual_stage: int) -> list[int]:
    """Parameter sizes (elements) of one virtual stage on one rank, as DataParallelGradients buckets them."""
    config, last = setup.config, len(setup.sizes) - 1
    sizes = [layer_params(config, setup.tensor)] * len(stage_layers(list(setup.sizes), virtual_stage))
    vocab_rows = local_vocab(config, setup.tensor) * config.d_model
    if virtual_stage == 0 or (virtual_stage == last and config.tie_embeddings):
        sizes.append(vocab_rows)
    if virtual_stage == last:
        sizes.append(config.d_model)
        if not config.tie_embeddings:
            sizes.append(vocab_rows)
    return sizes


def _buckets(setup: TrainingSetup, pipeline_rank: int) -> list[int]:
    """Padded sizes (elements) of this rank's gradient buckets: the embedding and output weights alone,
    the rest in buckets of BUCKET_MB, each padded to a multiple of the DP x CP size."""
    config, dp = setup.config, setup.data * setup.context
    vocab_rows = local_vocab(config, setup.tensor) * config.d_model
    alone, rest = [], []
    for chunk in range(setup.chunks):
        for size in _chunk_params(setup, chunk * setup.pipeline + pipeline_rank):
            (alone if size == vocab_rows else rest).append(size)
    limit, buckets, current = max(1, int(BUCKET_MB * 2**20 / 4)), [], 0
    for size in rest:
        current += size
        if current >= limit:
            buckets.append(current)
            current = 0
    buckets += [current] if current else []
    return [-(-size // dp) * dp for size in alone + buckets]


def rank_params(setup: TrainingSetup, pipeline_rank: int) -> int:
    """Parameters (elements) one rank of pipeline rank ``pipeline_rank`` holds, over all its chunks."""
    return sum(sum(_chunk_params(setup, c * setup.pipeline + pipeline_rank)) for c in range(setup.chunks))


def model_states(setup: TrainingSetup, pipeline_rank: int) -> tuple[dict[str, int], int]:
    """(terms, optimizer step's extra working set) of the weights, gradients and optimizer state."""
    buckets = _buckets(setup, pipeline_rank)
    values = sum(buckets)
    params = rank_params(setup, pipeline_rank)
    terms = {"weights": params * setup.element, "gradients (fp32 buckets)": values * F32}
    dp = setup.data * setup.context
    if setup.sharded_optimizer:
        terms["optimizer (fp32 master, moments; ZeRO-1 shard)"] = values // dp * SHARD_STATE * F32
        step = max(buckets) * F32 + max(buckets) // dp * 2 * F32  # all-gather target, AdamW's temporaries
    else:
        terms["optimizer (AdamW moments)"] = params * MOMENTS * F32
        step = max(buckets) * F32
    return terms, step


@dataclass
class _Moment:
    live: dict[str, int]
    extra: int
    what: str

    @property
    def total(self) -> int:
        return sum(self.live.values()) + self.extra


def _stage_activations(setup: TrainingSetup, virtual_stage: int):
    """(kept per micro-batch by part, backward working sets in backward order, forward extra)."""
    config, shape = setup.config, setup.layer_shape()
    plan, last = config.layer_plan(), len(setup.sizes) - 1
    kept: dict[str, int] = {}
    backwards: list[tuple[str, int, dict[str, int]]] = []
    e, hidden = setup.element, shape.norm_tokens * config.d_model * setup.element
    forward_extra = 0
    if virtual_stage == 0:
        kept["embedding"] = embedding_bytes(shape)
    else:
        kept["pipeline buffers"] = hidden if e < F32 else 0  # the received hidden (fp32: the first norm's input)
    layers = stage_layers(list(setup.sizes), virtual_stage)
    # Each distinct RoPE config of the chunk's layers makes one fp32 (cos, sin) pair of (1, s, D) per
    # forward (model/transformer.py), kept by every layer that rotates with it.
    ropes = {plan[index].rope for index in layers}
    kept["rope tables"] = len(ropes) * 2 * shape.seq * config.head_dim * F32
    for position, index in enumerate(layers):
        spec = plan[index]
        full = setup.recompute == "full" and (setup.recompute_first_layers is None
                                              or position < setup.recompute_first_layers)
        mode = "full" if full else "selective" if setup.recompute == "selective" else "none"
        part = layer_bytes(spec, shape, mode)
        name = f"{spec.kind} layers"
        kept[name] = kept.get(name, 0) + part.total
        backwards.append([(f"backward of layer {index} ({spec.kind})", extra, {name: freed})
                          for extra, freed in part.phases])
    vocab = local_vocab(config, setup.tensor)
    weight_grad = vocab * config.d_model * e
    if virtual_stage == last:
        head = head_bytes(shape, vocab, setup.tensor)
        kept["head (final norm, logits)"] = head.total
        backwards.append([("backward of the head", extra + weight_grad, {"head (final norm, logits)": freed})
                          for extra, freed in head.phases])
        forward_extra = head_forward_extra(shape, vocab, setup.tensor)
    else:
        kept["pipeline buffers"] = kept.get("pipeline buffers", 0) + hidden  # the output, until its backward
    backwards = [phase for phases in reversed(backwards) for phase in phases]
    if virtual_stage == 0:
        backwards.append(("backward of the embedding", weight_grad, {}))
    return kept, backwards, forward_extra


def _replay(setup: TrainingSetup, pipeline_rank: int) -> _Moment:
    """The largest activation moment of this rank's schedule: forwards add a micro-batch's kept
    activations, backwards free them layer by layer after each layer's working set."""
    stages = setup.pipeline
    if setup.chunks == 1:
        order = schedule_1f1b(setup.microbatches, stages, pipeline_rank)
    else:
        order = schedule_interleaved(setup.microbatches, stages, pipeline_rank, setup.chunks)
    per_chunk = [_stage_activations(setup, chunk * stages + pipeline_rank) for chunk in range(setup.chunks)]
    live: dict[str, int] = {}
    best = _Moment({}, 0, "")

    def consider(extra: int, what: str) -> None:
        nonlocal best
        moment = _Moment(dict(live), extra, what)
        if moment.total > best.total:
            best = moment

    for action, _micro, chunk in order:
        kept, backwards, forward_extra = per_chunk[chunk]
        if action == "F":
            for name, size in kept.items():
                live[name] = live.get(name, 0) + size
            consider(forward_extra, "forward of the head" if forward_extra else "end of a forward")
            continue
        freed = dict(kept)
        for what, extra, parts in backwards:
            consider(extra, what)
            for name, size in parts.items():
                live[name] -= size
                freed[name] -= size
        for name, size in freed.items():  # what no backward step names: the embedding, buffers
            live[name] -= size
    return best


def _unmodelled(setup: TrainingSetup) -> tuple[str, ...]:
    """What the estimate leaves out for this run (ADR 0017), said with every estimate."""
    notes = []
    if setup.config.attention_dropout > 0:
        notes.append("attention dropout > 0 is not modelled (SDPA keeps its masks; on CPU it may keep the scores)")
    if setup.documents:
        notes.append("packed documents (--reset-attention-mask) are not modelled: local layers keep a mask per "
                     "block and, with global tokens, per-sample key sets")
    expected = ("auto", "chunked") if setup.device_type == "cpu" else ("auto", "flash", "flex")
    if setup.attention_backend not in expected:
        notes.append(f"--attention-backend {setup.attention_backend} on {setup.device_type} is not modelled (the "
                     f"estimate assumes {'chunked' if setup.device_type == 'cpu' else 'flash/flex'})")
    if setup.device_type not in ("cpu", "cuda"):
        notes.append(f"{setup.device_type} is not modelled: the estimate uses the CPU kernels' terms")
    if setup.cuda:
        notes.append("CUDA terms are unmeasured (no GPU check yet); allocator caching and kernel workspaces are "
                     "not counted")
    return tuple(notes)


def estimate_training(setup: TrainingSetup) -> list[MemoryEstimate]:
    """The peak of every pipeline rank (the other dimensions are symmetric), itemised at that peak."""
    out, notes = [], _unmodelled(setup)
    for rank in range(setup.pipeline):
        states, step = model_states(setup, rank)
        moment = _replay(setup, rank)
        where = f"pipeline rank {rank}"
        if step > moment.total:
            terms = {**states, "optimizer step (all-gather, AdamW temporaries)": step}
            out.append(MemoryEstimate(terms, f"{where}, at the optimizer step", notes))
            continue
        activations = {f"activations: {name}": size for name, size in moment.live.items() if size}
        if moment.extra:
            activations[f"working set: {moment.what}"] = moment.extra
        out.append(MemoryEstimate({**states, **activations}, f"{where}, at the {moment.what}", notes))
    return out
