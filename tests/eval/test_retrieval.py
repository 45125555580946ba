"""The retrieval grid's cases, scores and heatmap."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.eval.heatmap import heatmap_png
from longctx_megatron.eval.retrieval import answer_logprob, build_case, grid, score, summary
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.model.build import build_model

TOKENIZER = ByteTokenizer()


@pytest.mark.parametrize("task", ["passkey", "needle"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_a_case_has_the_length_and_the_fact_at_its_depth(task, depth):
    case = build_case(TOKENIZER, task, 600, depth, sample=2, seed=5)
    text = TOKENIZER.decode(case.prompt)
    assert len(case.prompt) == 600 and case.answer.isdigit() and case.answer in text
    fact_at = text.index(case.answer) / len(text)
    assert abs(fact_at - depth) < 0.2  # where the depth says, within the fact and the closing question's share
    assert TOKENIZER.decode(case.answer_tokens).strip() == case.answer
    again = build_case(TOKENIZER, task, 600, depth, sample=2, seed=5)
    other = build_case(TOKENIZER, task, 600, depth, sample=3, seed=5)
    assert again == case and other.answer != case.answer  # seeded, and samples differ


def test_bad_grids_are_named():
    with pytest.raises(ValueError, match="shorter than"):
        build_case(TOKENIZER, "passkey", 20, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        build_case(TOKENIZER, "passkey", 600, 1.5, 0)
    with pytest.raises(ValueError, match="unknown retrieval task"):
        build_case(TOKENIZER, "ruler", 600, 0.5, 0)


def _engine():
    config = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=TOKENIZER.vocab_size,
                         max_seq_len=1024, sliding_window=32, global_every=16, dilated_window=8, dilation=2,
                         attention_layout="sliding:1,dilated:1,full:1")
    return InferenceEngine(build_model(config, seed=2).eval(), prefill_chunk=64)


def test_the_answer_log_likelihood_is_the_full_forwards():
    engine = _engine()
    case = build_case(TOKENIZER, "needle", 300, 0.5, 0)
    with torch.no_grad():
        logits = engine.model(torch.tensor([case.prompt + case.answer_tokens]))[0][0].log_softmax(-1)
    positions = range(len(case.prompt) - 1, len(case.prompt) + len(case.answer_tokens) - 1)
    want = sum(float(logits[p, token]) for p, token in zip(positions, case.answer_tokens, strict=True))
    assert answer_logprob(engine, case) == pytest.approx(want, rel=1e-5)


def test_scoring_a_grid_and_its_summary():
    engine = _engine()
    cases = list(grid(TOKENIZER, ["passkey"], [200, 300], [0.0, 1.0], samples=2))
    seen = []
    results = score(engine, TOKENIZER, cases, lambda done, total: seen.append((done, total)))
    assert len(results) == 8 and seen[-1] == (8, 8)
    cells = summary(results)
    assert set(cells) == {("passkey", n, d) for n in (200, 300) for d in (0.0, 1.0)}
    for accuracy, logprob in cells.values():
        assert 0.0 <= accuracy <= 1.0 and logprob < 0
    for result in results:  # exact match is the generated digits equalling the answer
        case = next(c for c in cases if (c.length, c.depth, c.sample) == (result.length, result.depth, result.sample))
        assert result.exact == result.generated.strip().startswith(case.answer)


def test_the_heatmap_is_a_valid_png_of_the_grid():
    png = heatmap_png([[0.0, 0.5, 1.0], [None, 1.0, 0.25]])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (3 * 34 + 2, 2 * 34 + 2)
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    raw = zlib.decompress(png[41:41 + length])
    assert len(raw) == height * (1 + 3 * width)
    row = 2 + 16  # inside the first row of cells
    pixel = raw[row * (1 + 3 * width) + 1 + 3 * (2 + 16):][:3]
    assert tuple(pixel) == (220, 40, 40)  # accuracy 0 is red
