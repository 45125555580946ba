"""The language-model head: logits from the final hidden states and the (tied) output weight, and the loss.

It is a module of its own so that tensor parallelism can swap it for the vocab-parallel head, which
computes the same loss without gathering full-vocabulary logits on one rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels with this value contribute no loss (as in F.cross_entropy)


class LanguageModelHead(torch.nn.Module):
    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = F.linear(hidden, weight)
        if labels is None:
            return logits, None
        return logits, masked_mean(per_token_cross_entropy(logits, labels), labels, loss_mask)


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float32 next-token cross entropy for every position, shape of ``labels`` (0 where ignored)."""
    losses = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    return losses.view(labels.shape)


def masked_mean(losses: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the positions whose label is not ignored and whose ``loss_mask`` is nonzero."""
    weight = (labels != IGNORE_INDEX).float()
    if loss_mask is not None:
        weight = weight * loss_mask.float()
    return (losses * weight).sum() / weight.sum().clamp_min(1.0)
