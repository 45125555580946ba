"""Tokenizers (SentencePiece trained by tools/train_tokenizer.py, HuggingFace, byte, null) and the trainer tool."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import pathlib
import sys

import pytest

from longctx_megatron.data.tokenizers import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab_matches,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = "def f(x):\n    return x  # héllo — Grüße, 日本語 ✓ 🙂\n\n\tend  "


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer_tool", ROOT / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_tool = _load_tool()


def _documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _write_jsonl(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


MALFORMED = ["this is not json", "[1, 2, 3]", json.dumps({"title": "no text key"}), json.dumps({"text": 7})]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """The CPython docs as two inputs (plain and gzip), with malformed lines mixed in."""
    root = tmp_path_factory.mktemp("corpus")
    records = [json.dumps({"text": doc}) for doc in _documents()]
    half = len(records) // 2
    first = _write_jsonl(root / "part1.jsonl", records[:half] + MALFORMED[:2] + [""])
    second = _write_jsonl(root / "part2.jsonl.gz", MALFORMED[2:] + records[half:])
    return [str(first), str(second)]


@pytest.fixture(scope="module")
def sp_models(corpus, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("models")
    models = {}
    for model_type in ("bpe", "unigram"):
        prefix = out / f"tok_{model_type}"
        argv = ["--input", *corpus, "--json-keys", "text", "--model-prefix", str(prefix),
                "--vocab-size", "400", "--model-type", model_type, "--num-threads", "2"]
        assert train_tool.main(argv) == 0
        models[model_type] = str(prefix) + ".model"
    return models


# ---------------------------------------------------------------- SentencePiece


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trained_model(sp_models, model_type):
    path = sp_models[model_type]
    assert pathlib.Path(path[: -len(".model")] + ".vocab").is_file()
    tok = SentencePieceTokenizer(path)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 400
    assert (tok.bos, tok.eos, tok.eod, tok.pad) == (1, 2, 2, None)
    for text in (SAMPLE, _documents()[0], "", "   two  spaces\n\nand tabs\t\t"):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids and tok.bos not in ids
        assert tok.decode(ids) == text
    # characters never seen in training come back through byte pieces <0x..> (ids 3..258), not <unk>
    emoji_ids = tok.encode("🙂")
    assert 0 not in emoji_ids
    assert len(emoji_ids) >= 4 and all(3 <= i < 259 for i in emoji_ids[-4:])
    assert tok.decode(tok.encode(SAMPLE) + [tok.eod]) == SAMPLE  # eod is a control piece: no text


def test_sentencepiece_checksum(sp_models):
    digests = {}
    for model_type, path in sp_models.items():
        tok = build_tokenizer("SentencePieceTokenizer", path)
        assert isinstance(tok, SentencePieceTokenizer)
        digest = tok.checksum()
        assert digest == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
        assert digest == SentencePieceTokenizer(path).checksum()
        assert len(digest) == 64 and int(digest, 16) >= 0
        digests[model_type] = digest
    assert digests["bpe"] != digests["unigram"]


def _train_raw_sentencepiece(prefix: pathlib.Path, **options) -> str:
    """A model trained directly by SentencePiece, to cover models that tools/train_tokenizer.py never writes."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_documents()[:20]), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, minloglevel=2, num_threads=1, max_sentence_length=100_000, **options,
    )
    return str(prefix) + ".model"


def test_sentencepiece_eod_without_eos(tmp_path):
    # No </s>, no <EOD> piece: eod is an extra id after the model's pieces, as Megatron adds <EOD>.
    tok = SentencePieceTokenizer(_train_raw_sentencepiece(tmp_path / "noeos", eos_id=-1))
    assert tok.eos is None and tok.bos == 1
    assert tok.eod == 400 and tok.vocab_size == 401
    ids = tok.encode("hello world")
    assert tok.eod not in ids
    assert tok.decode(ids + [tok.eod]) == tok.decode([tok.eod] + ids) == "hello world"
    with pytest.raises(ValueError, match="outside the SentencePiece vocabulary"):
        tok.decode([401])
    # No </s> but an <EOD> piece: eod is that piece, inside the model's vocabulary.
    tok = SentencePieceTokenizer(
        _train_raw_sentencepiece(tmp_path / "eodpiece", eos_id=-1, user_defined_symbols=["<EOD>"])
    )
    assert tok.vocab_size == 400 and tok.eos is None
    assert tok.eod == 2 and tok._sp.id_to_piece(tok.eod) == "<EOD>"


