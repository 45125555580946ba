"""The language-model head: logits from the final hidden states and the (tied) output weight, and the loss.

It is a module of its own so that tensor parallelism can swap it for the vocab-parallel head, which
computes the same loss without gathering full-vocabulary logits on one rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_megatron.model.loss import per_token_cross_entropy, reduce_token_losses


class LanguageModelHead(torch.nn.Module):
    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = F.linear(hidden, weight)
        if labels is None:
            return logits, None
        return logits, reduce_token_losses(per_token_cross_entropy(logits, labels), labels, loss_mask, loss_reduction)
