"""Weight-only int8 quantization of the projections for inference, through torchao.

Every projection (attention qkv and out, the SwiGLU's gate/up and down; plain or tensor-parallel)
gets int8 weights with one scale per output channel (torchao's ``Int8WeightOnlyConfig``); the
activations stay in the model's dtype. The embedding and the tied output head keep their dtype:
the head reads the embedding's weight, and the vocabulary is where quantization error shows most.
torchao 0.18 runs with this torch on CPU (checked by the tests); on CUDA it is unmeasured here.
"""

from __future__ import annotations

import torch

from longctx_megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear

QUANTIZATIONS = ("none", "int8")
_PROJECTIONS = (torch.nn.Linear, ColumnParallelLinear, RowParallelLinear)


def is_projection(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, _PROJECTIONS) and name != "output"  # an untied output head keeps its dtype


def quantize_weights(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """``model`` with its projections' weights quantized by ``method`` (in place; "none" leaves it)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"--quantize {method!r} is not one of {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise ImportError("--quantize int8 needs torchao (pip install --no-deps torchao==0.18.0)") from error
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=is_projection)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights hold, quantized ones as their int8 data plus scales."""
    total = 0
    for param in model.parameters():
        parts = getattr(param, "tensor_data_names", None)
        total += sum(getattr(param, part).nbytes for part in parts) if parts else param.nbytes
    return total
