"""What one rank puts into a checkpoint, and how it takes its part back under any parallel layout.

Everything is stored in *model space*: each tensor under a global name with its global shape,
as boxes (offsets + local shape) cut from the rank's tensor-parallel slices, under the names of
keys.py: the weights, Adam's moments (float32), float32 master weights only when the weights are
not float32, and every rank's generator states. Each box is reported as a manifest.Piece.

Each data-parallel rank of the distributed optimizer writes its own flat per-bucket shard, cut
into boxes of the parameters it covers (a partial row, whole rows, a partial row each), with no
communication; loading re-flattens model-space regions for the new layout's buckets, so a ZeRO-1
checkpoint loads into any layout, with or without ZeRO. Each replicated tensor is
written by one rank only: sharded ones by one data-parallel replica, TP-replicated ones (norms) by
one (tp, dp) pair, chosen greedily by size so every rank writes about as many bytes.
"""

from __future__ import annotations

import torch

from longctx_megatron.checkpoint import keys
from longctx_megatron.checkpoint.manifest import Piece
from longctx_megatron.parallel.distributed_optimizer import MOMENTS, DistributedOptimizer
from longctx_megatron.parallel.layers import ShardSpec
from longctx_megatron.parallel.tensor import tensor_parallel_shards


def model_parameters(chunks: list) -> list[tuple[str, torch.nn.Parameter, ShardSpec | None, bool]]:
    """(global name, parameter, TP shard or None, is the last stage's copy of the tied embedding)."""
    out = []
    for chunk in chunks:
        specs = tensor_parallel_shards(chunk)
        for name, param in chunk.named_parameters():
            out.append((name, param, specs.get(name), chunk.is_embedding_copy(name)))
    return out


def global_shape(param: torch.Tensor, spec: ShardSpec | None) -> tuple[int, ...]:
    return tuple(spec.global_shape) if spec is not None else tuple(param.shape)


def local_to_global(spec: ShardSpec | None, offsets: list[int], box: torch.Tensor
                    ) -> list[tuple[list[int], torch.Tensor]]:
    """(global offsets, sub-box) for the parts of ``box`` (at ``offsets`` in a rank's TP-local tensor)
    that hold real (unpadded) values; stacked parts come out separately."""
    if spec is None:
        return [(list(offsets), box)]
    dim, out = spec.dim, []
    for local, start, length in spec.regions():
        lo, hi = max(offsets[dim], local), min(offsets[dim] + box.shape[dim], local + length)
        if lo < hi:
            moved = list(offsets)
            moved[dim] = start + lo - local
            out.append((moved, box.narrow(dim, lo - offsets[dim], hi - lo)))
    return out


def boxes(tensor: torch.Tensor, spec: ShardSpec | None) -> list[tuple[list[int], torch.Tensor]]:
    """(global offsets, box) for each part of a rank's slice that holds real (unpadded) values."""
    return local_to_global(spec, [0] * tensor.dim(), tensor)


def flat_boxes(flat: torch.Tensor, shape: torch.Size, start: int) -> list[tuple[list[int], torch.Tensor]]:
    """(offsets, box) views covering ``flat``, the values from row-major position ``start`` on of a
    tensor of ``shape`` (at most 2-D): a partial first row, whole rows, a partial last row."""
    if len(shape) > 2:
        raise ValueError(f"flat ranges of a {len(shape)}-D tensor are not supported")
    if len(shape) < 2:
        return [([start] if shape else [], flat.view(-1) if shape else flat.view(()))]
    cols, pos, stop, out = shape[1], start, start + flat.numel(), []
    while pos < stop:
        row, col = divmod(pos, cols)
        if col or stop - pos < cols:
            count = min(cols - col, stop - pos)
            out.append(([row, col], flat[pos - start:pos - start + count].view(1, count)))
        else:
            count = (stop - pos) // cols * cols
            out.append(([row, 0], flat[pos - start:pos - start + count].view(-1, cols)))
        pos += count
    return out


def writers(params: list, ctx) -> set[str]:
    """Names of the parameters (and their optimizer state) this rank writes."""
    sharded = [(p.numel() * p.element_size(), n) for n, p, s, copy in params if s is not None and not copy]
    replicated = [(p.numel() * p.element_size(), n) for n, p, s, copy in params if s is None and not copy]
    mine = set()
    for items, slots, me in ((sharded, ctx.dp_cp_size, ctx.dp_cp_rank),  # context-parallel ranks are replicas too
                             (replicated, ctx.dp_cp_size * ctx.tp_size, ctx.dp_cp_rank * ctx.tp_size + ctx.tp_rank)):
        load = [0] * slots
        for size, name in sorted(items, key=lambda item: (-item[0], item[1])):
            slot = load.index(min(load))
            load[slot] += size
            if slot == me:
                mine.add(name)
    return mine


def optimizer_state(optimizer, params: list, keep: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"exp_avg", "exp_avg_sq"} in the parameter's (TP-local) shape, for names in ``keep``."""
    out = {}
    for name, param, _, copy in params:
        state = optimizer.state.get(param, {})
        if not copy and name in keep and all(kind in state for kind in MOMENTS):
            out[name] = {kind: state[kind] for kind in MOMENTS}
    return out


