"""Checkpoint I/O: save and load GB/s of a ~1 GB training state on 1, 2 and 4 ranks vs the raw disk speed.

    python benchmarks/checkpoint_io.py [--sizes 1.0] [--ranks 1 2 4] [--layouts tp1 dp2 ...] [--dir DIR]
    python benchmarks/checkpoint_io.py --quick        # a ~0.1 GB state, about a minute on 2 CPU cores

Raw disk speed: the main process writes as many bytes as the state (random bytes, a 64 MiB random
block repeated: ext4 neither compresses nor deduplicates) in 16 MiB blocks to a file in the same
directory as the checkpoints, then flush + fsync; the best of ``--raw-repeats`` writes is the
reference, and it is measured again after the last layout so drift shows. The raw read is of the
same file after ``posix_fadvise(DONTNEED)`` has dropped its (clean, fsynced) pages from the page
cache, i.e. a disk read; where the kernel ignores the hint it is a page-cache read. The speed of
zlib.crc32 over the same bytes is printed too: the checkpoint code computes a CRC-32 of every byte
it writes (inline, same thread) and find() re-reads and checks every file before a load.

On a virtual machine the first raw write is often several times slower than the next: writing
1 GB into the page cache faults in fresh guest memory (presumably pages the host had taken back),
while the next write reuses the pages freed by deleting the first file; the snapshot copy of an
async save, which allocates as much memory as the rank writes, varies the same way. Saves meet either case,
depending on what was freed just before, so expect that much spread between runs; the best raw
write is the (conservative) reference.

The state: each layout runs in spawned gloo processes on CPU (one thread per rank when there is more
than one) that build the real trainer through ``training.setup.setup`` with a model whose fp32
weights + Adam moments come to the requested size (12 bytes per parameter), and run one training
step so the moments exist. Then, ``--repeats`` times, on every rank, with barriers around each
measurement (per repeat the slowest rank counts; the best repeat is reported, each column on its own,
as for the raw disk, because other work on the machine adds noise that only ever slows things down):

* save: ``Trainer.save()`` with a synchronous Checkpointer (copy out, write + fsync each rank's
  shard with its CRC-32, rank 0 writes metadata + manifest, renames the directory into place);
* async save: the same with ``async_save`` on; the stall is ``checkpointer.last_stall_s`` (the
  time before training may go on: the snapshot copy) and the total is the time until
  ``checkpointer.wait()`` returns;
* load: ``checkpointer.find(root)`` (every file's size and CRC-32 verified, split over the ranks)
  + ``Trainer.restore(reader)``, after dropping the checkpoint files from the page cache (as for
  the raw read); a second, page-cache-hot load is shown in the breakdown table. The restored
  weights are compared with the saved ones.

The state GB is the sum of the manifest's file sizes (shards + metadata). Layouts are written like
``tp2xdp2``, ``dp4``, ``pp2`` with ``+zero`` for the distributed optimizer (ZeRO-1); a replicated
tensor is written by one data-parallel replica only, so DP splits the writes. The breakdown table
times the checkpoint code's phases by wrapping ``state.collect``, ``write_safetensors``,
``layout.publish``, ``verify_files`` and ``state.load`` (and ``mappings.all_gather_single`` while
collecting: the distributed optimizer's gathers). ``--overlap`` also times a training step
run while the async save writes in the background, next to one run without. Targets (from the
issue, printed as information): save >= 50% of the raw write speed, async stall < 10% of a
synchronous save.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: tests/

from tests.distributed import run_on_ranks  # noqa: E402 - the tests' multi-rank runner

BLOCK = 16 * 2**20
DEFAULT_LAYOUTS = ["tp1", "dp2", "dp2+zero", "tp2xdp2", "dp4"]


# ------------------------------------------------------------------------------------------ raw disk
def drop_page_cache(path: str) -> None:
    """Ask the kernel to drop a file's clean pages (those of a directory's files, for a directory)."""
    paths = [os.path.join(path, name) for name in os.listdir(path)] if os.path.isdir(path) else [path]
    for name in paths:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def random_bytes(nbytes: int) -> memoryview:
    block = os.urandom(64 * 2**20)
    return memoryview((block * (nbytes // len(block) + 1))[:nbytes])


def raw_write(path: str, data: memoryview) -> float:
    """Seconds to write ``data`` sequentially in 16 MiB blocks, flush and fsync."""
    start = time.perf_counter()
    with open(path, "wb") as file:
        for offset in range(0, len(data), BLOCK):
            file.write(data[offset:offset + BLOCK])
        file.flush()
        os.fsync(file.fileno())
    return time.perf_counter() - start


def raw_read(path: str) -> float:
    """Seconds to read ``path`` sequentially in 16 MiB blocks after dropping it from the page cache."""
    drop_page_cache(path)
    buffer = bytearray(BLOCK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass
    return time.perf_counter() - start


def measure_raw(directory: str, nbytes: int, repeats: int) -> dict:
    data = random_bytes(nbytes)
    path = os.path.join(directory, "raw_disk_test.bin")
    writes, reads = [], []
    for _ in range(repeats):
        writes.append(raw_write(path, data))
        reads.append(raw_read(path))
        os.remove(path)
        os.sync()
    start = time.perf_counter()
    zlib.crc32(data)
    return {"bytes": nbytes, "write_gbps": [nbytes / 1e9 / s for s in writes],
            "read_gbps": [nbytes / 1e9 / s for s in reads], "crc_gbps": nbytes / 1e9 / (time.perf_counter() - start)}


# ------------------------------------------------------------------------------------------- model
def model_flags(target_gb: float) -> list[str]:
    """Trainer flags for a model whose fp32 weights + Adam moments (12 bytes per parameter) make ~target_gb."""
    from longctx_megatron.model.counting import estimate_params
    from longctx_megatron.training.arguments import parse_run_config
    from longctx_megatron.training.run_config import demo_config

    hidden = 256 if target_gb < 0.3 else 512 if target_gb < 0.6 else 768 if target_gb < 3 else 1024
    heads = hidden // 64
    shape = ["--hidden-size", str(hidden), "--num-attention-heads", str(heads), "--num-query-groups",
             str(2 if heads <= 4 else 4), "--ffn-hidden-size", str(4 * hidden), "--vocab-size",
             str(8192 if hidden == 256 else 32000), "--seq-length", "64", "--micro-batch-size", "1",
             "--train-iters", "100", "--group-query-attention", "--swiglu", "--normalization", "RMSNorm",
             "--position-embedding-type", "rope", "--disable-bias-linear"]

    def params(layers: int) -> int:
        run = parse_run_config([*shape, "--num-layers", str(layers)], 1)
        return estimate_params(run.model.resolve(demo_config(), run.training.seq_length))

    one, per_layer = params(1), params(2) - params(1)
    layers = max(2, round((target_gb * 1e9 / 12 - one) / per_layer) + 1)
    return [*shape, "--num-layers", str(layers)]


def parse_layout(text: str) -> tuple[int, list[str]]:
    """'tp2xdp2+zero' -> (world size 4, trainer flags)."""
    base, _, extra = text.partition("+")
    sizes = {"tp": 1, "pp": 1, "dp": 1}
    for part in base.split("x"):
        match = re.fullmatch(r"(tp|pp|dp)(\d+)", part)
        if not match or extra not in ("", "zero"):
            raise argparse.ArgumentTypeError(f"layout {text!r}: expected e.g. tp1, dp2, tp2xdp2, dp2+zero")
        sizes[match[1]] = int(match[2])
    flags = ["--tensor-model-parallel-size", str(sizes["tp"]), "--pipeline-model-parallel-size", str(sizes["pp"])]
    if extra == "zero":
        flags.append("--use-distributed-optimizer")
    return sizes["tp"] * sizes["pp"] * sizes["dp"], flags


# ------------------------------------------------------------------------------------------- ranks
class PhaseTimers:
    """Seconds spent in the checkpoint code's phases, by wrapping the module functions it calls."""

    def __init__(self):
        from longctx_megatron.checkpoint import layout, sharded, state
        from longctx_megatron.parallel import mappings

        self.seconds: dict[str, float] = {}
        self.shard_bytes = 0
        self.collecting = False
        for module, name, key in ((state, "collect", "collect"), (sharded, "write_safetensors", "write"),
                                  (layout, "publish", "publish"), (sharded, "verify_files", "verify"),
                                  (state, "load", "restore"), (mappings, "all_gather_single", "gather")):
            setattr(module, name, self._wrap(getattr(module, name), key))

    def _wrap(self, function, key):
        def timed(*args, **kwargs):
            if key == "gather" and not self.collecting:  # only the distributed optimizer's gathers for a save
                return function(*args, **kwargs)
            self.collecting |= key == "collect"
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
                if key == "write":
                    self.shard_bytes = result.bytes
                return result
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
                self.collecting &= key != "collect"
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def _checksum(trainer) -> float:
    return sum(p.detach().double().sum().item() for chunk in trainer.chunks for p in chunk.parameters())


