"""The rules shared by the data path, the model and the trainer for packed documents: a token's
position within its document, and the documents' lengths, from per-token document ids
(non-decreasing along the last dimension).

The data path derives ``--reset-position-ids`` from it (data/documents.py); the model derives the
document-relative positions its attention patterns use (model/attention/patterns.Documents). Both
sit on top of this module, so the two can never disagree about where a document starts.
"""

from __future__ import annotations

import torch


def document_positions(ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document (int64, along the last dim): t minus the index of
    the first token whose id equals its own."""
    positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    is_start = torch.ones_like(ids, dtype=torch.bool)
    is_start[..., 1:] = ids[..., 1:] != ids[..., :-1]
    starts = torch.where(is_start, positions, torch.zeros_like(positions))
    return positions - torch.cummax(starts, dim=-1).values


def document_lengths(ids: torch.Tensor) -> list[list[int]]:
    """The lengths of each row's documents in order, from (B, T) document ids."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in ids.cpu()]
