"""Data pipeline speed: preprocess_data.py throughput and memory, and GPT index building for a 1B-token corpus.

    python benchmarks/preprocess_throughput.py [--corpus-mb 30] [--workers 1 2] [--index-tokens 1e9]
        [--long-lines 1024 --long-line-kb 256 --huge-line-mb 64]

1. A ~30 MB JSONL corpus is assembled from the Python standard library's source files (real text
   on every machine), a SentencePiece BPE model is trained on a sample of it with
   tools/train_tokenizer.py, and tools/preprocess_data.py is run with each worker count. The table
   gives MB/s of JSONL input and documents/s, and the ratio to one worker, measured in this run.
2. Memory with long documents: the peak RSS of preprocess_data.py (ByteTokenizer, one worker) on
   ``--long-lines`` lines of ``--long-line-kb`` KB each, with its batches bounded in bytes and lines
   (as shipped) and, as the baseline, in lines only (``BATCH_BYTES`` set out of reach); then on one
   line of ``--huge-line-mb`` MB, a batch of its own either way, whose peak is the cost of
   tokenising a single document. Medians of ``--memory-repeats`` alternating runs.
3. The GPT dataset's doc/sample/shuffle indices (gpt_dataset._build_indices, what GPTDataset builds
   and caches) are built for a synthetic corpus of ``--index-tokens`` tokens in documents of random
   length, at seq_length 4096 for one epoch of samples; time and peak memory (tracemalloc, which
   sees numpy allocations) are printed against the targets (30 s, 4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from longctx_megatron.data.gpt_dataset import GPTDatasetConfig, _build_indices

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, megabytes: float) -> int:
    """Write stdlib source files as JSONL documents until the file reaches ``megabytes``; returns documents."""
    sources = sorted(Path(json.__file__).resolve().parents[1].rglob("*.py"))
    target, documents = megabytes * 2**20, 0
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < target:
            for source in sources:
                text = source.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    out.write(json.dumps({"text": text, "path": str(source.name)}) + "\n")
                    documents += 1
                if out.tell() >= target:
                    break
    return documents


def run_tool(script: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def preprocess_table(args, workdir: Path) -> None:
    corpus = workdir / "corpus.jsonl"
    documents = build_corpus(corpus, args.corpus_mb)
    size_mb = corpus.stat().st_size / 2**20
    sample = workdir / "sample.jsonl"
    with open(corpus, encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        for _, line in zip(range(2000), src, strict=False):
            dst.write(line)
    seconds = run_tool("train_tokenizer.py", "--input", str(sample), "--model-prefix", str(workdir / "tok"),
                       "--vocab-size", str(args.vocab_size), "--model-type", "bpe")
    print(f"corpus: {documents:,} documents, {size_mb:.1f} MB of JSONL (stdlib sources); SentencePiece BPE "
          f"vocab {args.vocab_size} trained on 2,000 of them in {seconds:.1f} s\n")
    header = f"{'workers':>7}  {'seconds':>8}  {'MB/s':>7}  {'docs/s':>8}  {'vs 1 worker':>11}"
    print(header + "\n" + "-" * len(header))
    baseline = None
    for workers in args.workers:
        seconds = run_tool("preprocess_data.py", "--input", str(corpus), "--json-keys", "text",
                           "--tokenizer-type", "SentencePieceTokenizer",
                           "--tokenizer-model", str(workdir / "tok.model"),
                           "--output-prefix", str(workdir / f"out{workers}"), "--append-eod",
                           "--workers", str(workers))
        baseline = baseline or seconds
        print(f"{workers:>7}  {seconds:>8.1f}  {size_mb / seconds:>7.2f}  {documents / seconds:>8.0f}  "
              f"{baseline / seconds:>11.2f}")


_PEAK_RSS = """
import sys
sys.path.insert(0, sys.argv[1])
import preprocess_data
preprocess_data.BATCH_BYTES = int(sys.argv[2])
assert preprocess_data.main(sys.argv[3:]) == 0
# VmHWM: this process's own peak (getrusage's ru_maxrss also counts the parent's pages before exec)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # KiB
"""


def peak_rss_mib(corpus: Path, output: Path, batch_bytes: int) -> float:
    """Peak RSS (VmHWM) of one preprocess_data.py run in a fresh process, in MiB."""
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(ROOT / "tools"), str(batch_bytes),
                             "--input", str(corpus), "--tokenizer-type", "ByteTokenizer", "--append-eod",
                             "--output-prefix", str(output), "--workers", "1"],
                            check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1]) / 1024


def memory_table(args, workdir: Path) -> None:
    long_lines, huge_line = workdir / "long.jsonl", workdir / "huge.jsonl"
    line = json.dumps({"text": "a long document. " * (args.long_line_kb * 1024 // 17)}) + "\n"
    with open(long_lines, "w") as file:
        for _ in range(args.long_lines):
            file.write(line)
    with open(huge_line, "w") as file:
        file.write('{"text": "')
        for _ in range(int(args.huge_line_mb)):
            file.write("x" * 2**20)
        file.write('"}\n')
    sys.path.insert(0, str(ROOT / "tools"))
    import preprocess_data
    shipped, unbounded = preprocess_data.BATCH_BYTES, 2**62
    print(f"\npeak RSS of preprocess_data.py (ByteTokenizer, 1 worker), median of {args.memory_repeats} alternating "
          f"runs; batches of at most {preprocess_data.BATCH_LINES} lines and {shipped / 2**20:.0f} MiB (shipped) "
          "vs lines only")
    header = f"{'input':>32}  {'MB':>6}  {'bytes+lines MiB':>15}  {'lines only MiB':>14}  {'ratio':>6}"
    print(header + "\n" + "-" * len(header))
    for name, corpus in ((f"{args.long_lines} lines of {args.long_line_kb} KB", long_lines),
                         (f"one line of {args.huge_line_mb} MB", huge_line)):
        runs = {shipped: [], unbounded: []}
        for _ in range(args.memory_repeats):
            for batch_bytes in runs:
                runs[batch_bytes].append(peak_rss_mib(corpus, workdir / "mem", batch_bytes))
        ours, baseline = statistics.median(runs[shipped]), statistics.median(runs[unbounded])
        print(f"{name:>32}  {corpus.stat().st_size / 2**20:>6.0f}  {ours:>15.0f}  {baseline:>14.0f}  "
              f"{ours / baseline:>6.2f}")


def index_table(args) -> None:
    rng = np.random.RandomState(0)
    mean = args.mean_document_tokens
    sizes = rng.randint(1, 2 * mean, size=int(args.index_tokens / mean * 1.01)).astype(np.int32)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes, dtype=np.int64), args.index_tokens) + 1]
    tokens = int(sizes.sum(dtype=np.int64))
    config = GPTDatasetConfig(seq_length=4096, num_samples=(tokens - 1) // 4096, seed=1)
    tracemalloc.start()
    start = time.perf_counter()
    doc_idx, sample_idx, shuffle_idx = _build_indices(sizes, 0, len(sizes), config)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\nGPT index building: {tokens:,} tokens in {len(sizes):,} documents (mean {mean} tokens), "
          f"seq_length 4096, {config.num_samples:,} samples")
    print(f"  time {seconds:.2f} s (target < 30 s): {'PASS' if seconds < 30 else 'FAIL'}")
    print(f"  peak memory {peak / 2**30:.2f} GiB (target < 4 GB): {'PASS' if peak < 4e9 else 'FAIL'}")
    print(f"  arrays: doc_idx {doc_idx.nbytes / 2**20:.0f} MiB, sample_idx {sample_idx.nbytes / 2**20:.0f} MiB, "
          f"shuffle_idx {shuffle_idx.nbytes / 2**20:.0f} MiB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=30.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--index-tokens", type=float, default=1e9)
    parser.add_argument("--mean-document-tokens", type=int, default=500)
    parser.add_argument("--long-lines", type=int, default=1024)
    parser.add_argument("--long-line-kb", type=int, default=256)
    parser.add_argument("--huge-line-mb", type=int, default=64)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory and index tables")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPU cores\n")
    with tempfile.TemporaryDirectory() as workdir:
        if not args.skip_throughput:
            preprocess_table(args, Path(workdir))
        memory_table(args, Path(workdir))
    index_table(args)


if __name__ == "__main__":
    main()
