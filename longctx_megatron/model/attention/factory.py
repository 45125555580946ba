"""Attention backends by name: ``create``, ``register_variant``, ``list_variants``, and ``select``.

``select("auto", ...)`` picks per layer and device: flash, then flex on CUDA; chunked elsewhere.
A named backend that cannot run here fails with the reason and the alternatives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longctx_megatron.model.attention.backends.base import AttentionBackend, BackendUnavailable
from longctx_megatron.model.attention.backends.chunked import ChunkedBackend
from longctx_megatron.model.attention.backends.flash import FlashBackend
from longctx_megatron.model.attention.backends.flex import FlexBackend
from longctx_megatron.model.attention.backends.reference import ReferenceBackend
from longctx_megatron.model.attention.patterns import Documents, Pattern

_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {}
_INSTANCES: dict[str, AttentionBackend] = {}
AUTO_ORDER = {"cuda": ("flash", "flex", "chunked")}
AUTO_DEFAULT = ("chunked",)


def register_variant(name: str, factory: Callable[[], AttentionBackend], replace: bool = False) -> None:
    """Make ``factory()`` available as backend ``name`` (e.g. a tuned kernel or an experiment)."""
    if name == "auto" or (name in _FACTORIES and not replace):
        raise ValueError(f"attention backend {name!r} is already registered")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def list_variants() -> list[str]:
    return sorted(_FACTORIES)


def create(name: str) -> AttentionBackend:
    if name not in _FACTORIES:
        raise BackendUnavailable(
            f"unknown attention backend {name!r}; known: auto, {', '.join(list_variants())}"
        )
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def select(name: str, pattern: Pattern, q: torch.Tensor, dropout_p: float = 0.0,
           documents: Documents | None = None) -> AttentionBackend:
    """The backend that runs ``pattern`` on ``q`` with attention dropout ``dropout_p`` (within
    ``documents``): the named one (checked), or for 'auto' the first in the device's order that can
    run the layer as configured."""
    if name != "auto":
        backend = create(name)
        backend.check(pattern, q, dropout_p, documents)
        return backend
    for candidate in AUTO_ORDER.get(q.device.type, AUTO_DEFAULT):
        backend = create(candidate)
        if backend.unsupported_reason(pattern, q, dropout_p, documents) is None:
            return backend
    raise BackendUnavailable(f"no attention backend can run {pattern} on {q.device} ({q.dtype}) with dropout "
                             f"{dropout_p}" + (" and packed documents" if documents is not None else ""))


for _name, _factory in (
    ("reference", ReferenceBackend),
    ("chunked", ChunkedBackend),
    ("flex", FlexBackend),
    ("flash", FlashBackend),
):
    register_variant(_name, _factory)
