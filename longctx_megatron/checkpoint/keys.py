"""The names of a checkpoint's tensors and of their pieces' keys in the shard files: built and parsed here only.

A checkpoint stores every tensor under a global name (its manifest is keyed by these names):

* ``model/<param>``: a parameter's weights, in the training dtype;
* ``optimizer/<kind>/<param>``: its optimizer state: Adam's moments (``exp_avg``, ``exp_avg_sq``,
  torch's state names) and, when the weights are not float32, the float32 master weights (``main``);
* ``rng/rankNNNNN/<state>``: one rank's generator states (meaningful only under the same layout).

A piece of a tensor is stored in its shard file under ``<name>[@<offsets>][#<part>]``: ``@`` tells
apart the boxes a distributed-optimizer rank cuts from one flat shard (offsets in the TP-local
tensor), ``#`` the parts a box splits into in global coordinates (stacked or padded TP slices).
Keys only need to be unique within a file; readers find pieces through the manifest, never by
parsing a key.
"""

from __future__ import annotations

import re

_MODEL = "model/"
_OPTIMIZER = "optimizer/"
_RNG = "rng/"
MAIN = "main"  # the optimizer kind of the float32 master weights
_NAME = re.compile(r"^(model/[^/]+|optimizer/[^/]+/[^/]+|rng/rank\d{5,}/\S+)$")


def model_key(param: str) -> str:
    """The name of parameter ``param``'s weights."""
    return f"{_MODEL}{param}"


def optimizer_key(kind: str, param: str) -> str:
    """The name of parameter ``param``'s optimizer state ``kind`` (a moment's name, or MAIN)."""
    if not kind or "/" in kind:
        raise ValueError(f"optimizer state kind {kind!r} must be a non-empty name without '/'")
    return f"{_OPTIMIZER}{kind}/{param}"


def rng_key(rank: int, state: str) -> str:
    """The name of global rank ``rank``'s generator state ``state`` (e.g. ``cpu``, ``chunk0/tensor``)."""
    return f"{_rng_prefix(rank)}{state}"


def rng_state_of(name: str, rank: int) -> str | None:
    """The generator state that ``name`` holds if it is one of ``rank``'s (inverse of rng_key), else None."""
    prefix = _rng_prefix(rank)
    return name[len(prefix):] if name.startswith(prefix) else None


def is_tensor_name(name: str) -> bool:
    """Whether ``name`` has one of the three forms above (a manifest from elsewhere may hold anything)."""
    return isinstance(name, str) and _NAME.match(name) is not None


def is_model_key(name: str) -> bool:
    return name.startswith(_MODEL)


def is_rng_key(name: str) -> bool:
    """Whether ``name`` is a generator state: those belong to a layout, so resharding drops them."""
    return name.startswith(_RNG)


def parameter_of(name: str) -> str:
    """The parameter a weight or optimizer-state name belongs to (``optimizer/exp_avg/layers.0.mlp.down.weight``
    -> ``layers.0.mlp.down.weight``); any other name is returned as it is."""
    if name.startswith(_MODEL):
        return name[len(_MODEL):]
    if name.startswith(_OPTIMIZER):
        return name.split("/", 2)[2]
    return name


def piece_key(name: str, part: int | None = None, local_offsets: list[int] | None = None) -> str:
    """The file key of a piece of tensor ``name``: ``@`` and the offsets of the TP-local box it was cut
    from (for the flat shards of the distributed optimizer), then ``#`` and its part number (when a
    box comes out as several global pieces; None when it is the only one)."""
    key = name if local_offsets is None else f"{name}@{'.'.join(map(str, local_offsets))}"
    return key if part is None else f"{key}#{part}"


def _rng_prefix(rank: int) -> str:
    return f"{_RNG}rank{rank:05d}/"
