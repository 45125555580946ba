"""Writing a native checkpoint without a training job: global tensors in, a target layout's slices out.

The converters hand over one group of tensors at a time (one layer, say); each group becomes one
file per tensor-parallel rank, named after its pipeline stage and rank, so memory holds one group
and the files are organised as the target layout would write them. The directory is staged,
described by the same manifest as a training job's checkpoint, and published the same way.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import torch

from longctx_megatron.checkpoint import keys, layout, state
from longctx_megatron.checkpoint.manifest import FileReport, Layout, Piece, TrainingMetadata
from longctx_megatron.checkpoint.safetensors_io import write_safetensors
from longctx_megatron.checkpoint.sharded import publish_checkpoint
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.serialization import config_to_dict
from longctx_megatron.parallel.pipeline_plan import plan_pipeline
from longctx_megatron.parallel.state import check_model_fits_layout
from longctx_megatron.parallel.tensor import offline_shard_specs


class OfflineWriter:
    def __init__(self, root: str, iteration: int, config: ModelConfig, tensor: int, pipeline: int):
        check_model_fits_layout(config, tensor)
        if pipeline > config.n_layers:
            raise ValueError(f"--target-pipeline-parallel-size {pipeline} exceeds the model's {config.n_layers} layers")
        self.root, self.iteration, self.config, self.tensor = root, iteration, config, tensor
        self.stage_layers = plan_pipeline(config, pipeline, config.max_seq_len)[0]
        self.shard_specs = offline_shard_specs(config, tensor)
        self.reports: list[FileReport] = []
        self.staged = layout.temporary_dir(root, iteration)
        shutil.rmtree(self.staged, ignore_errors=True)
        os.makedirs(self.staged)

    def layout(self) -> Layout:
        return Layout(tensor=self.tensor, pipeline=len(self.stage_layers), data=1,
                      stage_layers=tuple(self.stage_layers), sequence_parallel=False, distributed_optimizer=False)

    def stage_of(self, parameter: str) -> int:
        if parameter.startswith("layers."):
            layer, end = int(parameter.split(".")[1]), 0
            for stage, size in enumerate(self.stage_layers):
                end += size
                if layer < end:
                    return stage
        return 0 if parameter.startswith("embedding") else len(self.stage_layers) - 1

    def write_group(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Write a group of global tensors (checkpoint names); returns the files written."""
        written = []
        for rank in range(self.tensor):
            pieces, index = {}, []
            for name, full in tensors.items():
                parameter = keys.parameter_of(name)
                spec = self.shard_specs[rank].get(parameter)
                if spec is None and rank:
                    continue  # replicated: the first rank's file has it
                if spec is not None and tuple(full.shape) != spec.global_shape:
                    raise ValueError(f"{name} has shape {list(full.shape)}, the model's is {list(spec.global_shape)}")
                for part, (offsets, box) in enumerate(state.boxes(spec.take(full) if spec else full, spec)):
                    key = keys.piece_key(name, part)
                    pieces[key] = box.contiguous()
                    index.append(Piece(name, key, tuple(offsets), tuple(box.shape), tuple(full.shape), str(full.dtype)))
            if not pieces:
                continue
            stage = self.stage_of(keys.parameter_of(next(iter(tensors))))
            file = f"shard_pp{stage:03d}_tp{rank:03d}_{len(self.reports):05d}.safetensors"
            result = write_safetensors(os.path.join(self.staged, file), pieces)
            self.reports.append(FileReport(file, result.bytes, result.crc32, tuple(index)))
            written.append(file)
        return written

    def finish(self, metadata: TrainingMetadata) -> str:
        """Write the manifest and ``metadata`` under this writer's layout(), rename into place and move the
        tracker; returns the directory."""
        publish_checkpoint(self.root, self.iteration, self.reports, replace(metadata, layout=self.layout()))
        return layout.iteration_dir(self.root, self.iteration)


def converted_metadata(config: ModelConfig, source: str, dtype: torch.dtype, target: Layout) -> TrainingMetadata:
    """Training state of a checkpoint that starts training (nothing consumed, no optimizer state), written
    under the ``target`` layout."""
    return TrainingMetadata(consumed_samples=0, skipped_iterations=0, optimizer_steps=0, loss_scaler=None,
                            learning_rate=None, config=config_to_dict(config), tokenizer=None, layout=target,
                            params_dtype=str(dtype).removeprefix("torch."), converted_from=source)
