"""Train a SentencePiece tokenizer (BPE or unigram) on JSONL documents.

    python tools/train_tokenizer.py --input a.jsonl b.jsonl.gz --json-keys text \\
        --model-prefix out/tok --vocab-size 32000 --model-type bpe

Writes ``{prefix}.model`` and ``{prefix}.vocab`` for ``--tokenizer-type SentencePieceTokenizer
--tokenizer-model {prefix}.model``. Documents are streamed to SentencePiece (never held in memory at
once); lines that are not a JSON object with string values under every ``--json-keys`` key are skipped and
counted. The model has byte fallback (on by default: any text round-trips, unseen characters become UTF-8
byte pieces), ``<unk>``=0, ``<s>``=1 and ``</s>``=2 (the end-of-document id), lossless whitespace
(``identity`` normalisation, extra whitespace kept) so code and indentation survive encode/decode.
Pieces may span line ends (a period and a newline, a newline and an indent): the ``.vocab`` listing, one
piece a line, is then only for reading; the ``.model`` file is what the trainer loads. Training happens in
a temporary directory next to the output: a failure leaves no half-written model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

META_PIECES = 3  # <unk>, <s>, </s>
MAX_WARNINGS = 5


class TrainTokenizerError(Exception):
    """A problem with the inputs or the training, reported as one line and exit status 1."""


@dataclass
class ReadStats:
    documents: int = 0
    sentences: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)

    def bad_line(self, where: str, why: str) -> None:
        self.malformed += 1
        if len(self.examples) < MAX_WARNINGS:
            self.examples.append(f"{where}: {why}")


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_documents(paths: list[str], keys: list[str], stats: ReadStats) -> Iterator[str]:
    """The non-empty texts under ``keys`` of every valid line; malformed lines are counted in ``stats``."""
    for path in paths:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(raw)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    stats.bad_line(where, f"not valid JSON ({e})")
                    continue
                if not isinstance(record, dict):
                    stats.bad_line(where, f"a JSON {type(record).__name__}, not an object")
                    continue
                missing = [k for k in keys if not isinstance(record.get(k), str)]
                if missing:
                    stats.bad_line(where, f"no string value for key {missing[0]!r}")
                    continue
                for key in keys:
                    if record[key].strip():
                        stats.documents += 1
                        yield record[key]


def split_document(text: str, max_bytes: int) -> Iterator[str]:
    """Pieces of at most ``max_bytes`` UTF-8 bytes, cut at line ends where possible (SentencePiece skips
    longer sentences). Newlines are kept, so the model learns them."""
    chunk: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if chunk and size + n > max_bytes:
            yield "".join(chunk)
            chunk, size = [], 0
        if n > max_bytes:  # one very long line: cut it by characters
            piece, piece_size = [], 0
            for ch in line:
                m = len(ch.encode("utf-8"))
                if piece_size + m > max_bytes:
                    yield "".join(piece)
                    piece, piece_size = [], 0
                piece.append(ch)
                piece_size += m
            chunk, size = piece, piece_size
            continue
        chunk.append(line)
        size += n
    if chunk:
        yield "".join(chunk)


class _Sentences:
    """The iterator handed to SentencePiece. An exception while reading ends the stream and is kept,
    to be raised after training returns (SentencePiece would otherwise wrap it in a RuntimeError)."""

    def __init__(self, args: argparse.Namespace, stats: ReadStats):
        self.error: BaseException | None = None
        self._it = self._generate(args, stats)

    @staticmethod
    def _generate(args, stats):
        for doc in iter_documents(args.input, args.json_keys, stats):
            for sentence in split_document(doc, args.max_sentence_length):
                stats.sentences += 1
                yield sentence

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise StopIteration from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz allowed), one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose string values are documents")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="unknown characters as UTF-8 byte pieces (needs 256 pieces of the vocabulary)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many sentences (0: all)")
    p.add_argument("--max-sentence-length", type=int, default=4192,
                   help="documents are cut into pieces of at most this many bytes")
    p.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=False,
                   help="every digit its own piece")
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="pieces kept whole (e.g. <EOD>)")
    p.add_argument("--num-threads", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--verbose", action="store_true", help="SentencePiece's own progress log")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for path in args.input:
        if not os.path.isfile(path):
            raise TrainTokenizerError(f"input file {path!r} does not exist")
    if not 0 < args.character_coverage <= 1:
        raise TrainTokenizerError(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
    if args.input_sentence_size < 0 or args.max_sentence_length < 1 or args.num_threads < 1:
        raise TrainTokenizerError("--input-sentence-size must be >= 0, --max-sentence-length and --num-threads >= 1")
    reserved = META_PIECES + len(args.user_defined_symbols) + (256 if args.byte_fallback else 0)
    if args.vocab_size <= reserved:
        raise TrainTokenizerError(
            f"--vocab-size {args.vocab_size} leaves no room for learned pieces: {reserved} are reserved "
            f"({META_PIECES} special, {len(args.user_defined_symbols)} user-defined"
            + (", 256 byte-fallback" if args.byte_fallback else "") + ")"
        )
    if os.path.basename(args.model_prefix) in ("", ".", ".."):
        raise TrainTokenizerError(f"--model-prefix {args.model_prefix!r} names no file")


def _report_malformed(stats: ReadStats) -> None:
    if stats.malformed:
        for example in stats.examples:
            print(f"warning: skipped {example}", file=sys.stderr)
        print(f"warning: skipped {stats.malformed} malformed line(s) in total", file=sys.stderr)


def train(args: argparse.Namespace) -> ReadStats:
    import sentencepiece

    _check_args(args)
    probe = ReadStats()
    if next(iter_documents(args.input, args.json_keys, probe), None) is None:
        _report_malformed(probe)
        raise TrainTokenizerError(
            f"no valid documents in {', '.join(args.input)}: need JSON lines with non-empty string values under "
            f"--json-keys {' '.join(args.json_keys)} ({probe.malformed} malformed line(s) skipped)"
        )

    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    name = os.path.basename(args.model_prefix)
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.train-", dir=out_dir)  # same filesystem: os.replace is atomic
    stats = ReadStats()
    try:
        sentences = _Sentences(args, stats)
        tmp_prefix = os.path.join(tmp_dir, name)
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=sentences,
                model_prefix=tmp_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                byte_fallback=args.byte_fallback,
                character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=args.max_sentence_length,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=args.split_digits,
                user_defined_symbols=args.user_defined_symbols,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=args.num_threads,
                minloglevel=0 if args.verbose else 2,  # 1 would warn about every piece holding a newline
            )
        except RuntimeError as e:
            if sentences.error is None:
                raise TrainTokenizerError(f"SentencePiece training failed: {str(e).strip()}") from e
        if sentences.error is not None:
            raise TrainTokenizerError(f"reading the input failed: {sentences.error}") from sentences.error
        processor = sentencepiece.SentencePieceProcessor(model_file=tmp_prefix + ".model")
        if processor.eos_id() < 0 or processor.get_piece_size() != args.vocab_size:
            raise TrainTokenizerError(f"the trained model is unexpected: {processor.get_piece_size()} pieces, "
                                      f"eos id {processor.eos_id()}")
        os.replace(tmp_prefix + ".vocab", args.model_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", args.model_prefix + ".model")  # last: a .model means a finished run
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = train(args)
    except (TrainTokenizerError, OSError, EOFError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 1
    _report_malformed(stats)
    print(
        f"wrote {args.model_prefix}.model and {args.model_prefix}.vocab: {args.model_type}, "
        f"vocab {args.vocab_size}, eod </s>=2, from {stats.documents} document(s) "
        f"({stats.sentences} sentence(s)), {stats.malformed} malformed line(s) skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
