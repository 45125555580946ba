"""The multi-rank runner of the tests and benchmarks: run a function on N local ranks in spawned processes,
with a timeout so a hang is an error, not a stall.

``run_on_ranks(body, world_size, *args)`` calls ``body(rank, world_size, *args)`` in every rank
with MASTER_ADDR/PORT, RANK, WORLD_SIZE set (so ``initialize_parallel`` uses env://) and returns
the ranks' return values. A rank's exception is re-raised with its traceback; a rank that dies
without a result (killed, segfault) is named with its exit code; ranks still running at the
deadline are killed and a TimeoutError names the ranks that hung. The timeout counts from the
moment every rank has started (imported torch and reported ready), so a loaded machine's slow
process start-up is not read as a hang; start-up has its own, generous limit. ``body`` must be a module-level
function (spawned processes import it by name). Used by the tests and benchmarks; with more than
one rank each gets one intra-op thread, since they share the machine's cores.

Results cross the process boundary as bytes: each rank pickles its value with the standard
pickler (tensors by value) and writes it to a pipe of its own. A torch.multiprocessing queue
would pass tensor storage by file descriptor, which the parent can only receive while the rank
is still alive: a rank that returned and exited first made ``get`` fail with FileNotFoundError
on the sender's socket, one run in many.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import time
import traceback


class RankFailed(RuntimeError):
    """A rank raised or died; the message carries its traceback or exit code."""


_READY = b"ready"  # a rank's first message: started, about to call the body
STARTUP_TIMEOUT = 300.0  # seconds for every rank to spawn and import torch, on a loaded CI machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(body, rank, world_size, port, sender, args):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    if world_size > 1:
        torch.set_num_threads(1)
    try:
        sender.send_bytes(_READY)
    except BrokenPipeError:
        return  # the parent has already stopped waiting (another rank failed to start)
    try:
        payload = pickle.dumps((True, body(rank, world_size, *args)), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:
        payload = pickle.dumps((False, traceback.format_exc()))
    try:  # the result goes out first: tearing down the group can block when a peer has failed
        sender.send_bytes(payload)
        sender.close()
    except BrokenPipeError:
        pass  # the parent has already stopped waiting (another rank failed)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # the result is already delivered: a failing teardown changes nothing
        pass


PORT_ATTEMPTS = 3


def run_on_ranks(body, world_size: int, *args, timeout: float = 180.0) -> list:
    """``body(rank, world_size, *args)`` on every rank; the ranks' return values in rank order.

    The rendezvous port is free when chosen but only bound seconds later, by rank 0's store, once
    the rank has spawned and imported torch; in between another process (another test's gloo
    connections take ephemeral ports from the same range) may take it. Rank 0 then fails with
    EADDRINUSE before any rank ran the body, and the run starts again on a new port."""
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return _run_once(body, world_size, args, timeout, free_port())
        except RankFailed as error:
            if "EADDRINUSE" not in str(error):
                raise
    return _run_once(body, world_size, args, timeout, free_port())


def _run_once(body, world_size: int, args: tuple, timeout: float, port: int) -> list:
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(world_size)]
    processes = [
        context.Process(target=_entry, args=(body, rank, world_size, port, pipes[rank][1], args), daemon=True)
        for rank in range(world_size)
    ]
    pending = {pipes[rank][0]: rank for rank in range(world_size)}
    starting = set(pending)
    outcomes: dict[int, object] = {}
    try:
        for process in processes:
            process.start()
        for _, sender in pipes:
            sender.close()  # the rank holds the only write end: its exit without a result reads as EOF
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while pending:
            ready = multiprocessing.connection.wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                waiting = sorted(pending[receiver] for receiver in (starting or pending))
                if starting:
                    raise TimeoutError(f"ranks {waiting} of {world_size} did not start within {STARTUP_TIMEOUT:.0f} s")
                raise TimeoutError(f"ranks {waiting} of {world_size} did not finish within {timeout:.0f} s")
            for receiver in ready:
                rank = pending[receiver]
                try:
                    message = receiver.recv_bytes()
                except EOFError:
                    processes[rank].join(timeout=5)
                    raise RankFailed(f"rank {rank} of {world_size} exited (code {processes[rank].exitcode}) "
                                     "without a result") from None
                if receiver in starting:
                    starting.discard(receiver)
                    if not starting:  # every rank is up: the body's own time starts now
                        deadline = time.monotonic() + timeout
                    continue
                del pending[receiver]
                ok, value = pickle.loads(message)
                if not ok:
                    raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
                outcomes[rank] = value
    finally:
        for receiver, sender in pipes:
            receiver.close()
            sender.close()
        for process in processes:
            if process.pid is None:
                continue  # never started
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return [outcomes[rank] for rank in range(world_size)]
