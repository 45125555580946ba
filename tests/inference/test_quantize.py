"""Weight-only int8: what is quantized, how close it stays, and that the cached path still equals a
full forward of the quantized model."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.quantize import quantize_weights, weight_bytes
from longctx_megatron.model.build import build_model

pytest.importorskip("torchao")


def _model(dtype=torch.float32):
    config = ModelConfig(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256, vocab_size=300, max_seq_len=256,
                         sliding_window=16, global_every=8, dilated_window=4, dilation=2,
                         attention_layout="sliding:1,dilated:1,full:1")
    return build_model(config, seed=4, dtype=dtype).eval()


def test_projections_become_int8_and_the_embedding_stays():
    model = _model()
    before = weight_bytes(model)
    quantize_weights(model, "int8")
    qkv = model.layers[0].attention.qkv.weight
    assert [getattr(qkv, name).dtype for name in qkv.tensor_data_names] == [torch.int8, torch.float32]
    assert model.embedding.weight.dtype == torch.float32
    projections = sum(p.numel() for n, p in _model().named_parameters() if "embedding" not in n and "norm" not in n)
    saved = before - weight_bytes(model)
    assert saved > 0.7 * 3 * projections  # 4 -> 1 byte per projection weight, plus one scale per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_logits_stay_close_and_decoding_equals_the_quantized_full_forward(dtype):
    model = _model(dtype)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(tokens)[0].float()
    quantize_weights(model, "int8")
    with torch.no_grad():
        quantized = model(tokens)[0].float()
    error = (quantized - exact).norm() / exact.norm()
    assert error < 0.02, error
    engine = InferenceEngine(model, prefill_chunk=7)
    cache, logits = engine.prefill([tokens[0, :30].tolist(), tokens[1, :30].tolist()])
    steps = [logits]
    for position in range(30, 39):
        steps.append(engine.decode(cache, tokens[:, position]))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.stack(steps, dim=1), quantized[:, 29:39], rtol=tolerance, atol=tolerance)


def test_an_unknown_quantization_is_named():
    with pytest.raises(ValueError, match="int4"):
        quantize_weights(_model(), "int4")
