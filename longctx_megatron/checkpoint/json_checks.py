"""Reading the fields of a checkpoint's JSON with checks, for manifest.py's ``from_json`` methods.

Each failure is a CheckpointError naming ``where`` (the file, and the object in it) and the field,
and saying what was expected, so a damaged or foreign checkpoint is refused by name rather than
failing somewhere in loading.
"""

from __future__ import annotations

from functools import partial

import torch

from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.safetensors_io import DTYPES

PARAMS_DTYPES = ("float32", "bfloat16", "float16")


def wrong(where: str, key: str, value, expected: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key} must be {expected}, not {value!r:.80}")


def json_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {value!r:.80}")
    return value


def required(data: dict, key: str, where: str):
    if key not in data:
        raise CheckpointError(f"{where}: the field {key!r} is missing")
    return data[key]


def only_fields(data: dict, known: set[str], where: str) -> None:
    """Refuse fields this version of the format does not define."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")


def non_negative(data: dict, key: str, where: str, minimum: int | None = 0) -> int:
    """An integer >= ``minimum`` (any integer for None); JSON's true and false are not integers here."""
    value = required(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise wrong(where, key, value, "an integer" if minimum is None else f"an integer >= {minimum}")
    return value


positive = partial(non_negative, minimum=1)
integer = partial(non_negative, minimum=None)


def number(data: dict, key: str, where: str) -> float:
    value = required(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong(where, key, value, "a number")
    return value


def boolean(data: dict, key: str, where: str) -> bool:
    if not isinstance(value := required(data, key, where), bool):
        raise wrong(where, key, value, "true or false")
    return value


def string(data: dict, key: str, where: str) -> str:
    if not isinstance(value := required(data, key, where), str):
        raise wrong(where, key, value, "a string")
    return value


def json_list(data: dict, key: str, where: str) -> list:
    if not isinstance(value := required(data, key, where), list):
        raise wrong(where, key, value, "a list")
    return value


def non_negative_ints(data: dict, key: str, where: str) -> tuple[int, ...]:
    """A list of integers >= 0 (offsets, shapes), as a tuple."""
    value = json_list(data, key, where)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise wrong(where, key, value, "a list of integers >= 0")
    return tuple(value)


def plain_name(value: str, key: str, where: str) -> str:
    """A file name without directories: a manifest may only point inside its checkpoint's directory."""
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise wrong(where, key, value, "a plain file name (no directories)")
    return value


def file_name(data: dict, key: str, where: str) -> str:
    return plain_name(string(data, key, where), key, where)


def dtype_name(data: dict, key: str, where: str) -> str:
    """The name of a dtype safetensors can hold, as ``str(dtype)`` writes it (``torch.bfloat16``) or
    without ``torch.``: an allow-list, never whatever attribute of ``torch`` a file names."""
    value = string(data, key, where)
    if getattr(torch, value.removeprefix("torch."), None) not in DTYPES:
        raise wrong(where, key, value, f"one of {sorted(str(dtype) for dtype in DTYPES)}")
    return value


def params_dtype(data: dict, key: str, where: str) -> str:
    """The dtype parameters are trained in: float32, bfloat16 or float16 (never an integer type)."""
    value = string(data, key, where)
    if value not in PARAMS_DTYPES:
        raise wrong(where, key, value, f"one of {', '.join(PARAMS_DTYPES)}")
    return value


def optional_record(data: dict, key: str, where: str, checks: dict) -> dict | None:
    """null, or an object with (at least) the fields of ``checks`` (name -> one of these checks), as it is."""
    value = required(data, key, where)
    if value is not None:
        json_object(value, f"{where}: {key}")
        for name, check in checks.items():
            check(value, name, f"{where}: {key}")
    return value


def inside(offsets: tuple[int, ...], shape: tuple[int, ...], within: tuple[int, ...], where: str) -> None:
    """A piece at ``offsets`` with ``shape`` must lie inside a tensor of shape ``within``."""
    if not len(offsets) == len(shape) == len(within):
        raise CheckpointError(f"{where}: offsets {list(offsets)} and shape {list(shape)} do not have the "
                              f"{len(within)} dimensions of the tensor's {list(within)}")
    if any(o + n > size for o, n, size in zip(offsets, shape, within, strict=True)):
        raise CheckpointError(f"{where}: offsets {list(offsets)} + shape {list(shape)} extend beyond the "
                              f"tensor's {list(within)}")
