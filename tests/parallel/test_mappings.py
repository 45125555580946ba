"""Every autograd collective, forward and backward, on 2 ranks."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.layers import column_parallel_linear
from longctx_megatron.parallel.state import initialize_parallel
from tests.distributed import run_on_ranks


def _mappings_body(rank, world_size):
    ctx = initialize_parallel(tensor=world_size, backend="gloo")
    group = ctx.tp_group
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(2, 6, 4, generator=generator)
    upstream = torch.randn(2, 6, 4, generator=generator)
    total = sum(range(1, world_size + 1))  # rank r scales its contribution by r + 1
    mine_seq = full.chunk(world_size, 1)[rank]

    def run(fn, x, grad):
        x = x.clone().requires_grad_()
        y = fn(x, group)
        y.backward(grad)
        return y.detach(), x.grad

    y, g = run(mappings.copy_to_tensor_model_parallel_region, full, upstream * (rank + 1))
    torch.testing.assert_close(y, full)
    torch.testing.assert_close(g, upstream * total)
    y, g = run(mappings.reduce_from_tensor_model_parallel_region, full * (rank + 1), upstream)
    torch.testing.assert_close(y, full * total)
    torch.testing.assert_close(g, upstream)
    # A column-parallel projection under sequence parallelism: all-gather forward, reduce-scatter of the
    # input gradient backward, and only this rank's shard of the input kept for backward.
    weight = torch.randn(3, 4, generator=generator, requires_grad=True)
    saved = []
    x = mine_seq.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = column_parallel_linear(x, weight, group, sequence_parallel=True)
    grad_y = torch.randn(2, 6, 3, generator=generator) * (rank + 1)
    y.backward(grad_y)
    torch.testing.assert_close(y, full @ weight.detach().t())
    torch.testing.assert_close(x.grad, (grad_y @ weight.detach() * total / (rank + 1)).chunk(world_size, 1)[rank])
    torch.testing.assert_close(weight.grad, grad_y.flatten(0, 1).t() @ full.flatten(0, 1))
    assert sorted(saved) == sorted([mine_seq.numel(), weight.numel()])  # not the gathered sequence
    y, g = run(mappings.reduce_scatter_to_sequence_parallel_region, full * (rank + 1),
               upstream.chunk(world_size, 1)[rank])
    torch.testing.assert_close(y, (full * total).chunk(world_size, 1)[rank])
    torch.testing.assert_close(g, upstream)
    # One sample (the long-context case) takes the no-copy path of both sequence collectives.
    one = full[:1]
    torch.testing.assert_close(mappings.all_gather(one.chunk(world_size, 1)[rank], 1, group), one)
    torch.testing.assert_close(mappings.reduce_scatter(one * (rank + 1), 1, group),
                               (one * total).chunk(world_size, 1)[rank])
    return True


@pytest.mark.slow
def test_mappings():
    assert all(run_on_ranks(_mappings_body, 2))
