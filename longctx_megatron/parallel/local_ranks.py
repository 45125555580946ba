"""Run a function on N local ranks in spawned processes, with a timeout so a hang is an error, not a stall.

``run_on_ranks(body, world_size, *args)`` calls ``body(rank, world_size, *args)`` in every rank
with MASTER_ADDR/PORT, RANK, WORLD_SIZE set (so ``initialize_parallel`` uses env://) and returns
the ranks' return values. A rank's exception is re-raised with its traceback; ranks still running
at the deadline are killed and a TimeoutError names the ranks that hung. ``body`` must be a
module-level function (spawned processes import it by name). Used by the tests and benchmarks;
with more than one rank each gets one intra-op thread, since they share the machine's cores.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised; the message carries its traceback."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(body, rank, world_size, port, results, args):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    if world_size > 1:
        torch.set_num_threads(1)
    try:
        results.put((rank, True, body(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(body, world_size: int, *args, timeout: float = 180.0) -> list:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_entry, args=(body, rank, world_size, port, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    outcomes: dict[int, object] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                hung = sorted(set(range(world_size)) - set(outcomes))
                raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout:.0f} s") from None
            if not ok:
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            outcomes[rank] = value
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return [outcomes[rank] for rank in range(world_size)]
