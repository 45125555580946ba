"""Cross entropy over vocabulary-parallel logits, without gathering the full vocabulary anywhere.

Each rank holds logits for a contiguous slice of the (padded) vocabulary. Three all-reduces over
(B, T) tensors (max, target logit, sum of exponentials) give the exact loss; the backward pass is
local (softmax minus one-hot). Columns past the true vocabulary (padding for divisibility) are
excluded, and labels equal to IGNORE_INDEX give zero loss and zero gradient, as F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.model.loss import IGNORE_INDEX
from longctx_megatron.parallel.mappings import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, vocab_size):
        local_vocab = logits.shape[-1]
        real = max(0, min(local_vocab, vocab_size - vocab_start))  # columns of this shard that are not padding
        # One fp32 working copy (the caller's logits are returned, so never changed), turned in place
        # into shifted logits, then exponentials, then the softmax that backward needs: a second and
        # third logits-sized fp32 tensor would be 8 bytes per logit more at the peak.
        work = logits.float() if logits.dtype != torch.float32 else logits.clone()
        work[..., real:] = float("-inf")
        row_max = work.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        work.sub_(row_max[..., None])
        elsewhere = (labels < vocab_start) | (labels >= vocab_start + local_vocab)
        local_labels = (labels - vocab_start).masked_fill(elsewhere, 0)
        target = work.gather(-1, local_labels[..., None]).squeeze(-1).masked_fill(elsewhere, 0.0)
        target = all_reduce(target, group)
        softmax = work.exp_()
        sum_exp = all_reduce(softmax.sum(dim=-1), group)
        ignored = labels == IGNORE_INDEX
        loss = (torch.log(sum_exp) - target).masked_fill(ignored, 0.0)
        softmax.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, elsewhere, ignored, local_labels)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, elsewhere, ignored, local_labels = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - onehot(label), zero for ignored labels
        grad.scatter_add_(-1, local_labels[..., None], -(~elsewhere).to(grad.dtype)[..., None])
        grad.mul_(grad_loss.masked_fill(ignored, 0.0)[..., None])
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """Per-token float32 loss (shape of ``labels``) from this rank's logits slice [vocab_start, +local).

    ``vocab_size`` is the true vocabulary; columns at or beyond it are padding and never win.
    """
    return _VocabParallelCrossEntropy.apply(logits, labels, group, vocab_start, vocab_size)
