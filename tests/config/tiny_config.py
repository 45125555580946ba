"""The tiny model shape shared by the config tests."""

from longctx_megatron.config import ModelConfig

TINY_SHAPE = dict(
    d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100, max_seq_len=256,
    sliding_window=32, global_every=8, dilated_window=8, dilation=2,
)
TINY = dict(TINY_SHAPE, n_layers=4)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})
