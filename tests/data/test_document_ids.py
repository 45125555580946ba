"""Document boundaries in packed samples (--reset-attention-mask): the EOD rule, its agreement with
--reset-position-ids, the datasets that carry ``document_ids``, the flag, and the cache key."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longctx_megatron.data.builtin_corpus import BuiltinDataset
from longctx_megatron.data.documents import document_ids, gpt_sample
from longctx_megatron.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.packing import document_positions
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.datasets import build_datasets, micro_batches
from tests.data.test_gpt_dataset import EOD, write_corpus

E = EOD


@pytest.mark.parametrize("tokens,ids,positions", [
    ([5, 6, 7], [0, 0, 0], [0, 1, 2]),  # no EOD: one document
    ([E, 5, 6], [0, 1, 1], [0, 0, 1]),  # EOD first: it ends document 0 (a sample that starts at a document's end)
    ([5, 6, E], [0, 0, 0], [0, 1, 2]),  # EOD last: it belongs to the document it ends
    ([5, E, E, 6], [0, 0, 1, 2], [0, 1, 0, 0]),  # consecutive EODs: document 1 holds only its EOD
    ([E, E, E], [0, 1, 2], [0, 0, 0]),
    ([5, E, 6, 7, E, 8], [0, 0, 1, 1, 1, 2], [0, 1, 0, 1, 2, 0]),
    ([], [], []),
])
def test_document_rule_on_hand_made_tokens(tokens, ids, positions):
    got = document_ids(torch.tensor(tokens, dtype=torch.long), E)
    assert got.dtype == torch.int64 and got.tolist() == ids
    assert document_positions(got).tolist() == positions


def test_rule_works_along_the_last_dim_of_a_batch():
    batch = torch.tensor([[5, E, E, 6], [E, 1, 2, E]])
    assert document_ids(batch, E).tolist() == [[0, 0, 1, 2], [0, 1, 1, 1]]
    assert document_positions(document_ids(batch, E)).tolist() == [[0, 1, 0, 0], [0, 0, 1, 2]]


def _legacy_reset_positions(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """gpt_dataset's --reset-position-ids before document_ids existed (kept to pin the outputs)."""
    positions = torch.arange(len(tokens))
    next_starts = torch.where(tokens == eod, positions + 1, torch.zeros_like(positions))
    starts = torch.cat([next_starts.new_zeros(1), next_starts[:-1]])
    return positions - torch.cummax(starts, dim=0).values


@pytest.mark.parametrize("seed", range(5))
def test_position_reset_restarts_exactly_where_the_document_changes(seed):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 4, (201,), generator=generator)  # EOD (0) about every fourth token, runs included
    sample = gpt_sample(text, E, reset_position_ids=True, reset_attention_mask=True)
    ids, positions, tokens = sample["document_ids"], sample["position_ids"], sample["tokens"]
    increments = torch.cat([torch.ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])
    assert torch.equal(positions == 0, increments)
    assert torch.equal(ids[1:] - ids[:-1], (tokens[:-1] == E).long())  # +1 on the token after each EOD
    first = {int(d): int((ids == d).nonzero()[0]) for d in ids.unique()}
    assert positions.tolist() == [t - first[int(d)] for t, d in enumerate(ids)]
    assert torch.equal(positions, _legacy_reset_positions(tokens, E))


def _check_document_ids(sample: dict, eod: int) -> None:
    ids, tokens = sample["document_ids"], sample["tokens"]
    assert ids.dtype == torch.int64 and ids.shape == tokens.shape and int(ids[0]) == 0
    assert torch.equal(ids[1:] - ids[:-1], (tokens[:-1] == eod).long())


