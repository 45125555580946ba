"""Megatron's GPT2BPETokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer and TikTokenizer.

Oracles: an independent GPT-2 BPE (tests/data/gpt2_oracle.py, OpenAI's algorithm) and tiktoken for
GPT2BPETokenizer; megatron-core 0.16.1's own SentencePiece and TikToken classes for the others.
Every vocabulary is trained here from the CPython docs (nothing is downloaded).
"""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import pytest

from longctx_megatron.data.gpt2_bpe_tokenizer import GPT2BPETokenizer
from longctx_megatron.data.megatron_sentencepiece import GPTSentencePieceTokenizer, Llama2Tokenizer
from longctx_megatron.data.tokenizers import TOKENIZER_TYPES, Tokenizer, build_tokenizer
from tests.data.gpt2_oracle import GPT2_PATTERN, OracleGPT2, byte_symbols

TEXTS = [
    "Hello world", "  two  spaces\n\n\tand a tab ", "don't I'll we've they're it's you'd I'm",
    "héllo — Grüße, 日本語 ✓ 🙂 مرحبا", "<|endoftext|> written in a document", "x" * 300, "123 4567 3.14 1e-9",
    "\n\n\n", " ", "", "tail newline\n", "CamelCaseWords and ALLCAPS, snake_case; x+=1  # comment",
]