def test_sentencepiece_bad_paths(tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"definitely not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="garbage.model.*not a valid SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(garbage))


# ---------------------------------------------------------------- tools/train_tokenizer.py


def test_train_tokenizer_counts_malformed_lines(tmp_path, capsys):
    docs = _documents()[:25]
    lines = [json.dumps({"text": d, "title": str(i)}) for i, d in enumerate(docs)]
    lines[3:3] = MALFORMED + ['{"text": "truncated']
    lines.append(json.dumps({"text": "   "}))  # blank document: skipped, not malformed
    src = _write_jsonl(tmp_path / "docs.jsonl.gz", lines)
    prefix = tmp_path / "out" / "nested" / "tok"
    rc = train_tool.main(["--input", str(src), "--model-prefix", str(prefix), "--vocab-size", "400",
                          "--model-type", "bpe", "--num-threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "5 malformed line(s) skipped" in out and "from 25 document(s)" in out
    assert "skipped 5 malformed line(s) in total" in err
    assert "docs.jsonl.gz:4: not valid JSON" in err and "no string value for key 'text'" in err
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["tok.model", "tok.vocab"]
    assert SentencePieceTokenizer(str(prefix) + ".model").vocab_size == 400


def test_train_tokenizer_two_json_keys_and_no_byte_fallback(tmp_path, capsys):
    docs = _documents()[:10]
    src = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"a": d, "b": d.upper()}) for d in docs])
    prefix = tmp_path / "tok"
    rc = train_tool.main(["--input", str(src), "--json-keys", "a", "b", "--model-prefix", str(prefix),
                          "--vocab-size", "150", "--no-byte-fallback", "--num-threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "from 20 document(s)" in out
    tok = SentencePieceTokenizer(str(prefix) + ".model")
    assert tok.vocab_size == 150 and tok.eod == 2
    assert "<0x41>" not in {tok._sp.id_to_piece(i) for i in range(tok.vocab_size)}


def test_train_tokenizer_without_valid_documents(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "bad.jsonl", MALFORMED + ["", json.dumps({"text": ""})])
    prefix = tmp_path / "out" / "tok"
    rc = train_tool.main(["--input", str(src), "--model-prefix", str(prefix), "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: no valid documents in" in err and "bad.jsonl" in err
    assert "--json-keys text" in err and "(4 malformed line(s) skipped)" in err
    assert not prefix.parent.exists() or not any(prefix.parent.iterdir())


def test_train_tokenizer_failure_leaves_no_files(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "small.jsonl", [json.dumps({"text": "tiny corpus, tiny alphabet"})] * 5)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("unrelated")
    rc = train_tool.main(["--input", str(src), "--model-prefix", str(out_dir / "tok"), "--vocab-size", "5000",
                          "--model-type", "unigram"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "SentencePiece training failed" in err and "Vocabulary size too high" in err
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]  # no model, no .vocab, no temporary directory


def test_train_tokenizer_argument_errors(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "hello"})])
    rc = train_tool.main(["--input", str(tmp_path / "nope.jsonl"), "--model-prefix", str(tmp_path / "t"),
                          "--vocab-size", "1000"])
    assert rc == 1 and "input file" in capsys.readouterr().err
    rc = train_tool.main(["--input", str(src), "--model-prefix", str(tmp_path / "t"), "--vocab-size", "259"])
    err = capsys.readouterr().err
    assert rc == 1 and "--vocab-size 259 leaves no room" in err and "256 byte-fallback" in err
    with pytest.raises(SystemExit):
        train_tool.main(["--input", str(src), "--model-prefix", "t", "--vocab-size", "500", "--model-type", "char"])
    assert not list(tmp_path.glob("t.*"))


def test_split_document_respects_sentence_limit():
    text = "short line\n" + "é" * 25 + "\n" + "x" * 7 + "\n"
    pieces = list(train_tool.split_document(text, 16))
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 16 for p in pieces)


# ---------------------------------------------------------------- byte and null tokenizers


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (ByteTokenizer.vocab_size, ByteTokenizer.eod) == (257, 256)
    assert (tok.bos, tok.eos, tok.pad) == (None, None, None)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids + [tok.eod]) == SAMPLE
    assert tok.checksum() == ByteTokenizer().checksum() == build_tokenizer("ByteTokenizer").checksum()