def distributed_optimizer_boxes(optimizer: DistributedOptimizer, params: list, ctx):
    """(name, kind, param, spec, local offsets, box) for every value of this DP rank's
    shard of each bucket: its part of the Adam moments (and of the fp32 masters, when the weights
    are not fp32), cut into boxes of the parameters' TP-local tensors. Nothing is communicated."""
    info = {param: (name, spec) for name, param, spec, copy in params if not copy}
    for param, start, _, master, moments in optimizer.shards():
        name, spec = info.get(param, (None, None))
        if name is not None and (spec is not None or ctx.tp_rank == 0):  # TP replicas: once
            kinds = {**moments, keys.MAIN: master} if param.dtype != torch.float32 else moments
            for kind, flat in kinds.items():
                for offsets, box in flat_boxes(flat, param.shape, start):
                    yield name, kind, param, spec, offsets, box


def rng_states(chunks: list, device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    for index, chunk in enumerate(chunks):
        tracker = getattr(chunk, "rng_tracker", None)
        for name, state in (tracker.get_states().items() if tracker else ()):
            states[f"chunk{index}/{name}"] = state
    return states


def set_rng_states(chunks: list, device: torch.device, states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    for index, chunk in enumerate(chunks):
        tracker = getattr(chunk, "rng_tracker", None)
        if tracker:
            prefix = f"chunk{index}/"
            tracker.set_states({key[len(prefix):]: v for key, v in states.items() if key.startswith(prefix)})


def collect(chunks: list, optimizer, ctx, device: torch.device, buffers: dict | None = None
            ) -> tuple[dict[str, torch.Tensor], list[Piece]]:
    """This rank's tensors to write (file key -> CPU tensor) and their index entries.

    With ``buffers`` (a dict kept between saves) every tensor is copied into a host buffer of its
    own, reused by the next save, so training may go on while a background thread writes; without,
    CPU tensors are written in place. Reusing the buffers matters: filling freshly allocated
    memory is several times slower than copying into memory already touched.
    """
    params = model_parameters(chunks)
    mine = writers(params, ctx)
    distributed = isinstance(optimizer, DistributedOptimizer)
    moments = {} if distributed else optimizer_state(optimizer, params, mine)
    tensors: dict[str, torch.Tensor] = {}
    index: list[Piece] = []

    def add(name: str, cut: list, shape: tuple[int, ...], local_offsets: list[int] | None = None) -> None:
        for part, (offsets, box) in enumerate(cut):
            key = keys.piece_key(name, part if len(cut) > 1 else None, local_offsets)
            if buffers is not None:
                box = _copy_into(buffers, key, box)
            elif box.device.type != "cpu":
                box = box.to("cpu")
            tensors[key] = box
            index.append(Piece(name, key, tuple(offsets), tuple(box.shape), tuple(shape), str(box.dtype)))

    with torch.no_grad():
        for name, param, spec, copy in params:
            if copy or name not in mine:
                continue
            add(keys.model_key(name), boxes(param.detach(), spec), global_shape(param, spec))
            for kind, value in moments.get(name, {}).items():
                add(keys.optimizer_key(kind, name), boxes(value, spec), global_shape(param, spec))
        if distributed:
            for name, kind, param, spec, offsets, box in distributed_optimizer_boxes(optimizer, params, ctx):
                add(keys.optimizer_key(kind, name), local_to_global(spec, offsets, box), global_shape(param, spec),
                    local_offsets=offsets)
        for state, value in rng_states(chunks, device).items():
            add(keys.rng_key(ctx.rank, state), [([0], value)], tuple(value.shape))
    return tensors, index


def _copy_into(buffers: dict, key: str, box: torch.Tensor) -> torch.Tensor:
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != box.shape or buffer.dtype != box.dtype:
        buffer = buffers[key] = torch.empty(box.shape, dtype=box.dtype, pin_memory=box.device.type == "cuda")
    buffer.copy_(box, non_blocking=True)
    return buffer


def load(chunks: list, optimizer, ctx, device: torch.device, reader, steps: int, load_optimizer: bool,
         load_rng: bool) -> None:
    """Fill this rank's weights (and optimizer state, RNG states) from ``reader`` (a CheckpointReader)."""
    params = model_parameters(chunks)

    def weights(name: str, spec, shape) -> torch.Tensor:
        main = keys.optimizer_key(keys.MAIN, name)
        return reader.read_local(main if reader.has(main) else keys.model_key(name), spec, shape)

    with torch.no_grad():
        for name, param, spec, _ in params:
            param.copy_(weights(name, spec, param.shape).to(param.dtype))
        restore = load_optimizer and steps > 0
        if isinstance(optimizer, DistributedOptimizer):
            _load_distributed(optimizer, params, reader, weights, steps if restore else 0)
        elif restore:
            for name, param, spec, _ in params:
                state = {kind: reader.read_local(keys.optimizer_key(kind, name), spec, param.shape).float()
                         .to(param.device) for kind in MOMENTS}
                optimizer.state[param] = {"step": torch.tensor(float(steps)), **state}
            for group in optimizer.param_groups:
                if "step" in group:
                    group["step"] = steps
    if load_rng:
        states = {state: reader.read_global(name) for name in reader.names()
                  if (state := keys.rng_state_of(name, ctx.rank)) is not None}
        if states:  # a converted checkpoint has none
            set_rng_states(chunks, device, states)


def _load_distributed(optimizer: DistributedOptimizer, params: list, reader, weights, steps: int) -> None:
    """Hand the optimizer model-space masters (the saved masters, or else the weights) and moments."""
    info = {param: (name, spec) for name, param, spec, _ in params}

    def masters(param) -> torch.Tensor:
        return weights(*info[param], param.shape)

    def moments(param, kind: str) -> torch.Tensor:
        name, spec = info[param]
        return reader.read_local(keys.optimizer_key(kind, name), spec, param.shape)

    optimizer.load_state(masters, moments, steps)