def _documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> tuple[str, str]:
    """vocab.json and merges.txt of a 700-token byte-level BPE trained by Hugging Face tokenizers."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(_documents()[:40], trainer=trainer)
    folder = tmp_path_factory.mktemp("gpt2")
    rust.model.save(str(folder))
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _texts() -> list[str]:
    return TEXTS + _documents()[40:70]


def test_gpt2_bpe_ids_equal_the_reference_bpe(gpt2_files):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert isinstance(tok, GPT2BPETokenizer) and isinstance(tok, Tokenizer)
    encoder = json.loads(Path(vocab).read_text(encoding="utf-8"))
    assert tok.vocab_size == len(encoder) == 700  # Megatron's len(encoder)
    assert tok.eod == tok.eos == encoder["<|endoftext|>"] and (tok.bos, tok.pad) == (None, None)
    oracle = OracleGPT2(vocab, merges)
    total = 0
    for text in _texts():
        ids = tok.encode(text)
        assert ids == oracle.encode(text), text[:60]
        assert tok.decode(ids) == text
        total += len(ids)
    assert total > 20_000
    # Megatron registers no special tokens: the literal text is ordinary text, never the eod id
    assert tok.eod not in tok.encode("<|endoftext|>") and len(tok.encode("<|endoftext|>")) > 1
    assert tok.decode([tok.eod]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="outside the GPT-2 vocabulary"):
        tok.decode([700])


def test_gpt2_bpe_ids_equal_tiktoken(gpt2_files):
    """A second, unrelated implementation: tiktoken ranks bytes, the 256 single bytes then each merge."""
    tiktoken = pytest.importorskip("tiktoken")
    vocab, merges = gpt2_files
    tok = GPT2BPETokenizer(vocab, merges)
    to_byte = {symbol: b for b, symbol in byte_symbols().items()}

    def as_bytes(symbols: str) -> bytes:
        return bytes(to_byte[c] for c in symbols)

    ranks = {bytes([b]): b for b in range(256)}
    for line in Path(merges).read_text(encoding="utf-8").split("\n")[1:-1]:
        left, right = line.split()
        ranks.setdefault(as_bytes(left + right), len(ranks))
    encoding = tiktoken.Encoding("gpt2-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    encoder = json.loads(Path(vocab).read_text(encoding="utf-8"))
    to_id = {as_bytes(symbol): i for symbol, i in encoder.items() if symbol != "<|endoftext|>"}
    for text in _texts():
        expected = [to_id[encoding.decode_single_token_bytes(t)] for t in encoding.encode_ordinary(text)]
        assert tok.encode(text) == expected, text[:60]


def test_gpt2_bpe_checksum(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    digest = GPT2BPETokenizer(vocab, merges).checksum()
    assert digest == GPT2BPETokenizer(vocab, merges).checksum() and len(digest) == 64
    shorter = tmp_path / "merges.txt"
    shorter.write_text("\n".join(Path(merges).read_text(encoding="utf-8").split("\n")[:-2]) + "\n", encoding="utf-8")
    assert GPT2BPETokenizer(vocab, shorter).checksum() != digest


def test_gpt2_bpe_refuses_missing_and_malformed_files(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    for kwargs in ({}, {"vocab_file": vocab}, {"merge_file": merges}):
        with pytest.raises(ValueError, match="GPT2BPETokenizer needs --vocab-file and --merge-file"):
            build_tokenizer("GPT2BPETokenizer", **kwargs)
    with pytest.raises(FileNotFoundError, match="--vocab-file .*nope.json.* does not exist"):
        GPT2BPETokenizer(tmp_path / "nope.json", merges)
    with pytest.raises(FileNotFoundError, match="--merge-file .*nope.txt.* does not exist"):
        GPT2BPETokenizer(vocab, tmp_path / "nope.txt")
    encoder = json.loads(Path(vocab).read_text(encoding="utf-8"))
    bad = tmp_path / "bad.json"
    cases = [
        (b"\xff\xfe not json", "not a JSON vocabulary"),
        (b"[1, 2]", "non-empty JSON object"),
        (json.dumps({**encoder, "extra": 5}).encode(), r"exactly 0\.\.700"),
        (json.dumps({k: (str(v) if v == 3 else v) for k, v in encoder.items()}).encode(), "must be an integer"),
        (json.dumps({k: v for k, v in encoder.items() if k != "<|endoftext|>"} | {"z9z": encoder["<|endoftext|>"]}
                    ).encode(), "has no '<|endoftext|>'"),
        (json.dumps({"Ā" if k == "!" else k: v for k, v in encoder.items() if k != "Ā"} | {"q#q": encoder["Ā"]}
                    ).encode(), "lacks 1 of GPT-2's 256 byte symbols"),
    ]
    for content, message in cases:
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            GPT2BPETokenizer(bad, merges)
    lines = Path(merges).read_text(encoding="utf-8").split("\n")
    bad_merges = tmp_path / "bad.txt"
    for content, message in [
        ([lines[0], "a b c", ""], "line 2: expected two symbols"),
        ([lines[0], "zz\u2603 q", ""], "line 2: 'zz\u2603' is not in the vocabulary"),
        ([lines[0], lines[1], lines[1], ""], "line 3: the merge .* is repeated"),
    ]:
        bad_merges.write_text("\n".join(content), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            GPT2BPETokenizer(vocab, bad_merges)
    bad_merges.write_bytes(b"#version\n\xff\xff\n")
    with pytest.raises(ValueError, match="bad.txt.* is not UTF-8"):
        GPT2BPETokenizer(vocab, bad_merges)


# ---------------------------------------------------------------- SentencePiece, against megatron-core


def _train_sentencepiece(prefix: Path, **options) -> str:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_documents()[:30]), model_prefix=str(prefix), vocab_size=500, model_type="bpe",
        byte_fallback=True, minloglevel=2, num_threads=1, max_sentence_length=100_000, **options)
    return str(prefix) + ".model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    return _train_sentencepiece(tmp_path_factory.mktemp("sp") / "tok", pad_id=3, unk_id=0, bos_id=1, eos_id=2)


@pytest.mark.parametrize("name", ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_megatron_sentencepiece_tokenizers_equal_megatron_core(sp_model, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import (
            SentencePieceTokenizer as CoreSentencePiece,
        )
    core = CoreSentencePiece(sp_model)  # what --tokenizer-type GPTSentencePieceTokenizer/Llama2Tokenizer builds
    tok = build_tokenizer(name, sp_model)
    assert type(tok).__name__ == name and isinstance(tok, GPTSentencePieceTokenizer)
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos, tok.pad) == (
        core.vocab_size, core.eod, core.eos_id, core.bos_id, core.pad_id) == (500, 2, 2, 1, 3)
    for text in _texts():
        ids = tok.encode(text)
        assert ids == core.text_to_ids(text), text[:60]
        assert tok.bos not in ids and tok.eod not in ids  # no BOS, as megatron-core 0.16.1 (legacy Llama2 added one)
        assert tok.decode(ids) == core.ids_to_text(ids)


def test_megatron_sentencepiece_without_eos_is_refused(tmp_path):
    model = _train_sentencepiece(tmp_path / "noeos", eos_id=-1)
    for name in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        with pytest.raises(ValueError, match=f"{name}: SentencePiece model .*noeos.model.* has no EOS"):
            build_tokenizer(name, model)
        with pytest.raises(ValueError, match=f"--tokenizer-type {name} needs --tokenizer-model"):
            build_tokenizer(name)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Llama2Tokenizer(tmp_path / "missing.model")


# ---------------------------------------------------------------- TikTokenizer, against megatron-core


def _write_tiktoken_vocab(path: Path, gpt2_files) -> int:
    """A tiktoken JSON vocabulary (Megatron's format) from the BPE trained above: 256 bytes, then merges."""
    vocab, merges = gpt2_files
    to_byte = {symbol: b for b, symbol in byte_symbols().items()}
    tokens = [bytes([b]) for b in range(256)]
    for line in Path(merges).read_text(encoding="utf-8").split("\n")[1:-1]:
        token = bytes(to_byte[c] for c in "".join(line.split()))
        if token not in tokens:
            tokens.append(token)
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
               for i, t in enumerate(tokens)]
    path.write_text(json.dumps(entries), encoding="utf-8")
    return len(entries)


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_equals_megatron_core(gpt2_files, tmp_path, pattern):
    pytest.importorskip("tiktoken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer
    path = tmp_path / "tiktoken.json"
    count = _write_tiktoken_vocab(path, gpt2_files)
    size = 16 + count - 20  # 16 special ids, the file cut 20 tokens short, as --vocab-size does
    core = TikTokenTokenizer(str(path), num_special_tokens=16, pattern=pattern, vocab_size=size)
    tok = build_tokenizer("TikTokenizer", str(path), size, tiktoken_pattern=pattern, tiktoken_num_special_tokens=16)
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos, tok.pad) == (
        core.vocab_size, core.eod, core.eos_id, core.bos_id, core.pad_id) == (size, 2, 2, 1, 4)
    for text in _texts() + ["special </s> and <s> in text"]:
        ids = tok.encode(text)
        assert ids == core.text_to_ids(text), text[:60]
        assert all(0 <= i < size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("a</s>b")[1] == tok.eod  # as megatron-core: allowed_special="all"


def test_tiktokenizer_errors(gpt2_files, tmp_path):
    pytest.importorskip("tiktoken")
    path = tmp_path / "tiktoken.json"
    count = _write_tiktoken_vocab(path, gpt2_files)
    with pytest.raises(ValueError, match="TikTokenizer needs --tokenizer-model"):
        build_tokenizer("TikTokenizer", vocab_size=400)
    with pytest.raises(ValueError, match="--tiktoken-pattern must be v1 or v2"):
        build_tokenizer("TikTokenizer", str(path), 400, tiktoken_pattern="v3", tiktoken_num_special_tokens=16)
    with pytest.raises(ValueError, match=f"holds {count} tokens"):
        build_tokenizer("TikTokenizer", str(path), 16 + count + 1, tiktoken_num_special_tokens=16)
    with pytest.raises(ValueError, match="must include"):
        build_tokenizer("TikTokenizer", str(path), 400, tiktoken_num_special_tokens=16,
                        tiktoken_special_tokens=["<s>", "</s>"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_tokenizer("TikTokenizer", str(tmp_path / "missing.json"), 400, tiktoken_num_special_tokens=16)
    entries = json.loads(path.read_text(encoding="utf-8"))
    for broken, message in [
        ({"rank": 5, "token_bytes": "AA==", "token_str": ""}, "entry 3: expected"),
        ({"rank": 3, "token_bytes": "!!", "token_str": ""}, "entry 3: token_bytes is not base64"),
        ({"rank": 3, "token_bytes": "BA==", "token_str": ""}, "entry 3: the first 256 entries"),
    ]:
        path.write_text(json.dumps(entries[:3] + [broken] + entries[4:]), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            build_tokenizer("TikTokenizer", str(path), 400, tiktoken_num_special_tokens=16)
    path.write_text(json.dumps(entries[:300] + [dict(entries[260], rank=300)] + entries[301:]), encoding="utf-8")
    with pytest.raises(ValueError, match="entry 300: the bytes .* appear twice"):
        build_tokenizer("TikTokenizer", str(path), 400, tiktoken_num_special_tokens=16)


def test_tiktokenizer_without_tiktoken_names_the_package(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_tiktoken(name, *args, **kwargs):
        if name == "tiktoken":
            raise ImportError("No module named 'tiktoken'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tiktoken)
    with pytest.raises(ImportError, match="pip install tiktoken"):
        build_tokenizer("TikTokenizer", str(tmp_path / "v.json"))


def test_every_type_is_listed():
    for name in ("GPT2BPETokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                 "SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer", "NullTokenizer"):
        assert name in TOKENIZER_TYPES
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'BertWordPieceCase'.*TikTokenizer"):
        build_tokenizer("BertWordPieceCase")
