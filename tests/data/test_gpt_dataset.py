"""GPT samples across document boundaries, caching, splits, blending and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longctx_megatron.data import gpt_dataset
from longctx_megatron.data.blended import BlendedDataset, blend_counts, blend_indices, parse_data_path
from longctx_megatron.data.builders import build_gpt_datasets
from longctx_megatron.data.gpt_dataset import GPTDataset, GPTDatasetConfig, split_ranges
from longctx_megatron.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
from longctx_megatron.data.sampler import PretrainingSampler
from tests.distributed import run_on_ranks

EOD = 0


def write_corpus(prefix: str, n_docs: int = 40, seed: int = 0, base: int = 1) -> list[np.ndarray]:
    """Documents of 5-60 distinct tokens (doc d holds base + 1000*d + position), each ending in EOD."""
    rng = np.random.RandomState(seed)
    documents = []
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype=np.int32)
    for d in range(n_docs):
        body = base + 1000 * d + np.arange(rng.randint(5, 60), dtype=np.int32)
        document = np.append(body, EOD).astype(np.int32)
        builder.add_item(document)
        builder.end_document()
        documents.append(document)
    builder.finalize(index_file_path(prefix))
    return documents


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus")
    return prefix, write_corpus(prefix)


def _in_sample_order(dataset: GPTDataset) -> list[np.ndarray]:
    order = np.argsort(np.asarray(dataset.shuffle_idx))  # serving index of each unshuffled sample
    return [dataset.tokens(int(i)) for i in order]


def test_every_token_of_the_split_appears_in_order(corpus, tmp_path):
    prefix, documents = corpus
    total = sum(len(d) for d in documents)
    seq_length = 16
    config = GPTDatasetConfig(seq_length=seq_length, num_samples=(total - 1) // seq_length, seed=3)
    dataset = GPTDataset(prefix, 0, len(documents), config, cache_dir=str(tmp_path / "cache"))
    samples = _in_sample_order(dataset)
    assert all(len(s) == seq_length + 1 for s in samples)
    for previous, current in zip(samples[:-1], samples[1:], strict=True):
        assert previous[-1] == current[0]  # consecutive samples share one token (last label / first input)
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
    epoch = np.asarray(dataset.doc_idx[: len(documents)])
    assert sorted(epoch.tolist()) == list(range(len(documents)))  # one epoch is a permutation
    expected = np.concatenate([documents[d] for d in epoch])[: len(stream)]
    np.testing.assert_array_equal(stream, expected)
    assert len(stream) >= total - seq_length


def test_samples_span_several_epochs_and_shuffle(corpus, tmp_path):
    prefix, documents = corpus
    config = GPTDatasetConfig(seq_length=32, num_samples=200, seed=5)
    dataset = GPTDataset(prefix, 0, len(documents), config, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 200 and len(dataset.doc_idx) % len(documents) == 0
    assert len(dataset.doc_idx) // len(documents) > 1
    first = dataset[0]
    assert set(first) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(first["tokens"][1:], first["labels"][:-1])
    assert not np.array_equal(np.asarray(dataset.shuffle_idx), np.arange(200))


def test_index_cache_is_reused_and_keyed(corpus, tmp_path, monkeypatch):
    prefix, documents = corpus
    cache = str(tmp_path / "cache")
    config = GPTDatasetConfig(seq_length=16, num_samples=50, seed=1)
    first = GPTDataset(prefix, 0, 30, config, cache_dir=cache)
    monkeypatch.setattr(gpt_dataset, "_build_indices", lambda *a: pytest.fail("rebuilt a cached index"))
    again = GPTDataset(prefix, 0, 30, config, cache_dir=cache)
    assert again.cache_paths == first.cache_paths
    np.testing.assert_array_equal(again.tokens(7), first.tokens(7))
    monkeypatch.undo()
    other_seed = GPTDataset(prefix, 0, 30, GPTDatasetConfig(seq_length=16, num_samples=50, seed=2), cache_dir=cache)
    other_range = GPTDataset(prefix, 0, 31, config, cache_dir=cache)
    assert len({str(d.cache_paths["doc_idx"]) for d in (first, other_seed, other_range)}) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))  # nothing half-written


def test_default_cache_sits_next_to_the_data(corpus):
    prefix, _ = corpus
    dataset = GPTDataset(prefix, 0, 10, GPTDatasetConfig(seq_length=8, num_samples=5))
    assert dataset.cache_paths["doc_idx"].parent.name == "corpus_cache"


def test_position_reset_and_eod_loss_mask(tmp_path):
    prefix = str(tmp_path / "small")
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype=np.int32)
    for document in ([5, 6, 7, EOD], [8, 9, EOD], [10, 11, 12, 13, EOD]):
        builder.add_item(np.array(document, dtype=np.int32))
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    config = GPTDatasetConfig(seq_length=11, num_samples=1, eod=EOD, reset_position_ids=True, eod_mask_loss=True)
    dataset = GPTDataset(prefix, 0, 3, config, cache_dir=str(tmp_path / "cache"))
    sample = dataset[0]
    eods = (sample["tokens"] == EOD).nonzero().flatten().tolist()
    assert len(eods) == 2
    positions = sample["position_ids"].tolist()
    assert positions[0] == 0
    for e in eods:  # the EOD closes its document; the next token starts again at 0
        assert positions[e] == positions[e - 1] + 1 and positions[e + 1] == 0
    assert sample["loss_mask"][eods].sum() == 0 and sample["loss_mask"].sum() == 11 - 2
    plain = GPTDataset(prefix, 0, 3, GPTDatasetConfig(seq_length=11, num_samples=1), cache_dir=str(tmp_path / "c2"))
    assert plain[0]["position_ids"].tolist() == list(range(11)) and plain[0]["loss_mask"].sum() == 11


def test_split_ranges():
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges(7, "50,50") == [(0, 4), (4, 7), (7, 7)]  # round(3.5) = 4, as megatron-core
    for bad, message in (("a,b", "comma-separated numbers"), ("0,0", "positive sum"), ("1,1,1,1", "three")):
        with pytest.raises(ValueError, match=message):
            split_ranges(10, bad)


def test_bad_dataset_arguments(corpus, tmp_path):
    prefix, _ = corpus
    with pytest.raises(ValueError, match=r"sequence range \[30, 30\) is empty"):
        GPTDataset(prefix, 30, 30, GPTDatasetConfig(seq_length=8, num_samples=5), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="need the tokenizer's eod id"):
        GPTDatasetConfig(seq_length=8, num_samples=5, eod_mask_loss=True)


def test_blend_has_exact_proportions_and_even_interleaving():
    weights = [0.3, 0.5, 0.2]
    counts = blend_counts(weights, 1001)
    assert counts.sum() == 1001 and np.abs(counts - np.array(weights) * 1001).max() < 1
    dataset_index, sample_index = blend_indices(weights, 1001)
    for k, count in enumerate(counts):
        assert (dataset_index == k).sum() == count
        np.testing.assert_array_equal(sample_index[dataset_index == k], np.arange(count))
    for prefix_length in (10, 100, 500):  # every prefix of the blend is close to the weights too
        seen = np.bincount(dataset_index[:prefix_length], minlength=3)
        assert np.abs(seen - np.array(weights) * prefix_length).max() <= 1.5


def test_parse_data_path():
    assert parse_data_path(["only"]) == [(1.0, "only")]
    assert parse_data_path(["3", "a", "1", "b"]) == [(0.75, "a"), (0.25, "b")]
    with pytest.raises(ValueError, match="give weight prefix pairs"):
        parse_data_path(["0.3", "a", "b"])
    with pytest.raises(ValueError, match="'x' \\(before 'a'\\) is not a weight"):
        parse_data_path(["x", "a", "1", "b"])


def test_build_blended_train_valid_test(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_corpus(a, n_docs=50, seed=1, base=1)
    write_corpus(b, n_docs=30, seed=2, base=100_000)
    config = GPTDatasetConfig(seq_length=16, num_samples=1)
    train, valid, test = build_gpt_datasets(["0.3", a, "0.7", b], "90,10,0", (100, 10, 0), config,
                                            cache_dir=str(tmp_path / "cache"))
    assert test is None and isinstance(train, BlendedDataset) and len(train) == 100 and len(valid) == 10
    from_b = sum(int(train[i]["tokens"][0]) >= 100_000 or int(train[i]["tokens"][-1]) >= 100_000
                 for i in range(100))
    assert np.bincount(train.dataset_index).tolist() == [30, 70]
    assert 60 <= from_b <= 80
    with pytest.raises(ValueError, match="leaves no sequences for the test split"):
        build_gpt_datasets([a], "100,0,0", (10, 0, 5), config, cache_dir=str(tmp_path / "cache"))


def test_sampler_resumes_exactly_and_shards_by_rank():
    full = [batch for batch in PretrainingSampler(100, 0, micro_batch_size=3)]
    resumed = [batch for batch in PretrainingSampler(100, 30, micro_batch_size=3)]
    assert resumed == full[10:]
    ranks = [list(PretrainingSampler(100, 12, 2, data_parallel_rank=r, data_parallel_size=3)) for r in range(3)]
    assert all(len(r) == len(ranks[0]) == (100 - 12) // 6 for r in ranks)
    step = [index for r in ranks for index in r[0]]
    assert step == list(range(12, 18))  # one global batch: consecutive samples, rank-major
    everything = sorted(index for r in ranks for batch in r for index in batch)
    assert everything == list(range(12, 12 + 6 * len(ranks[0])))
    with pytest.raises(ValueError, match="consumed_samples=100 is not below total_samples=100"):
        PretrainingSampler(100, 100, 2)


def _shared_build_body(rank, world_size, prefix, cache):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dataset = GPTDataset(prefix, 0, 40, GPTDatasetConfig(seq_length=16, num_samples=64, seed=9), cache_dir=cache)
    return [dataset.tokens(i).tolist() for i in range(5)]


@pytest.mark.slow
def test_index_built_once_and_shared_by_ranks(corpus, tmp_path):
    prefix, _ = corpus
    cache = str(tmp_path / "shared")
    first, second = run_on_ranks(_shared_build_body, 2, prefix, cache)
    assert first == second
    assert len(list((tmp_path / "shared").glob("*.npy"))) == 3
