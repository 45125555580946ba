"""Questions a user asks of the memory model: does it fit, how long or wide can it go, which layout.

* ``largest_fitting``: the largest sequence length (a multiple of ``step``) or micro-batch whose peak
  fits ``capacity`` bytes on every rank (the estimate grows with both, so a bisection finds it).
* ``rank_layouts``: for a model, a device count and a global batch, every TP x PP x CP x DP layout
  (with sequence parallelism under TP, ZeRO-1 under DP) and recomputation mode that fits, ranked by
  ``step_time``, a simple cost model: compute at a fixed throughput, stretched by the pipeline
  bubble and recomputation's extra forward, plus the bytes each kind of parallelism communicates
  over its link (TP always within a node; CP within a node while TP x CP fits in one; DP and PP
  over the network once the job spans nodes). Communication is not overlapped with compute. It
  ranks layouts; it does not predict seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longctx_megatron.memory.estimate import TrainingSetup, estimate_training, rank_params
from longctx_megatron.memory.report import peak_of
from longctx_megatron.model.counting import flops_per_token, head_forward_flops, layer_forward_flops

# The cost model's constants (ADR 0017): an H100-class device and node.
ACHIEVED_FLOPS = 400e12  # sustained bf16 matmul throughput per device
INTRA_NODE_BYTES = 300e9  # per device per second over NVLink: tensor and context parallelism
INTER_NODE_BYTES = 40e9  # per device per second over the network: data parallelism and pipeline sends
DEVICES_PER_NODE = 8


def peak(setup: TrainingSetup) -> int:
    return peak_of(estimate_training(setup)).total


def largest_fitting(setup: TrainingSetup, capacity: int, field: str, step: int = 1, limit: int = 1 << 22) -> int:
    """The largest value of ``field`` ("seq_length" or "micro_batch"), a multiple of ``step`` up to
    ``limit``, whose estimated peak fits ``capacity`` bytes; 0 when not even ``step`` does."""
    def fits(value: int) -> bool:
        return peak(dataclasses.replace(setup, **{field: value})) <= capacity

    if not fits(step):
        return 0
    low, high = 1, 2
    while high * step <= limit and fits(high * step):
        low, high = high, high * 2
    high = min(high, limit // step + 1)
    while high - low > 1:  # fits(low * step), not fits(high * step)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle)
    return low * step


def step_time(setup: TrainingSetup, global_batch: int) -> float:
    """Estimated seconds per step of ``setup`` (the cost model of the module docstring)."""
    config, seq = setup.config, setup.seq_length
    devices = setup.tensor * setup.pipeline * setup.data * setup.context
    tokens = global_batch * seq
    compute = flops_per_token(config, seq) * tokens / devices / ACHIEVED_FLOPS
    forward = sum(layer_forward_flops(config, seq)) + head_forward_flops(config)
    # Recomputation runs one more forward: of every block (full) or of every attention module, its
    # projections included (selective: everything but the MLP).
    again = {"none": 0.0, "selective": forward - config.n_layers * 2 * 3 * config.d_model * config.d_ff,
             "full": forward}[setup.recompute]
    compute *= 1 + again / (3 * forward)
    bubble = (setup.pipeline - 1) / (setup.chunks * setup.microbatches + setup.pipeline - 1)
    element, local_tokens = setup.element, setup.micro_batch * seq // setup.context
    hidden = local_tokens * config.d_model * element * (setup.tensor - 1) / setup.tensor
    layers_here = config.n_layers / setup.pipeline
    # Per layer: SP gathers and scatters 2 + 2 times forward and 6 times backward (the projections'
    # inputs gathered again); without SP 2 + 2 all-reduces of twice the bytes. Recomputation repeats
    # the forward's (of the attention's 2 for selective).
    per_layer = 10 + {"none": 0, "selective": 2, "full": 4}[setup.recompute]
    tp_bytes = per_layer * hidden * layers_here * setup.microbatches
    kv = local_tokens * config.n_kv_heads * config.head_dim * element * 2 / setup.tensor
    cp_bytes = 3 * kv * (setup.context - 1) * layers_here * setup.microbatches  # keys/values and their gradients
    dp_bytes = 2 * rank_params(setup, 0) * 4 * (setup.data * setup.context - 1) / (setup.data * setup.context)
    pp_bytes = 2 * local_tokens * config.d_model * element / setup.tensor * setup.microbatches * setup.chunks
    across_nodes = devices > DEVICES_PER_NODE
    cp_link = INTER_NODE_BYTES if setup.tensor * setup.context > DEVICES_PER_NODE else INTRA_NODE_BYTES
    outer_link = INTER_NODE_BYTES if across_nodes else INTRA_NODE_BYTES
    return (compute / (1 - bubble) + tp_bytes / INTRA_NODE_BYTES + cp_bytes / cp_link
            + (dp_bytes + (pp_bytes if setup.pipeline > 1 else 0)) / outer_link)


@dataclass(frozen=True)
class RankedLayout:
    setup: TrainingSetup
    peak: int
    seconds: float

    def describe(self) -> str:
        s = self.setup
        return (f"TP{s.tensor}{'+SP' if s.sequence_parallel else ''} PP{s.pipeline} CP{s.context} DP{s.data}"
                f"{' ZeRO-1' if s.distributed_optimizer else ''} mb{s.micro_batch} recompute {s.recompute}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_layouts(base: TrainingSetup, devices: int, global_batch: int, capacity: int,
                 max_tensor: int = DEVICES_PER_NODE) -> list[RankedLayout]:
    """Every layout of ``devices`` that fits ``capacity`` bytes per device, fastest first by ``step_time``.
    ``base`` gives the model, sequence length, micro-batch and dtype; TP stays within a node."""
    config, out = base.config, []
    for tensor in _divisors(devices):
        if tensor > max_tensor or config.n_kv_heads % tensor or config.n_heads % tensor or config.d_ff % tensor:
            continue
        for pipeline in _divisors(devices // tensor):
            if pipeline > config.n_layers:
                continue
            for context in _divisors(devices // tensor // pipeline):
                if base.seq_length % (2 * context) and context > 1:
                    continue
                data = devices // (tensor * pipeline * context)
                if global_batch % (base.micro_batch * data):
                    continue
                for recompute in ("none", "selective", "full"):
                    setup = dataclasses.replace(
                        base, tensor=tensor, pipeline=pipeline, context=context, data=data,
                        sequence_parallel=tensor > 1, distributed_optimizer=data * context > 1 or base.element < 4,
                        recompute=recompute, recompute_first_layers=None, stage_sizes=None,
                        microbatches=global_batch // (base.micro_batch * data))
                    size = peak(setup)
                    if size <= capacity:
                        out.append(RankedLayout(setup, size, step_time(setup, global_batch)))
                        break  # the cheapest recomputation that fits
    return sorted(out, key=lambda layout: layout.seconds)