def test_null_tokenizer():
    tok = NullTokenizer(100)
    # Megatron's _NullTokenizer: --vocab-size V gives ids 0..V-1, eod = V and vocab_size = V + 1
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos, tok.pad) == (101, 100, 100, None, None)
    assert tok.eod == tok.vocab_size - 1
    assert tok.encode(" 1 2  3\n99\t100 ") == [1, 2, 3, 99, 100]
    assert tok.encode("") == []
    assert tok.decode([1, 2, 3, 100]) == "1 2 3 100"
    assert tok.decode(tok.encode("5 6 7")) == "5 6 7"
    with pytest.raises(ValueError, match=r"token id 101 is outside \[0, 101\)"):
        tok.encode("1 101")
    with pytest.raises(ValueError, match="'x' is not an integer"):
        tok.encode("1 x")
    with pytest.raises(ValueError, match="positive integer vocab size"):
        NullTokenizer(0)
    assert tok.checksum() == NullTokenizer(100).checksum() != NullTokenizer(101).checksum()
    assert tok.checksum() != ByteTokenizer().checksum()
    built = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(built, NullTokenizer) and built.vocab_size == 101


# ---------------------------------------------------------------- build_tokenizer / check_vocab_matches


def test_build_tokenizer_errors():
    with pytest.raises(ValueError) as info:
        build_tokenizer("BertWordPieceLowerCase")
    message = str(info.value)
    assert "'BertWordPieceLowerCase'" in message
    for name in ("SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer", "NullTokenizer"):
        assert name in message
    with pytest.raises(ValueError, match="SentencePieceTokenizer needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="")
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer", tokenizer_model="ignored.model")


def test_check_vocab_matches():
    check_vocab_matches(257, ByteTokenizer())
    check_vocab_matches(320, ByteTokenizer())  # a larger, padded embedding is fine
    check_vocab_matches(101, NullTokenizer(100))
    with pytest.raises(ValueError) as info:
        check_vocab_matches(256, ByteTokenizer())
    message = str(info.value)
    assert "vocab_size (256)" in message and "(257 ids" in message
    assert "at least 257" in message and "384" in message
    with pytest.raises(ValueError, match=r"vocab_size \(100\).*\(101 ids"):
        check_vocab_matches(100, NullTokenizer(100))


# ---------------------------------------------------------------- HuggingFace


def _save_hf_tokenizer(directory: pathlib.Path, sentences: list[str], **special) -> str:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rust.train_from_iterator(sentences, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=rust, **special).save_pretrained(str(directory))
    return str(directory)


HF_SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "def f(x): return x"] * 5


def test_huggingface_tokenizer(tmp_path):
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    path = _save_hf_tokenizer(tmp_path / "hf", HF_SENTENCES, **special)
    tok = build_tokenizer("HuggingFaceTokenizer", path)
    assert isinstance(tok, HuggingFaceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.pad, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 2)
    assert tok.vocab_size == len(tok._tok)
    assert 256 + 3 <= tok.vocab_size <= 300
    for text in ("hello world", SAMPLE, " the  lazy\n\ndog "):
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids and tok.bos not in ids  # no special tokens added by encode
        assert tok.decode(ids) == text
    assert len(tok.encode("hello world")) < len("hello world")  # merges were learned
    check_vocab_matches(tok.vocab_size, tok)

    digest = tok.checksum()
    assert len(digest) == 64 and digest == HuggingFaceTokenizer(path).checksum()
    other = _save_hf_tokenizer(tmp_path / "hf2", ["completely different words here"] * 5, **special)
    assert HuggingFaceTokenizer(other).checksum() != digest


def test_huggingface_tokenizer_errors(tmp_path):
    with pytest.raises(OSError, match="no-such-dir.*local_files_only"):
        HuggingFaceTokenizer(str(tmp_path / "no-such-dir"))
    path = _save_hf_tokenizer(tmp_path / "noeos", HF_SENTENCES, bos_token="<s>")
    with pytest.raises(ValueError, match="has no eos_token"):
        HuggingFaceTokenizer(path)