def _assert_same_sample(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_gpt_samples_carry_document_ids_only_with_the_flag(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_corpus(prefix)
    cache = tmp_path / "cache"
    base = dict(seq_length=32, num_samples=40, seed=3, eod=E)
    plain = GPTDataset(prefix, 0, 40, GPTDatasetConfig(**base), cache_dir=str(cache))
    flagged = GPTDataset(prefix, 0, 40, GPTDatasetConfig(**base, reset_attention_mask=True), cache_dir=str(cache))
    both = GPTDataset(prefix, 0, 40, GPTDatasetConfig(**base, reset_attention_mask=True, reset_position_ids=True),
                      cache_dir=str(cache))
    crossings = 0
    for i in range(len(plain)):
        without, with_ids = plain[i], flagged[i]
        assert set(without) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert list(with_ids) == ["tokens", "labels", "loss_mask", "position_ids", "document_ids"]
        _check_document_ids(with_ids, E)
        del with_ids["document_ids"]
        _assert_same_sample(with_ids, without)  # the flag adds a key and changes nothing else
        reset = both[i]
        assert torch.equal(reset["position_ids"], document_positions(reset["document_ids"]))
        crossings += int(reset["document_ids"][-1])
    assert crossings > 20  # documents of 6-61 tokens: most 32-token samples hold a boundary


def test_document_ids_keep_the_cache_key(tmp_path):
    """reset_attention_mask does not change which tokens a sample holds: it must not rebuild (or
    orphan) an existing index cache, so it is not part of the description that keys it."""
    prefix = str(tmp_path / "corpus")
    write_corpus(prefix)
    cache = tmp_path / "cache"
    configs = [GPTDatasetConfig(seq_length=16, num_samples=20, eod=E, reset_attention_mask=on) for on in (False, True)]
    paths = [GPTDataset(prefix, 0, 40, config, cache_dir=str(cache)).cache_paths for config in configs]
    assert paths[0] == paths[1]
    (description,) = cache.glob("*-description.json")
    assert set(json.loads(description.read_text())) == {  # the key's fields as they were before the flag
        "version", "name", "index", "index_bytes", "sequences", "seq_length", "num_samples", "seed", "eod",
        "reset_position_ids", "eod_mask_loss"}


def test_reset_attention_mask_needs_the_eod_id():
    with pytest.raises(ValueError, match="reset_attention_mask and eod_mask_loss need the tokenizer's eod id"):
        GPTDatasetConfig(seq_length=8, num_samples=5, reset_attention_mask=True)
    with pytest.raises(ValueError, match="need the tokenizer's eod id"):
        gpt_sample(torch.arange(5), None, reset_attention_mask=True)


def test_builtin_samples_carry_document_ids_and_honour_the_eod_options():
    eod = ByteTokenizer().eod
    plain = BuiltinDataset(1024, 64, seed=0)
    flagged = BuiltinDataset(1024, 64, seed=0, reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
    boundaries = 0
    for i in range(len(plain)):
        without, sample = plain[i], flagged[i]
        assert "document_ids" not in without and without["position_ids"].tolist() == list(range(1024))
        assert without["loss_mask"].sum() == 1024
        _check_document_ids(sample, eod)
        assert torch.equal(sample["position_ids"], document_positions(sample["document_ids"]))
        is_eod = sample["tokens"] == eod
        assert torch.equal(sample["loss_mask"], (~is_eod).float())
        assert torch.equal(sample["tokens"], without["tokens"]) and torch.equal(sample["labels"], without["labels"])
        boundaries += int(is_eod.sum())
    assert boundaries > 5  # most documents are long: 11 EODs in these 64 windows
    only_ids = BuiltinDataset(1024, 64, seed=0, reset_attention_mask=True)[0]
    assert torch.equal(only_ids.pop("document_ids"), flagged[0]["document_ids"])
    _assert_same_sample(only_ids, plain[0])


def test_flag_parses_and_reaches_both_data_paths(tmp_path):
    assert parse_run_config([], 1).data.reset_attention_mask is False
    flags = ["--reset-attention-mask", "--seq-length", "2048", "--train-iters", "1", "--micro-batch-size", "2"]
    run = parse_run_config(flags, 1)
    assert run.data.reset_attention_mask is True and run.data.reset_position_ids is False
    train, valid = build_datasets(run, ByteTokenizer())
    assert isinstance(train, BuiltinDataset) and "document_ids" in train[0] and "document_ids" in valid[0]
    ranks = SimpleNamespace(dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    (batch,) = micro_batches(train, 0, run, ranks, torch.device("cpu"))
    assert batch["document_ids"].shape == batch["tokens"].shape == (2, 2048)
    assert batch["document_ids"].dtype == torch.int64

    prefix = str(tmp_path / "corpus")
    write_corpus(prefix)
    data = ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "50000", "--split", "90,10,0",
            "--data-cache-path", str(tmp_path / "cache"), "--seq-length", "32", "--train-iters", "2"]
    for extra, expected in (([], False), (["--reset-attention-mask"], True)):
        run = parse_run_config(data + extra, 1)
        train, valid = build_datasets(run, SimpleNamespace(eod=E))
        for dataset in (train, valid):
            assert ("document_ids" in dataset[0]) is expected
            if expected:
                _check_document_ids(dataset[0], E)
    assert len(list((tmp_path / "cache").glob("*-description.json"))) == 2  # train and valid, shared by both runs
    np.testing.assert_array_equal(train[0]["tokens"].numpy(), train.tokens(0)[:-1])
