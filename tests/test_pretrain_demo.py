"""The built-in demo job: real text, a tiny model with every pattern, loss falls."""

from __future__ import annotations

import json

import pretrain_longctx
from longctx_megatron.data.builtin_corpus import builtin_documents, builtin_token_stream, random_batches, write_jsonl
from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.training.simple_trainer import RunSettings, demo_config, train


def test_builtin_corpus_is_real_text():
    documents = builtin_documents()
    assert len(documents) > 50 and sum(map(len, documents)) > 300_000
    stream = builtin_token_stream(ByteTokenizer())
    assert int((stream == ByteTokenizer.eod).sum()) == len(documents)
    tokens, labels = next(random_batches(stream, 3, 64, seed=0))
    assert tokens.shape == labels.shape == (3, 64)
    assert torch_equal_shifted(tokens, labels)


def test_builtin_corpus_as_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    assert write_jsonl(str(path)) == len(builtin_documents())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in records] == builtin_documents()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]


def torch_equal_shifted(tokens, labels) -> bool:
    return bool((tokens[:, 1:] == labels[:, :-1]).all())


def test_tiny_model_learns_real_text():
    config = demo_config()
    assert {spec.kind for spec in config.layer_plan()} == {"sliding", "dilated", "full"}
    lines = []
    losses = train(config, RunSettings(train_iters=20, seq_length=256, micro_batch_size=4, log_interval=10),
                   log=lines.append)
    assert losses[0] > 5.0  # ~ln(320) at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert any("tokens/s" in line for line in lines)


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "model.yaml"
    bad.write_text("d_model: 100\nn_heads: 3\n")
    assert pretrain_longctx.main(["--config", str(bad), "--train-iters", "1"]) == 2
    assert "d_model=100 must be divisible by n_heads=3" in capsys.readouterr().err
    assert pretrain_longctx.main(["--attention-layout", "sliding:2,full:1", "--train-iters", "1"]) == 2
    assert "the layer plan has 3 layers but n_layers=4" in capsys.readouterr().err
