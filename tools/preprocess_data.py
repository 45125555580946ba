"""Tokenise JSONL corpora into Megatron-LM indexed datasets ({prefix}_{key}_document.bin/.idx).

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --json-keys text \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --output-prefix data/corpus --workers 8 --append-eod

Flags and output names follow Megatron-LM's tool, so its datasets and ours are interchangeable
(``--workers`` is required, as there). Tokenizers: every ``--tokenizer-type`` of
longctx_megatron/data/tokenizers.py, with ``--vocab-file``/``--merge-file`` (GPT2BPETokenizer) and the
``--tiktoken-*`` options (TikTokenizer). ``--split-sentences`` writes each sentence of a document as
its own sequence to ``{prefix}_{key}_sentence`` (data/sentences.py: NLTK Punkt, untrained when its
tables are not installed; ``--keep-newlines`` keeps the newlines with their sentence), the EOD after
the last one. ``--partitions N`` deals the input lines to N partitions, round robin as Megatron deals
them (or in N consecutive blocks with ``--keep-sequential-samples``), writes each to its own dataset
and merges them in partition order: Megatron's output, documents reordered unless
``--keep-sequential-samples``, in which case the output equals one partition's byte for byte.
The input is streamed in batches bounded in lines and in bytes (memory grows with neither the
corpus nor the number of long lines; one document costs about 12x its bytes while it is tokenised,
benchmarks/preprocess_throughput.py), tokenised by a pool of workers and
written in input order. Bad lines are bad lines: malformed or too deeply nested JSON, a missing or
non-string key, text that is not valid Unicode (a lone surrogate), text the tokenizer refuses (a
NullTokenizer word that is not an id), and the rest of a .gz file that is truncated or not gzip are
skipped, counted and the first few reported with file and line; the run fails if they exceed
--max-bad-fraction. An empty document is written as Megatron-LM writes it: a document with no
sequences (its .idx then equals Megatron's byte for byte). Outputs are written under temporary
names: the .bin is renamed into place first and the .idx (which makes the dataset visible) last,
only when the whole run succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from longctx_megatron.data.indexed_dataset import IndexedDatasetBuilder, building_dataset, optimal_dtype
from longctx_megatron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer, tokenizer_arguments

BATCH_LINES = 2048  # lines in flight per worker and batch ...
BATCH_BYTES = 16 * 2**20  # ... and bytes: a batch of long documents stays small (one longer line is a batch)
REPORTED_BAD_LINES = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="JSONL files or globs (.jsonl or .jsonl.gz)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    group.add_argument("--split-sentences", action="store_true",
                       help="write each sentence as its own sequence ({prefix}_{key}_sentence)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences, keep the newlines after a sentence in it")
    group.add_argument("--lang", default="english", help="language of NLTK's Punkt tables (default: english)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="tokenizer model file or directory")
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: the vocabulary (gpt2-vocab.json)")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: the BPE merges (gpt2-merges.txt)")
    group.add_argument("--vocab-size", type=int, help="vocabulary size (NullTokenizer; TikTokenizer, default 2**17)")
    group.add_argument("--tiktoken-pattern", choices=("v1", "v2"), help="TikTokenizer's split regex (default v2)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved for special tokens (default 1000)")
    group.add_argument("--tokenizer-special-tokens", "--tiktoken-special-tokens", dest="tiktoken_special_tokens",
                       nargs="+", help="TikTokenizer's special tokens (must include <unk> <s> </s> <mask> <pad> "
                       "<cls> <sep>)")
    group.add_argument("--tokenizer-metadata", help="Megatron's tokenizer metadata JSON; its 'library' must "
                       "match --tokenizer-type (checked, not otherwise used)")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, required=True, help="tokenising processes (required, as Megatron)")
    group.add_argument("--partitions", type=int, default=1,
                       help="deal the input to this many partitions, written apart and merged (default 1)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="with --partitions, partitions are consecutive blocks: the output keeps the input order")
    group.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    group.add_argument("--max-bad-fraction", type=float, default=0.001,
                       help="fail when malformed lines or missing keys exceed this fraction (default 0.001)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.log_interval < 1 or args.partitions < 1:
        parser.error("--workers, --partitions and --log-interval must be positive")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        parser.error("--max-bad-fraction must be in [0, 1]")
    return args


_LIBRARIES = {  # Megatron's tokenizer library of each --tokenizer-type (megatron.core.tokenizers)
    "SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface", "GPT2BPETokenizer": "megatron",
    "TikTokenizer": "tiktoken", "NullTokenizer": "null", "ByteTokenizer": "byte-level",
}


def check_tokenizer_metadata(path: str, tokenizer_type: str) -> None:
    """Refuse a --tokenizer-metadata file that is not a JSON object or names another library."""
    try:
        with open(path, "rb") as handle:
            metadata = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--tokenizer-metadata {path!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"--tokenizer-metadata {path!r} is not JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"--tokenizer-metadata {path!r} must hold a JSON object")
    library = metadata.get("library")
    if library is not None and library != _LIBRARIES[tokenizer_type]:
        raise ValueError(f"--tokenizer-metadata {path!r} names library {library!r}, but --tokenizer-type "
                         f"{tokenizer_type} is Megatron's {_LIBRARIES[tokenizer_type]!r}")


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand globs, keep order, and fail on a pattern that matches nothing."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [path for path in matches if os.path.isfile(path)]
        if not matches:
            raise ValueError(f"--input {pattern!r} matches no file")
        files.extend(matches)
    return files


@dataclass
class Progress:
    """Byte position over all inputs, for MB/s and the ETA."""

    total_bytes: int
    done_bytes: int = 0  # bytes of finished files
    current: object = None  # raw handle of the file being read

    def position(self) -> int:
        return self.done_bytes + (self.current.tell() if self.current is not None else 0)


@dataclass(frozen=True)
class Unreadable:
    """Where a file stopped being readable (a truncated or damaged .gz): a bad line, like a malformed one."""

    reason: str


def read_lines(files: list[str], progress: Progress) -> Iterator[tuple[str, int, bytes | Unreadable]]:
    """(file, line number, raw line) for every non-blank line, streaming; a file that cannot be read to
    its end yields one Unreadable at the line where reading failed, and the next file is read."""
    for path in files:
        with open(path, "rb") as raw:
            progress.current = raw
            lines = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            number = 0
            try:
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        yield path, number, line
            except (EOFError, gzip.BadGzipFile, zlib.error) as error:
                what = "truncated" if isinstance(error, EOFError) else "not gzip or damaged"
                yield path, number + 1, Unreadable(f"{what} ({error or type(error).__name__}); the rest of the "
                                                  "file is skipped")
            progress.current = None
        progress.done_bytes += os.path.getsize(path)


_worker_state = {}


def _init_worker(options: dict, keys, append_eod, split_sentences=False, lang="english", keep_newlines=False) -> None:
    tokenizer = build_tokenizer(**options)
    splitter = None
    if split_sentences:
        from longctx_megatron.data.sentences import SentenceSplitter

        splitter = SentenceSplitter(lang, keep_newlines)
    _worker_state.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod, splitter=splitter,
                         dtype=optimal_dtype(tokenizer.vocab_size))


def encode_line(line: bytes) -> tuple[str, object]:
    """("ok", {key: [sequence, ...]}) or ("bad", reason). A document's sequences are its text, or its
    sentences with --split-sentences, each tokenised alone (empty ones dropped), the EOD after the last;
    a document without tokens has no sequence."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return "bad", f"malformed JSON ({error.msg if hasattr(error, 'msg') else error})"
    except RecursionError:
        return "bad", "malformed JSON (nested too deeply)"
    if not isinstance(record, dict):
        return "bad", f"expected a JSON object, got {type(record).__name__}"
    state = _worker_state
    encoded = {}
    for key in state["keys"]:
        text = record.get(key)
        if not isinstance(text, str):
            return "bad", f"missing key {key!r}" if text is None else f"key {key!r} is not a string"
        try:
            text.isascii() or text.encode("utf-8")  # (the copy only for non-ASCII text)
        except UnicodeEncodeError as error:  # JSON's \ud800 escape: not a character any tokenizer can take
            return "bad", f"key {key!r} is not valid Unicode (a lone surrogate at character {error.start})"
        pieces = state["splitter"].split(text) if state["splitter"] is not None else [text]
        try:
            sequences = [ids for ids in map(state["tokenizer"].encode, pieces) if ids]
        except ValueError as error:  # the tokenizer's own verdict on this text (NullTokenizer: not an id)
            return "bad", f"key {key!r}: {error}"
        if sequences and state["append_eod"]:
            sequences[-1].append(state["tokenizer"].eod)
        encoded[key] = [np.asarray(ids, dtype=state["dtype"]) for ids in sequences]
    return "ok", encoded


