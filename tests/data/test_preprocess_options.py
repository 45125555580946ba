"""tools/preprocess_data.py's Megatron options: --partitions (with --keep-sequential-samples),
--split-sentences (with --keep-newlines), --vocab-file/--merge-file, the tiktoken options,
--tokenizer-metadata and the required --workers. Layouts are checked byte for byte against
megatron-core's IndexedDatasetBuilder fed as Megatron-LM's tools/preprocess_data.py feeds it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import preprocess_data  # tools/ is on pytest's pythonpath (pyproject.toml)
import pytest

from longctx_megatron.data.indexed_dataset import IndexedDataset
from longctx_megatron.data.sentences import SentenceSplitter
from longctx_megatron.data.tokenizers import ByteTokenizer, build_tokenizer
from tests.data.test_preprocess_data import stdlib_documents, write_jsonl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets import indexed_dataset as megatron_indexed

PROSE = [
    "The quick brown fox. It jumps over the lazy dog! Does it? Yes.\nA new line starts here. And ends.",
    "",
    "One sentence without an end",
    "Dr. Smith arrived at 3 p.m. on Monday. Then he left.\n\nParagraph two. Still two.",
]


def run(tmp_path: Path, name: str, *extra: str, records=None) -> str:
    source = tmp_path / "in.jsonl"
    if not source.exists():
        write_jsonl(source, records if records is not None else [{"text": t} for t in PROSE + stdlib_documents(9)])
    args = preprocess_data.parse_args(["--input", str(source), "--tokenizer-type", "ByteTokenizer", "--append-eod",
                                       "--output-prefix", str(tmp_path / name), *extra])
    preprocess_data.preprocess(args, log=lambda *_: None)
    return str(tmp_path / name)


def read(prefix: str) -> list[bytes]:
    return [Path(prefix + suffix).read_bytes() for suffix in (".bin", ".idx")]


def megatron_dataset(path: str, documents: list[list[str]], tokenizer=None) -> str:
    """Megatron-LM's Encoder.encode + add_document: each piece tokenised, empty ones dropped, EOD after
    the last; a document without tokens has no sequence."""
    tokenizer = tokenizer or ByteTokenizer()
    builder = megatron_indexed.IndexedDatasetBuilder(path + ".bin",
                                                     dtype=megatron_indexed.DType.optimal_dtype(tokenizer.vocab_size))
    for pieces in documents:
        doc_ids, lengths = [], []
        for piece in pieces:
            ids = tokenizer.encode(piece)
            if ids:
                doc_ids.extend(ids)
                lengths.append(len(ids))
        if doc_ids:
            doc_ids.append(tokenizer.eod)
            lengths[-1] += 1
        builder.add_document(doc_ids, lengths)
    builder.finalize(path + ".idx")
    return path


def test_workers_is_required(capsys):
    with pytest.raises(SystemExit):
        preprocess_data.parse_args(["--input", "x.jsonl", "--output-prefix", "out"])
    assert "--workers" in capsys.readouterr().err


def test_partitions_sequential_equal_one_partition_and_round_robin_is_megatrons(tmp_path):
    texts = PROSE + stdlib_documents(9)
    single = run(tmp_path, "one", "--workers", "1")
    sequential = run(tmp_path, "seq", "--workers", "2", "--partitions", "3", "--keep-sequential-samples")
    assert read(sequential + "_text_document") == read(single + "_text_document")
    dealt = run(tmp_path, "rr", "--workers", "1", "--partitions", "3")
    # Megatron deals line n to partition n % 3 and appends the partitions in order
    order = [n for p in range(3) for n in range(len(texts)) if n % 3 == p]
    expected = megatron_dataset(str(tmp_path / "megatron_rr"), [[texts[n]] for n in order])
    assert read(dealt + "_text_document") == read(expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partitions-")]  # temporaries removed


def test_partitions_uneven_blocks(tmp_path):
    # 7 lines in 3 blocks of ceil(7 / 3) = 3: [0, 1, 2] [3, 4, 5] [6]; 2 partitions of 4 lines: [0..3] [4..6]
    records = [{"text": f"document {i}"} for i in range(7)]
    one = run(tmp_path, "one", "--workers", "1", records=records)
    for partitions in ("2", "3", "7", "9"):
        out = run(tmp_path, f"p{partitions}", "--workers", "1", "--partitions", partitions, "--keep-sequential-samples")
        assert read(out + "_text_document") == read(one + "_text_document"), partitions
    dataset = IndexedDataset(run(tmp_path, "rr2", "--workers", "1", "--partitions", "2") + "_text_document")
    texts = [bytes(dataset[i][:-1].tolist()).decode() for i in range(7)]
    assert texts == [f"document {i}" for i in (0, 2, 4, 6, 1, 3, 5)]


def test_split_sentences_layout_is_megatrons(tmp_path):
    texts = PROSE + stdlib_documents(9)
    out = run(tmp_path, "s", "--workers", "2", "--split-sentences")
    assert not Path(out + "_text_document.idx").exists()
    splitter = SentenceSplitter()
    expected = megatron_dataset(str(tmp_path / "megatron_s"), [splitter.split(t) for t in texts])
    assert read(out + "_text_sentence") == read(expected)
    dataset = IndexedDataset(out + "_text_sentence")
    first = [dataset[i].tolist() for i in range(dataset.document_indices[1])]
    assert [bytes(ids) for ids in first[:2]] == [b"The quick brown fox.", b"It jumps over the lazy dog!"]
    assert first[-1] == list(b"And ends.") + [256]  # the EOD closes the document's last sentence
    assert dataset.document_indices[2] == dataset.document_indices[1]  # the empty document: no sequence


def test_keep_newlines(tmp_path):
    plain, kept = SentenceSplitter(), SentenceSplitter(keep_newlines=True)
    text = "First line.\nSecond line?\n\nThird one!  Fourth."
    assert plain.split(text) == ["First line.", "Second line?", "Third one!", "Fourth."]
    assert kept.split(text) == ["First line.\n", "Second line?\n\n", "Third one!  ", "Fourth."]
    assert "".join(kept.split(text)) == text
    assert "Punkt" in kept.describe() and "newlines kept" in kept.describe()
    out = run(tmp_path, "k", "--workers", "1", "--split-sentences", "--keep-newlines")
    expected = megatron_dataset(str(tmp_path / "megatron_k"), [kept.split(t) for t in PROSE + stdlib_documents(9)])
    assert read(out + "_text_sentence") == read(expected)


def test_sentences_are_split_in_slices_of_a_million_characters():
    text = "word " * 300_000 + "end. Next one."  # 1.5 M characters, no sentence end before the last
    sentences = SentenceSplitter().split(text)
    assert sentences == [("word " * 200_000).strip(), "word " * 100_000 + "end.", "Next one."]


def _gpt2_files(folder: Path) -> tuple[str, str]:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(stdlib_documents(10), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    rust.model.save(str(folder))
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def test_gpt2_bpe_through_the_tool(tmp_path):
    vocab, merges = _gpt2_files(tmp_path)
    texts = PROSE + stdlib_documents(12)
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    common = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "GPT2BPETokenizer", "--append-eod",
              "--workers", "2"]
    out = str(tmp_path / "gpt2")
    preprocess_data.preprocess(preprocess_data.parse_args(
        [*common, "--vocab-file", vocab, "--merge-file", merges, "--output-prefix", out]), log=lambda *_: None)
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    expected = megatron_dataset(str(tmp_path / "megatron_gpt2"), [[t] for t in texts], tokenizer)
    assert read(out + "_text_document") == read(expected)
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --vocab-file and --merge-file"):
        preprocess_data.preprocess(preprocess_data.parse_args(
            [*common, "--vocab-file", vocab, "--output-prefix", out + "2"]), log=lambda *_: None)


def test_tiktoken_options_reach_the_tokenizer(tmp_path):
    pytest.importorskip("tiktoken")
    import base64

    entries = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": chr(i)}
               for i in range(256)]
    (tmp_path / "tik.json").write_text(json.dumps(entries))
    write_jsonl(tmp_path / "in.jsonl", [{"text": "héllo"}])
    args = preprocess_data.parse_args([
        "--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "TikTokenizer", "--tokenizer-model",
        str(tmp_path / "tik.json"), "--vocab-size", "266", "--tiktoken-num-special-tokens", "10",
        "--tiktoken-pattern", "v1", "--tiktoken-special-tokens", "<unk>", "<s>", "</s>", "<mask>", "<pad>",
        "<cls>", "<sep>", "<x>", "--append-eod", "--workers", "1", "--output-prefix", str(tmp_path / "t")])
    preprocess_data.preprocess(args, log=lambda *_: None)
    dataset = IndexedDataset(str(tmp_path / "t_text_document"))
    assert dataset[0].tolist() == [b + 10 for b in "héllo".encode()] + [2]


def test_tokenizer_metadata(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    metadata = tmp_path / "meta.json"
    for content, error in [(json.dumps({"library": "byte-level"}), None), (json.dumps({}), None),
                           (json.dumps({"library": "sentencepiece"}), "names library 'sentencepiece'"),
                           ("[1]", "must hold a JSON object"), ("{", "is not JSON")]:
        metadata.write_text(content)
        args = ["--workers", "1", "--tokenizer-metadata", str(metadata)]
        if error is None:
            run(tmp_path, "m", *args)
        else:
            with pytest.raises(ValueError, match=error):
                run(tmp_path, "m", *args)
    with pytest.raises(ValueError, match="missing.json.* does not exist"):
        run(tmp_path, "m", "--workers", "1", "--tokenizer-metadata", str(tmp_path / "missing.json"))