def _measure(rank: int, world: int, job: dict) -> dict:
    from longctx_megatron.checkpoint import layout
    from longctx_megatron.training.arguments import parse_run_config
    from longctx_megatron.training.setup import setup

    root, lines = job["root"], []
    trainer = setup(parse_run_config([*job["flags"], "--save", root], world), log=lines.append)
    timers = PhaseTimers()
    checkpointer = trainer.checkpointer
    out: dict = {"rank": rank, "restored_ok": True, "log": lines}

    def record(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    def record_phases(prefix: str) -> None:
        for name, seconds in timers.take().items():
            record(f"{prefix}_{name}", seconds)

    def timed_step() -> float:
        start = time.perf_counter()
        trainer.step(trainer.iteration)
        trainer.iteration += 1
        return time.perf_counter() - start

    timed_step()  # the Adam moments exist from here on
    timers.take()
    for _ in range(job["repeats"]):
        if job["overlap"]:
            record("idle_step_s", timed_step())
            timers.take()

        # synchronous save (a new iteration number each time: saving over an existing one would time its deletion)
        checkpointer.async_save = False
        trainer.iteration += 1
        dist.barrier()
        start = time.perf_counter()
        trainer.save()
        record("sync_s", time.perf_counter() - start)
        record_phases("sync")
        out["shard_bytes"] = timers.shard_bytes
        dist.barrier()

        # asynchronous save of the same state under the next iteration number
        checkpointer.async_save = True
        trainer.iteration += 1
        saved = _checksum(trainer)
        dist.barrier()
        start = time.perf_counter()
        trainer.save()
        record("stall_s", checkpointer.last_stall_s)
        if job["overlap"]:
            record("overlap_step_s", timed_step())
        checkpointer.wait()
        record("async_total_s", time.perf_counter() - start)
        record_phases("async")
        dist.barrier()
        directory = layout.iteration_dir(root, layout.read_tracker(root))
        if rank == 0:
            with open(os.path.join(directory, layout.MANIFEST)) as file:
                out["state_bytes"] = sum(entry["bytes"] for entry in json.load(file)["files"].values())
            for old in layout.list_iterations(root)[1:]:
                shutil.rmtree(layout.iteration_dir(root, old))
            os.sync()  # so that the next save's directory fsyncs do not pay for committing these deletions

        # loads: cold (the files dropped from the page cache), then hot
        for kind in ("load", "hot_load"):
            if kind == "load" and rank == 0:
                drop_page_cache(directory)
            dist.barrier()
            start = time.perf_counter()
            trainer.restore(checkpointer.find(root))
            record(f"{kind}_s", time.perf_counter() - start)
            record_phases(kind)
            dist.barrier()
            out["restored_ok"] &= abs(_checksum(trainer) - saved) <= 1e-9 * max(1.0, abs(saved))
    return out


# -------------------------------------------------------------------------------------------- main
def summarize(ranks: list[dict]) -> dict:
    """Per repeat the slowest rank, then the best repeat, for every time (each column on its own);
    the state's size; the largest shard; whether every restore gave back the saved weights."""
    times = {}
    for key in sorted({key for r in ranks for key, value in r.items() if isinstance(value, list) and key != "log"}):
        per_repeat = zip(*(r.get(key, [0.0] * len(ranks[0]["sync_s"])) for r in ranks), strict=True)
        times[key] = min(max(values) for values in per_repeat)
    return {**times, "state_bytes": ranks[0]["state_bytes"], "largest_shard": max(r["shard_bytes"] for r in ranks),
            "restored_ok": all(r["restored_ok"] for r in ranks)}


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *map(line, rows)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0], help="state sizes in GB (default: 1.0)")
    parser.add_argument("--ranks", type=int, nargs="+", help="only the layouts with these world sizes")
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS,
                        help=f"e.g. tp1 dp2 dp2+zero tp2xdp2 pp2 (default: {' '.join(DEFAULT_LAYOUTS)})")
    parser.add_argument("--quick", action="store_true", help="a ~0.1 GB state (overrides --sizes)")
    parser.add_argument("--dir", help="where to write (a temporary directory is made in it and deleted at the end; "
                        "default: the system's temporary directory)")
    parser.add_argument("--repeats", type=int, default=2, help="saves and loads per layout (best is reported)")
    parser.add_argument("--raw-repeats", type=int, default=2, help="raw disk writes before the layouts (best is used)")
    parser.add_argument("--overlap", action="store_true", help="also time a training step during the async write")
    parser.add_argument("--verbose", action="store_true", help="print rank 0's trainer log of every layout")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per layout")
    args = parser.parse_args(argv)
    sizes = [0.1] if args.quick else args.sizes
    try:
        layouts = [(name, *parse_layout(name)) for name in args.layouts]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    layouts = [entry for entry in layouts if not args.ranks or entry[1] in args.ranks]
    if not layouts:
        parser.error("no layout left (--layouts and --ranks exclude each other)")

    base = tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir)
    try:
        for size in sizes:
            run_size(args, size, layouts, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_size(args, size: float, layouts: list, base: str) -> None:
    flags = model_flags(size)
    raw = measure_raw(base, int(size * 1e9), args.raw_repeats)
    write_ref, read_ref = max(raw["write_gbps"]), max(raw["read_gbps"])
    model = " ".join(f"{flag} {value}" for flag, value in zip(flags[::2], flags[1::2], strict=True)
                     if flag not in ("--seq-length", "--micro-batch-size", "--train-iters"))
    print(f"## {size:g} GB state: model {model}; fp32 + Adam; CPU, gloo, "
          f"{os.cpu_count()} cores; slowest rank; directory {base}\n")
    print(f"raw disk, {raw['bytes'] / 1e9:.2f} GB in 16 MiB blocks + fsync: write "
          f"{', '.join(f'{v:.2f}' for v in raw['write_gbps'])} GB/s (reference: best, {write_ref:.2f}); read after "
          f"fadvise(DONTNEED) {', '.join(f'{v:.2f}' for v in raw['read_gbps'])} GB/s (reference {read_ref:.2f}); "
          f"zlib.crc32 of the same bytes in memory {raw['crc_gbps']:.2f} GB/s (one core)\n")
    rows, breakdown, overlap, results = [], [], [], []
    for name, world, layout_flags in layouts:
        root = tempfile.mkdtemp(prefix=f"{name.replace('+', '_')}_", dir=base)
        job = {"flags": [*flags, *layout_flags], "root": root, "overlap": args.overlap, "repeats": args.repeats}
        try:
            ranks = run_on_ranks(_measure, world, job, timeout=args.timeout)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if args.verbose:
            print("\n".join(f"    [{name}] {line}" for line in ranks[0]["log"]))
        r = summarize(ranks)
        results.append((name, r))
        gb = r["state_bytes"] / 1e9
        rows.append([str(world), name, f"{gb:.3f}", f"{r['sync_s']:.2f}", f"{gb / r['sync_s']:.2f}",
                     f"{gb / r['sync_s'] / write_ref:.0%}", f"{r['stall_s']:.3f}", f"{r['stall_s'] / r['sync_s']:.1%}",
                     f"{r['load_s']:.2f}", f"{gb / r['load_s']:.2f}", f"{gb / r['load_s'] / read_ref:.0%}"])
        seconds = [f"{r.get(key, 0.0):.2f}" for key in ("sync_collect", "sync_gather", "sync_write", "sync_publish",
                                                          "async_collect", "async_total_s", "load_verify",
                                                          "load_restore", "hot_load_s")]
        breakdown.append([name, *seconds[:3], f"{r['largest_shard'] / 1e9:.3f}", *seconds[3:],
                          "yes" if r["restored_ok"] else "NO"])
        if args.overlap:
            overlap.append([name, f"{r['idle_step_s']:.2f}", f"{r['overlap_step_s']:.2f}",
                            f"{r['overlap_step_s'] / r['idle_step_s']:.2f}"])
    print(table(["ranks", "layout", "state GB", "save s", "save GB/s", "save/raw", "async stall s", "stall/sync",
                 "load s", "load GB/s", "load/raw"], rows))
    print("\nwhere the time goes (seconds, slowest rank; save: collect (of which the distributed optimizer's DP "
          "all-gathers), each rank's write + CRC-32 + fsync, rank 0's publish (metadata, manifest, rename, fsyncs); "
          "async: the snapshot copy, i.e. the stall, and the time until wait() returns; load: find()'s size + CRC-32 "
          "check of every file, then restore(); hot load: the same with the files in the page cache):\n")
    print(table(["layout", "collect", "gather", "write", "largest shard GB", "publish", "async snapshot",
                 "async total", "load: verify", "load: restore", "hot load"], [row[:-1] for row in breakdown]))
    if args.overlap:
        print("\na training step alone vs during the async write (slowest rank, seconds):\n")
        print(table(["layout", "step alone", "step during write", "ratio"], overlap))
        print("(with --overlap, the async total above includes the overlapped step)")
    later = measure_raw(base, int(size * 1e9), 1)
    print(f"\nraw disk after the layouts: write {later['write_gbps'][0]:.2f} GB/s, "
          f"read {later['read_gbps'][0]:.2f} GB/s")
    save_met = [name for name, r in results if r["state_bytes"] / 1e9 / r["sync_s"] >= 0.5 * write_ref]
    stall_met = [name for name, r in results if r["stall_s"] < 0.1 * r["sync_s"]]
    print(f"target save >= 50% of raw write ({0.5 * write_ref:.2f} GB/s): met by {len(save_met)}/{len(results)} "
          f"layouts ({', '.join(save_met) or 'none'})")
    print(f"target async stall < 10% of a synchronous save: met by {len(stall_met)}/{len(results)} layouts "
          f"({', '.join(stall_met) or 'none'})")
    failed = [row[0] for row in breakdown if row[-1] != "yes"]
    print("restored weights equal the saved ones: " + (f"NO in {', '.join(failed)}" if failed else "all layouts"))
    print()


if __name__ == "__main__":
    main()
