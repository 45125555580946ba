"""Which tokens count in the loss and how token losses become a batch's loss: the one definition.

Used by the heads (plain and vocab-parallel), by the pipeline schedule (which differentiates each
micro-batch's token mean or token-loss sum) and by the trainer (the global batch's token count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels with this value contribute no loss (as in F.cross_entropy)
LOSS_REDUCTIONS = ("mean", "sum")


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float32 next-token cross entropy for every position, shape of ``labels`` (0 where ignored)."""
    losses = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    return losses.view(labels.shape)


def loss_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Float32 weight of each position in the loss: 0 where the label is ignored or ``loss_mask`` is 0.
    The one definition of which tokens count (the loss, and the token count of per-token loss)."""
    weight = (labels != IGNORE_INDEX).float()
    return weight * loss_mask.float() if loss_mask is not None else weight


def token_mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A batch's token-loss sum ``total`` as a mean over the tokens that count (``weight`` from
    ``loss_weights``; at least 1, so a fully masked batch gives 0)."""
    return total / weight.sum().clamp_min(1.0)


def reduce_token_losses(losses: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                        reduction: str = "mean") -> torch.Tensor:
    """The loss of a batch from its per-token losses: their weighted ``"mean"`` (over the tokens that
    count) or ``"sum"`` (a per-token loss: the caller divides by the token count of the global batch)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction {reduction!r} is not one of {LOSS_REDUCTIONS}")
    weight = loss_weights(labels, loss_mask)
    total = (losses * weight).sum()
    return total if reduction == "sum" else token_mean(total, weight)
