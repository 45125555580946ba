"""Vocab-parallel cross entropy and embedding against their single-process definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.model.loss import reduce_token_losses
from longctx_megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from longctx_megatron.parallel.layers import VocabParallelEmbedding
from longctx_megatron.parallel.state import initialize_parallel
from tests.distributed import run_on_ranks

VOCAB = 300  # not a multiple of TP x 128: the last shard holds padding


def _data():
    generator = torch.Generator().manual_seed(0)
    padded = padded_vocab_size(VOCAB, 4)
    logits = torch.randn(3, 10, padded, generator=generator) * 4
    labels = torch.randint(0, VOCAB, (3, 10), generator=generator)
    labels[1, 2:5] = -100
    loss_mask = (torch.rand(3, 10, generator=generator) > 0.3).float()
    grad = torch.randn(3, 10, generator=generator)
    return logits, labels, loss_mask, grad


def _cross_entropy_body(rank, world_size):
    ctx = initialize_parallel(tensor=world_size, backend="gloo")
    logits, labels, loss_mask, grad = _data()
    padded = padded_vocab_size(VOCAB, world_size)
    logits = logits[..., :padded]
    full = logits[..., :VOCAB].clone().requires_grad_()
    want = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100).view(3, 10)
    want_mean = reduce_token_losses(want, labels, loss_mask)
    (want * grad).sum().backward()

    local_size = padded // world_size
    local = logits[..., rank * local_size:(rank + 1) * local_size].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, labels, ctx.tp_group, rank * local_size, VOCAB)
    (got * grad).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[1, 2:5] == 0).all()
    torch.testing.assert_close(reduce_token_losses(got, labels, loss_mask), want_mean, rtol=1e-6, atol=1e-6)
    want_grad = torch.cat([full.grad, torch.zeros(3, 10, padded - VOCAB)], dim=-1)
    torch.testing.assert_close(local.grad, want_grad[..., rank * local_size:(rank + 1) * local_size],
                               rtol=1e-6, atol=1e-7)
    assert (local.grad[1, 2:5] == 0).all()  # ignored labels: no gradient
    assert torch.equal(local.detach(), logits[..., rank * local_size:(rank + 1) * local_size])  # input untouched

    # 16-bit logits: the loss is computed in one fp32 copy, so it equals the fp32 loss of the rounded logits.
    for dtype in (torch.bfloat16, torch.float16):
        rounded = logits.to(dtype)
        reference = rounded[..., :VOCAB].float().requires_grad_()
        want16 = F.cross_entropy(reference.flatten(0, 1), labels.flatten(), reduction="none",
                                 ignore_index=-100).view(3, 10)
        (want16 * grad).sum().backward()
        local16 = rounded[..., rank * local_size:(rank + 1) * local_size].clone().requires_grad_()
        got16 = vocab_parallel_cross_entropy(local16, labels, ctx.tp_group, rank * local_size, VOCAB)
        (got16 * grad).sum().backward()
        torch.testing.assert_close(got16, want16, rtol=1e-6, atol=1e-6)
        want16_grad = torch.cat([reference.grad, torch.zeros(3, 10, padded - VOCAB)], dim=-1)
        assert local16.grad.dtype == dtype
        torch.testing.assert_close(local16.grad.float(), want16_grad[..., rank * local_size:(rank + 1) * local_size],
                                   rtol=1e-2, atol=1e-3)

    embedding = VocabParallelEmbedding(VOCAB, 8, ctx)
    table = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding.weight.copy_(embedding.weight_shard.take(table))
    torch.testing.assert_close(embedding(labels.clamp_min(0)), F.embedding(labels.clamp_min(0), table))
    return True


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cross_entropy_and_embedding(world_size):
    assert all(run_on_ranks(_cross_entropy_body, world_size))


def test_single_rank_cross_entropy_matches_torch():
    """With one rank the parallel loss is plain cross entropy with padding columns excluded."""
    import torch.distributed as dist

    logits, labels, _, grad = _data()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        got = vocab_parallel_cross_entropy(logits, labels, dist.group.WORLD, 0, VOCAB)
    finally:
        dist.destroy_process_group()
    want = F.cross_entropy(logits[..., :VOCAB].flatten(0, 1), labels.flatten(), reduction="none").view(3, 10)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
