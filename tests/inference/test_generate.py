"""Sampling and generate(): each option does what it says, seeds reproduce, stops stop."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.generate import generate, stream
from longctx_megatron.inference.sampling import SamplingParams, filtered_probabilities, sample
from longctx_megatron.model.build import build_model
from tests.inference.oracles import greedy_by_full_forward

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0), torch.Generator()).tolist() == [0, 3]


def test_top_k_and_top_p_keep_exactly_the_tokens_they_should():
    top2 = filtered_probabilities(LOGITS, SamplingParams(top_k=2))
    assert torch.equal(top2 > 0, torch.tensor([[True, True, False, False], [False, False, True, True]]))
    torch.testing.assert_close(top2[0, :2], torch.tensor([0.5, 0.3]) / 0.8)
    # top_p 0.8: 0.5 + 0.3 reaches it, so two tokens; 0.81 needs the third; 0.4 keeps only the first.
    for top_p, kept in [(0.8, 2), (0.81, 3), (0.4, 1)]:
        assert (filtered_probabilities(LOGITS, SamplingParams(top_p=top_p)) > 0).sum(-1).tolist() == [kept, kept]


def test_temperature_sharpens_and_flattens():
    cold = filtered_probabilities(LOGITS, SamplingParams(temperature=0.5))[0]
    hot = filtered_probabilities(LOGITS, SamplingParams(temperature=2.0))[0]
    assert cold[0] > 0.5 > hot[0]


def test_sampling_frequencies_follow_the_probabilities_and_the_seed_reproduces():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = LOGITS[:1].expand(20000, -1)
    first = sample(logits, params, torch.Generator().manual_seed(7))
    again = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    frequencies = torch.bincount(first, minlength=4).float() / len(first)
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2),
                                 dict(top_k=1.5), dict(top_p=0), dict(top_p=1.5)])
def test_bad_sampling_parameters_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


# ------------------------------------------------------------------------------------ generate()
def _engine():
    config = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=50, max_seq_len=64,
                         sliding_window=4, global_every=2, dilated_window=2, dilation=2,
                         attention_layout="sliding:1,dilated:1,full:1")
    return InferenceEngine(build_model(config, seed=5).eval(), prefill_chunk=3)



def test_greedy_generation_equals_repeated_full_forwards():
    engine = _engine()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    results = generate(engine, prompts, 12)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == greedy_by_full_forward(engine.model, prompt, 12)
        assert result.finish_reason == "length"


def test_seeded_sampling_reproduces_and_seeds_differ():
    engine = _engine()
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, seed=11)
    first = [r.tokens for r in generate(engine, [[1, 2, 3]] * 3, 16, params)]
    again = [r.tokens for r in generate(engine, [[1, 2, 3]] * 3, 16, params)]
    other = [r.tokens for r in generate(engine, [[1, 2, 3]] * 3, 16, SamplingParams(1.5, 20, 0.95, seed=12))]
    assert first == again and first != other and len({tuple(t) for t in first}) > 1  # rows draw differently


def test_eod_and_stop_strings_end_a_sequence_and_streaming_yields_each_step():
    engine = _engine()
    greedy = generate(engine, [[1, 2, 3]], 10)[0].tokens
    eod = greedy[3]
    result = generate(engine, [[1, 2, 3]], 10, eod=eod)[0]
    assert result.tokens == greedy[:greedy.index(eod) + 1] and result.finish_reason == "eod"

    def detokenize(tokens):
        return " ".join(f"t{t}" for t in tokens)

    stop = f"t{greedy[2]}"
    result = generate(engine, [[1, 2, 3]], 10, stop=[stop], detokenize=detokenize)[0]
    assert result.finish_reason == "stop" and stop not in result.text and len(result.tokens) <= 3
    steps = list(stream(engine, [[1, 2, 3], [4]], 5, eod=eod))
    assert len(steps) == 5 and all(len(step) == 2 for step in steps)
    assert [step[0] for step in steps] == [t if i <= greedy.index(eod) else None for i, t in enumerate(greedy[:5])]


def test_bad_requests_are_named():
    engine = _engine()
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(engine, [[1] * 60], 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(engine, [[1, 50]], 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(engine, [[]], 2)
    with pytest.raises(ValueError, match="detokenize"):
        generate(engine, [[1]], 2, stop=["x"])
