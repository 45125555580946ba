"""Process groups for tensor, context, data and pipeline parallelism, in Megatron-LM's rank order.

Global rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank (Megatron's
"tp-cp-dp-pp"): tensor-parallel ranks are adjacent (same node, fastest links), then context
parallel (the sequence split, parallel/context.py), then data parallel, then pipeline. The CP ranks
of one data-parallel replica hold the same weights and different parts of each sample, so
gradients are reduced (and ZeRO-1 shards) over data x context parallel ranks (``dp_cp_*``), as in
Megatron; the data path shards samples over ``dp_*`` only. The groups live in a
``ParallelContext`` that is passed explicitly to whatever needs it; nothing is global.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx_megatron.config.errors import ConfigError


class ParallelLayoutError(ConfigError):
    """The requested parallel layout cannot be built (sizes, backend, model shape)."""


@dataclass(frozen=True)
class ParallelContext:
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp_ranks: tuple[int, ...]  # global ranks of my tensor-parallel group, in TP-rank order
    pp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    # First and last pipeline stage of my pipeline (both hold the tied embedding); None unless I am one.
    embedding_group: dist.ProcessGroup | None = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None
    cp_ranks: tuple[int, ...] = ()
    # The data x context parallel ranks holding my weights, in dp_cp_rank order: gradients are
    # reduced, and ZeRO-1 shards, over this group (the DP group itself without CP).
    dp_cp_group: dist.ProcessGroup | None = None
    dp_cp_ranks: tuple[int, ...] = ()

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank


Groups = list[list[int]]


def layout_ranks(world_size: int, tensor: int, pipeline: int, context: int = 1) -> dict[str, Groups]:
    """The groups of each kind ("tp", "cp", "dp", "pp", "dp_cp") as lists of global ranks, Megatron order."""
    data = world_size // (tensor * pipeline * context)
    grid = [(t, c, d, p) for p in range(pipeline) for d in range(data) for c in range(context) for t in range(tensor)]

    def rank(t: int, c: int, d: int, p: int) -> int:
        return ((p * data + d) * context + c) * tensor + t

    def groups(varying: str) -> Groups:
        """Ranks that differ only in the dimensions named in ``varying`` (of "tcdp"), one list per rest."""
        out: dict[tuple, list[int]] = {}
        for coords in grid:
            fixed = tuple(x for name, x in zip("tcdp", coords, strict=True) if name not in varying)
            out.setdefault(fixed, []).append(rank(*coords))
        return list(out.values())

    return {"tp": groups("t"), "cp": groups("c"), "dp": groups("d"), "pp": groups("p"), "dp_cp": groups("cd")}


def check_layout(world_size: int, tensor: int, pipeline: int, data: int | None, context: int = 1) -> int:
    """Validate sizes and return the data-parallel size."""
    for name, value in (("tensor-model", tensor), ("pipeline-model", pipeline), ("context", context)):
        if value < 1:
            raise ParallelLayoutError(f"{name}-parallel size {value} must be >= 1")
    model = tensor * pipeline * context
    sizes = f"tensor {tensor} x pipeline {pipeline}" + (f" x context {context}" if context > 1 else "")
    if world_size % model:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by ({sizes}) = {model}; launch a multiple of {model} "
            f"processes or change the sizes"
        )
    derived = world_size // model
    if data is not None and data != derived:
        raise ParallelLayoutError(f"data-parallel size {data} does not match world size {world_size} / ({sizes}) = "
                                  f"{derived}")
    return derived


def default_backend(device: torch.device | None = None) -> str:
    """The process-group backend for ``device`` (default: CUDA when available): NCCL for CUDA, gloo for CPU."""
    kind = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return "nccl" if kind == "cuda" else "gloo"


def _elastic_store(timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with keys private to this restart attempt.

    torchrun keeps one store across restarts, so without a prefix a restarted rank can read the
    address a killed rank of the previous attempt published and fail to connect (seen with
    ``--max-restarts``: "Gloo connectFullMesh failed ... Connection refused" to the dead rank's port).
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent_hosts_it and os.environ["RANK"] == "0", timeout=timeout,
                          multi_tenant=not agent_hosts_it)
    return dist.PrefixStore(f"longctx/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    if backend == "nccl" and not torch.cuda.is_available():
        raise ParallelLayoutError("backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun or a test launcher
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_elastic_store(timeout), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    else:  # a plain single process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize_parallel(
    tensor: int = 1,
    pipeline: int = 1,
    data: int | None = None,
    backend: str | None = None,
    timeout_minutes: float = 10.0,
    context: int = 1,
) -> ParallelContext:
    """Create the process groups (initialising torch.distributed if needed) and return the context.

    Every rank must call this with the same arguments: group creation is collective.
    """
    if not dist.is_initialized():
        _init_process_group(backend or default_backend(), datetime.timedelta(minutes=timeout_minutes))
    elif backend is not None and dist.get_backend() != backend:
        raise ParallelLayoutError(f"torch.distributed already uses backend {dist.get_backend()!r}, not {backend!r}")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    data = check_layout(world_size, tensor, pipeline, data, context)
    layout = layout_ranks(world_size, tensor, pipeline, context)
    layout["embedding"] = [[ranks[0], ranks[-1]] for ranks in layout["pp"]] if pipeline > 1 else []
    if context == 1:
        del layout["cp"], layout["dp_cp"]  # trivial: no groups to create (and none in older layouts)
    mine = {"embedding": (None, ()), "cp": (None, (rank,)), "dp_cp": (None, ())}
    for kind, groups in layout.items():
        for ranks in groups:
            group = dist.new_group(ranks)  # collective: every rank creates every group
            if rank in ranks:
                mine[kind] = (group, tuple(ranks))
    return ParallelContext(
        world_size=world_size, rank=rank, tp_size=tensor, pp_size=pipeline, dp_size=data,
        tp_rank=mine["tp"][1].index(rank), pp_rank=mine["pp"][1].index(rank), dp_rank=mine["dp"][1].index(rank),
        tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0],
        tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1], dp_ranks=mine["dp"][1], embedding_group=mine["embedding"][0],
        cp_size=context, cp_rank=mine["cp"][1].index(rank), cp_group=mine["cp"][0], cp_ranks=mine["cp"][1],
        dp_cp_group=mine["dp_cp"][0] if context > 1 else mine["dp"][0],
        dp_cp_ranks=mine["dp_cp"][1] if context > 1 else mine["dp"][1],
    )


def check_model_fits_layout(config, tp: int) -> None:
    """The model shape must split evenly over ``tp`` tensor-parallel ranks (checked before any group exists)."""
    if config.n_heads % tp:
        raise ParallelLayoutError(f"tensor-model-parallel size {tp} must divide n_heads={config.n_heads}")
    if config.n_kv_heads % tp:
        raise ParallelLayoutError(
            f"tensor-model-parallel size {tp} must divide n_kv_heads={config.n_kv_heads} (each rank owns whole "
            f"KV heads and their query heads); use a tensor size among "
            f"{[d for d in range(1, config.n_kv_heads + 1) if config.n_kv_heads % d == 0]}"
        )
    if config.d_ff % tp:
        raise ParallelLayoutError(f"tensor-model-parallel size {tp} must divide d_ff={config.d_ff}")
