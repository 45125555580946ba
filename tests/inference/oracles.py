"""The references the inference tests compare against: a checkpoint's model on one process with the
dense reference backend, and greedy generation by repeated full forward passes (no cache)."""

from __future__ import annotations

import torch

from longctx_megatron.checkpoint import layout, state
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.config.serialization import config_from_dict
from longctx_megatron.model.build import build_model
from tests.checkpoint.test_convert import _single_ctx


def reference_model(root: str):
    """The newest checkpoint under ``root`` in one process, attention by the dense oracle."""
    reader = CheckpointReader(layout.iteration_dir(root, layout.read_tracker(root)))
    model = build_model(config_from_dict(reader.metadata["config"]), attention_backend="reference").eval()
    state.load([model], None, _single_ctx(), torch.device("cpu"), reader, 0, False, False)
    reader.close()
    return model


def greedy_by_full_forward(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0][0, -1].argmax()))
    return tokens[len(prompt):]