def encode_item(item: bytes | Unreadable) -> tuple[str, object]:
    return ("bad", item.reason) if isinstance(item, Unreadable) else encode_line(item)


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)


def _batches(items, max_lines: int, max_bytes: int):
    """Consecutive lists of ``items`` (file, line, raw line) holding at most ``max_lines`` lines and,
    unless one line alone is longer, at most ``max_bytes`` bytes."""
    batch, size = [], 0
    for item in items:
        length = len(item[2]) if isinstance(item[2], bytes) else 0
        if batch and (len(batch) == max_lines or size + length > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += length
    if batch:
        yield batch


def preprocess(args: argparse.Namespace, log=print) -> Stats:
    files = resolve_inputs(args.input)
    if args.tokenizer_metadata:
        check_tokenizer_metadata(args.tokenizer_metadata, args.tokenizer_type)
    init = (tokenizer_arguments(args), args.json_keys, args.append_eod, args.split_sentences, args.lang,
            args.keep_newlines)
    _init_worker(*init)  # also validates the tokenizer (and the sentence splitter) before any work starts
    tokenizer, dtype = _worker_state["tokenizer"], _worker_state["dtype"]
    level = "sentence" if args.split_sentences else "document"
    outputs = {key: f"{args.output_prefix}_{key}_{level}" for key in args.json_keys}
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(output_dir, exist_ok=True)
    progress = Progress(total_bytes=sum(os.path.getsize(path) for path in files))
    partition_of = _partitioner(args, files)
    stats, start = Stats(), time.perf_counter()
    log(f"tokenizer {args.tokenizer_type} (vocab {tokenizer.vocab_size}, eod {tokenizer.eod}), token dtype "
        f"{np.dtype(dtype).name}; {len(files)} input file(s), {progress.total_bytes / 2**20:.1f} MB"
        + (f"; sentences split by {_worker_state['splitter'].describe()}" if args.split_sentences else "")
        + (f"; {args.partitions} partitions" if args.partitions > 1 else ""))
    with contextlib.ExitStack() as stack:  # datasets are published only if everything below succeeds
        builders = {key: stack.enter_context(building_dataset(prefix, dtype)) for key, prefix in outputs.items()}
        if args.partitions > 1:  # each partition its own dataset, merged below (removed with the folder)
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=".partitions-", dir=output_dir))
            parts = {key: [IndexedDatasetBuilder(os.path.join(folder, f"{p}_{key}.bin"), dtype)
                           for p in range(args.partitions)] for key in outputs}
        if args.workers > 1:
            pool = stack.enter_context(_worker_pool(args.workers, init))
        number = 0
        for batch in _batches(read_lines(files, progress), BATCH_LINES * args.workers, BATCH_BYTES * args.workers):
            lines = [line for _, _, line in batch]
            results = pool.map(encode_item, lines, chunksize=max(1, min(64, len(lines) // (4 * args.workers)))) \
                if args.workers > 1 else list(map(encode_item, lines))
            for (path, line, _), (status, value) in zip(batch, results, strict=True):
                sinks = builders if args.partitions == 1 else {
                    key: parts[key][partition_of(number)] for key in outputs}
                number += 1
                _record(stats, sinks, path, line, status, value)
                if stats.documents and stats.documents % args.log_interval == 0:
                    _log_progress(log, stats, progress, start)
        _check_bad_fraction(stats, args.max_bad_fraction)
        if args.partitions > 1:  # as Megatron: the partitions' datasets appended in partition order
            for key in outputs:
                for p, part in enumerate(parts[key]):
                    part.finalize(os.path.join(folder, f"{p}_{key}.idx"))
                    builders[key].add_index(os.path.join(folder, f"{p}_{key}"))
    _log_progress(log, stats, progress, start, final=True)
    return stats


def _partitioner(args: argparse.Namespace, files: list[str]):
    """The partition of the n-th input line (0-based; blank lines are not counted): n mod N, Megatron's
    round robin, or with --keep-sequential-samples n // ceil(lines / N), Megatron's consecutive blocks
    (which needs a first pass over the input to count its lines)."""
    partitions = args.partitions
    if partitions == 1:
        return lambda number: 0
    if not args.keep_sequential_samples:
        return lambda number: number % partitions
    total = sum(1 for _ in read_lines(files, Progress(total_bytes=0)))
    size = max(1, math.ceil(total / partitions))
    return lambda number: number // size


@contextlib.contextmanager
def _worker_pool(workers: int, init: tuple):
    """A pool of tokenising workers, shut down when the block ends: closed and joined after success
    (the workers exit before this process does), terminated and joined after an error."""
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _record(stats: Stats, builders, path: str, number: int, status: str, value) -> None:
    if status == "bad":
        stats.bad += 1
        if len(stats.bad_examples) < REPORTED_BAD_LINES:
            stats.bad_examples.append(f"{path}:{number}: {value}")
        return
    # As Megatron-LM: a document with no tokens for a key is still a document of that key's
    # dataset, holding no sequence (its document-index entry repeats the previous one).
    stats.empty += all(len(sequences) == 0 for sequences in value.values())
    for key, sequences in value.items():
        for tokens in sequences:
            builders[key].add_item(tokens)
        builders[key].end_document()
        stats.tokens += sum(len(tokens) for tokens in sequences)
    stats.documents += 1


def _check_bad_fraction(stats: Stats, max_fraction: float) -> None:
    seen = stats.documents + stats.bad
    if seen == 0:
        raise ValueError("the input holds no documents")
    if stats.bad / seen > max_fraction:
        examples = "\n  ".join(stats.bad_examples)
        raise ValueError(f"{stats.bad} of {seen} lines were bad "
                         f"({stats.bad / seen:.2%} > --max-bad-fraction {max_fraction:.2%}); first ones:\n  {examples}")


def _log_progress(log, stats: Stats, progress: Progress, start: float, final: bool = False) -> None:
    elapsed = max(time.perf_counter() - start, 1e-9)
    position = progress.total_bytes if final else progress.position()
    rate = position / elapsed
    eta = (progress.total_bytes - position) / rate if rate > 0 else 0.0
    line = (f"{stats.documents:,} documents, {stats.tokens:,} tokens | {stats.documents / elapsed:,.0f} docs/s, "
            f"{rate / 2**20:.2f} MB/s | {elapsed:.1f} s" + ("" if final else f", ETA {eta:.0f} s"))
    if final:
        line += (f" | skipped: {stats.bad} bad line(s) | {stats.empty} empty document(s), kept as documents "
                 "without sequences (as Megatron-LM)")
        for example in stats.bad_examples:
            line += f"\n  {example}"
    log(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        preprocess(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
