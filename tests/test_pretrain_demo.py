"""The built-in corpus behind the demo job: real text, available offline."""

from __future__ import annotations

import json

import torch

import pretrain_longctx
from longctx_megatron.data.builtin_corpus import BuiltinDataset, builtin_documents, builtin_token_stream, write_jsonl
from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.training.run_config import demo_config


def test_builtin_corpus_is_real_text():
    documents = builtin_documents()
    assert len(documents) > 50 and sum(map(len, documents)) > 300_000
    stream = builtin_token_stream(ByteTokenizer())
    assert int((stream == ByteTokenizer.eod).sum()) == len(documents)
    dataset = BuiltinDataset(seq_length=64, num_samples=3, seed=0)
    sample = dataset[2]
    assert sample["tokens"].shape == sample["labels"].shape == (64,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(BuiltinDataset(64, 3, seed=0)[2]["tokens"], sample["tokens"])  # reproducible


def test_builtin_corpus_as_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    assert write_jsonl(str(path)) == len(builtin_documents())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in records] == builtin_documents()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]


def test_demo_model_has_every_pattern():
    assert {spec.kind for spec in demo_config().layer_plan()} == {"sliding", "dilated", "full"}


def test_cli_reports_a_bad_layout(capsys):
    assert pretrain_longctx.main(["--attention-layout", "sliding:2,full:1", "--train-iters", "1"]) == 2
    assert "the layer plan has 3 layers but n_layers=4" in capsys.readouterr().err
