"""Saving and loading whole checkpoints: every rank writes its own file, rank 0 publishes the directory.

Save: each rank copies its model-space tensors (state.collect), writes them to its own
``shard_NNNNN.safetensors`` in a hidden temporary directory, and reports the file's size, CRC-32 and
index (a manifest.FileReport, as JSON) to rank 0. Rank 0 writes ``metadata.json`` (the training
state, config, tokenizer checksum: JSON, never pickle) and ``manifest.json`` (every file's size and
CRC-32, every tensor's pieces), checks every file is there at its size, renames the directory into
place, and only then moves the tracker and prunes old checkpoints. A crash at any point leaves the
previous checkpoint and tracker as they were. With ``async_save`` the copy is synchronous and the
rest runs in a background thread (with its own gloo group, so it never interleaves with training's
collectives); the next save, and the end of training, wait for it.

Load: candidates are the tracker's iteration, then every other checkpoint newest first (or exactly
``--ckpt-step``). All ranks verify a candidate together (sizes and CRC-32 split between them); the
first sound one is loaded, and each problem with a newer one is reported.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import threading
import time

import torch
import torch.distributed as dist

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.checkpoint import layout, state
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.manifest import (
    CheckpointMetadata,
    FileEntry,
    FileReport,
    Manifest,
    TrainingMetadata,
    WriteFailure,
    report_from_json,
)
from longctx_megatron.checkpoint.megatron import describe, not_native_message
from longctx_megatron.checkpoint.reader import CheckpointReader, verify_files
from longctx_megatron.checkpoint.safetensors_io import file_crc32, write_safetensors


class Checkpointer:
    """Saves (one at a time, optionally in the background) and finds checkpoints for one run.

    Creating it is collective: every rank must construct it, in the same order as other groups.
    """

    def __init__(self, save_dir: str | None, keep_last: int | None = None, async_save: bool = False, log=print,
                 timeout_minutes: float = 60.0):
        self.save_dir, self.keep_last, self.async_save, self.log = save_dir, keep_last, async_save, log
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict = {}  # host copies for background saves, reused from one save to the next
        self.last_stall_s = 0.0
        if save_dir and self.rank == 0:
            for done in layout.recover(save_dir):
                self.log(f"checkpoint: {done}")
        dist.barrier(group=self.group)  # nobody reads or writes save_dir while rank 0 tidies it

    # ----------------------------------------------------------------- saving
    def save(self, iteration: int, metadata: TrainingMetadata, chunks: list, optimizer, ctx, device) -> None:
        """Checkpoint the state after ``iteration`` iterations; returns once it is safe to train on."""
        self.wait()
        start = time.perf_counter()
        tensors, index = state.collect(chunks, optimizer, ctx, device, self._buffers if self.async_save else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the non-blocking copies into pinned memory must be done
        if self.async_save:
            self._thread = threading.Thread(target=self._run_write, args=(iteration, tensors, index, metadata, start),
                                            name=f"checkpoint-save-{iteration}", daemon=True)
            self._thread.start()
            self.last_stall_s = time.perf_counter() - start
        else:
            self._write(iteration, tensors, index, metadata, start)
            self.last_stall_s = time.perf_counter() - start

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {error}") from error

    def _run_write(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as error:  # re-raised in the training thread by wait()
            self._error = error

    def _write(self, iteration: int, tensors: dict, index: list, metadata: TrainingMetadata, start: float) -> None:
        staged = layout.temporary_dir(self.save_dir, iteration)
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # left by a save that crashed
            os.makedirs(staged)
        dist.barrier(group=self.group)
        name = layout.shard_file(self.rank)
        try:
            written = write_safetensors(os.path.join(staged, name), tensors)
            report = FileReport(name, written.bytes, written.crc32, tuple(index)).to_json()
        except Exception as error:  # noqa: BLE001 - reported by rank 0 for every rank
            report = WriteFailure(f"rank {self.rank} could not write {name}: {error}").to_json()
        reports = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(report, reports, dst=0, group=self.group)
        outcome = [None]
        if self.rank == 0:
            try:
                reports = [report_from_json(report, f"rank {rank}'s report") for rank, report in enumerate(reports)]
                total = self._publish(iteration, reports, metadata)
                seconds = time.perf_counter() - start
                self.log(f"saved checkpoint iteration {iteration} to {layout.iteration_dir(self.save_dir, iteration)}"
                         f": {total / 1e9:.3f} GB in {seconds:.2f} s ({total / 1e9 / seconds:.2f} GB/s)")
            except Exception as error:  # noqa: BLE001 - every rank raises it below
                outcome = [f"{error}"]
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        if outcome[0]:
            raise CheckpointError(f"saving iteration {iteration} failed; the previous checkpoint is intact: "
                                  f"{outcome[0]}")

    def _publish(self, iteration: int, reports: list[FileReport | WriteFailure], metadata: TrainingMetadata) -> int:
        total = publish_checkpoint(self.save_dir, iteration, reports, metadata)
        if self.keep_last:
            for old in layout.prune(self.save_dir, self.keep_last, protect=iteration):
                self.log(f"deleted checkpoint iteration {old} (--keep-last {self.keep_last})")
        return total

    # ---------------------------------------------------------------- loading
    def find(self, root: str, step: int | None = None) -> CheckpointReader | None:
        """The newest sound checkpoint under ``root`` (exactly ``step`` if given); None for a directory
        with no checkpoint at all. Every rank gets the same answer (a Megatron-LM checkpoint is refused
        with the command that converts it, by every rank from the same files)."""
        if megatron := describe(root, step):
            raise CheckpointError(not_native_message(root, megatron))
        tracker = layout.read_tracker(root)
        found = layout.list_iterations(root)
        if step is not None:
            candidates = [step]
        else:
            if tracker is None and found:
                self.log(f"warning: {root} has checkpoints but no {layout.TRACKER}; using the newest sound one")
            candidates = ([tracker] if tracker is not None else []) + [it for it in found if it != tracker]
        if not candidates:
            return None
        problems = []
        for iteration in candidates:
            directory = layout.iteration_dir(root, iteration)
            mine = (verify_files(directory, self.rank, self.world_size) if os.path.isdir(directory)
                    else [f"{directory} does not exist"])
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine, group=self.group)
            issues = sorted({issue for rank_issues in everyone for issue in rank_issues})
            if not issues:
                for issue in problems:
                    self.log(f"warning: skipped a newer checkpoint: {issue}")
                return CheckpointReader(directory)
            if step is not None:
                raise CheckpointError(f"--ckpt-step {step}: " + "; ".join(issues))
            problems.extend(issues)
        raise CheckpointError(f"no sound checkpoint in {root}: " + "; ".join(problems))


def publish_checkpoint(root: str, iteration: int, reports: list[FileReport | WriteFailure],
                       metadata: TrainingMetadata) -> int:
    """Complete the staged checkpoint of ``iteration`` from every file's report: write metadata.json and
    manifest.json, check every file's size, rename the directory into place and move the tracker.
    Returns the bytes written."""
    failures = [report.error for report in reports if isinstance(report, WriteFailure)]
    if failures:
        raise CheckpointError("; ".join(failures))
    staged = layout.temporary_dir(root, iteration)
    path = os.path.join(staged, layout.METADATA)
    with atomic_write(path, "w") as file:
        json.dump(CheckpointMetadata(iteration, metadata).to_json(), file, indent=1, sort_keys=True)
    manifest = Manifest.from_reports(reports, {layout.METADATA: FileEntry(os.path.getsize(path), file_crc32(path))})
    with atomic_write(os.path.join(staged, layout.MANIFEST), "w") as file:
        json.dump(manifest.to_json(), file, indent=1, sort_keys=True)
    with atomic_write(os.path.join(staged, layout.MANIFEST_CRC), "w") as file:
        file.write(f"{file_crc32(os.path.join(staged, layout.MANIFEST)):08x}\n")
    for name, expected in manifest.files.items():
        size = os.path.getsize(os.path.join(staged, name))
        if size != expected.bytes:
            raise CheckpointError(f"{name} has {size} bytes after writing, expected {expected.bytes}")
    layout.publish(root, iteration)
    return sum(entry.bytes for entry in manifest.files.values())
