"""The oracle of inference: the logits of chunked prefill and one-token decoding equal those of one
full forward pass of the same tokens through the reference backend (fp32), at every position.

Covered: every layer kind (sliding with global positions reached during decode, dilated with every
offset, full), GQA 4:1 and 1:1, each RoPE scaling, prompts of different lengths in one batch,
prefill chunks that do not divide the window, and the sliding layers' history on another device.
"""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.config.rope import RopeConfig
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.model.build import build_model

LENGTH = 40  # tokens per sequence: past several windows (8), global periods (4) and dilated spans (3 x 2)


def _config(n_heads=8, n_kv_heads=2, rope=None, **overrides) -> ModelConfig:
    fields = dict(d_model=64, n_layers=5, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=96, vocab_size=97,
                  max_seq_len=256, sliding_window=8, global_every=4, dilated_window=3, dilation=2,
                  attention_layout="sliding:2,dilated:2,full:1")
    fields.update(overrides)
    if rope is not None:
        fields["rope"] = rope
    return ModelConfig(**fields)


def _models(config):
    reference = build_model(config, seed=3, attention_backend="reference").eval()
    return reference, InferenceEngine(build_model(config, seed=3).eval(), prefill_chunk=5)


def _tokens(batch=2, length=LENGTH, vocab=97, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _full_forward(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


def _incremental(engine, sequences, prompt_lengths):
    """Logits after every token from the prompt's last on: prefill, then decode the rest one at a time."""
    cache, logits = engine.prefill([seq[:n].tolist() for seq, n in zip(sequences, prompt_lengths, strict=True)])
    steps = [logits]
    total = max(len(seq) for seq in sequences)
    positions = torch.tensor(prompt_lengths)
    while int(positions.min()) < total:
        next_tokens = torch.stack([seq[min(int(p), len(seq) - 1)] for seq, p in zip(sequences, positions, strict=True)])
        steps.append(engine.decode(cache, next_tokens))
        positions += 1
    return steps


def _check(reference_logits, steps, prompt_lengths):
    for row, prompt in enumerate(prompt_lengths):
        for step, logits in enumerate(steps):
            position = prompt - 1 + step
            if position >= reference_logits.shape[1]:
                break
            want = reference_logits[row, position]
            torch.testing.assert_close(logits[row], want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, r=row, p=position: f"row {r} position {p}: {m}")


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("prompt_lengths", [[1, 1], [13, 6], [LENGTH - 1, 9]], ids=["decode-all", "mixed", "long"])
def test_prefill_then_decode_equals_one_forward(n_heads, n_kv_heads, prompt_lengths):
    config = _config(n_heads, n_kv_heads)
    reference, engine = _models(config)
    tokens = _tokens()
    _check(_full_forward(reference, tokens), _incremental(engine, list(tokens), prompt_lengths), prompt_lengths)


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 11, LENGTH])
def test_prefill_chunk_sizes_that_do_not_divide_the_window(chunk):
    config = _config()
    reference, engine = _models(config)
    engine.prefill_chunk = chunk
    tokens = _tokens()
    prompt_lengths = [LENGTH - 4, 17]
    _check(_full_forward(reference, tokens), _incremental(engine, list(tokens), prompt_lengths), prompt_lengths)


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn", "llama3"])
def test_each_rope_scaling(scaling):
    rope = RopeConfig(scaling=scaling, factor=4.0, original_max_position=16) if scaling != "none" else RopeConfig()
    config = _config(rope=rope, rope_by_kind={"full": RopeConfig(theta=500.0)})
    reference, engine = _models(config)
    tokens = _tokens(seed=1)
    _check(_full_forward(reference, tokens), _incremental(engine, list(tokens), [7, 3]), [7, 3])


def test_history_kept_on_another_device_gives_the_same_logits():
    config = _config()
    reference, engine = _models(config)
    engine.history_device = "meta"  # proves the store is separate: any read of it would fail
    with pytest.raises((NotImplementedError, RuntimeError)):
        _incremental(engine, list(_tokens()), [6, 6])
    engine.history_device = "cpu"
    tokens = _tokens()
    _check(_full_forward(reference, tokens), _incremental(engine, list(tokens), [6, 6]), [6, 6])


def test_each_decode_step_reads_only_the_keys_the_rule_allows():
    """Per layer and head, the keys a decode query saw equal the rule's closed-form count, and the
    slots handed to attention do not grow with the context in sliding (non-global steps) and
    dilated layers: the ring and the older global keys, and W per head."""
    config = _config()
    _, engine = _models(config)
    tokens = _tokens(batch=2, length=120)
    cache, _ = engine.prefill([tokens[0, :3].tolist(), tokens[1, :11].tolist()])
    plan = config.layer_plan()
    for _ in range(100):
        positions = cache.lengths.clone()
        engine.decode(cache, tokens[torch.arange(2), positions])
        for index, layer_cache in cache.layers.items():
            pattern = layer_cache.pattern
            for row in range(2):
                p = int(positions[row])
                want = torch.stack([pattern.keys_per_query(p + 1, head)[p] for head in range(config.n_heads)])
                assert torch.equal(layer_cache.last_reads.visible[row, :, 0], want), (index, p, row)
            longest = int(positions.max())
            if plan[index].kind == "dilated":  # W per KV head
                assert layer_cache.last_reads.keys == config.dilated_window
            elif plan[index].kind == "sliding":  # the ring and the global keys up to the longest sequence's
                assert layer_cache.last_reads.keys == config.sliding_window + longest // config.global_every + 1
            else:
                assert layer_cache.last_reads.keys == longest + 1


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.02), (torch.float16, 0.005)], ids=["bf16", "fp16"])
def test_half_precision_decoding_follows_the_same_models_full_forward(dtype, tol):
    """The 16-bit dtypes users serve in: caches in that dtype, logits against the same weights' full
    forward in that dtype (the reference backend), within the kernels' rounding: measured 0.008 (bf16)
    and 0.001 (fp16) on logits up to 1.4; skipping the global queries moves them by 0.07."""
    config = _config()
    reference = build_model(config, seed=3, attention_backend="reference", dtype=dtype).eval()
    engine = InferenceEngine(build_model(config, seed=3, dtype=dtype).eval(), prefill_chunk=5)
    tokens = _tokens()
    want = _full_forward(reference, tokens).float()
    steps = _incremental(engine, list(tokens), [13, 6])
    for row, prompt in enumerate([13, 6]):
        for step, logits in enumerate(steps):
            position = prompt - 1 + step
            if position < LENGTH:
                torch.testing.assert_close(logits[row], want[row, position], rtol=tol, atol=tol)
