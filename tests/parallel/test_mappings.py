"""Every autograd collective, forward and backward, on 2 ranks."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.parallel import mappings
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
    y, g = run(mappings.gather_from_sequence_parallel_region, mine_seq, upstream * (rank + 1))
    torch.testing.assert_close(y, full)
    torch.testing.assert_close(g, (upstream * total).chunk(world_size, 1)[rank])
    y, g = run(mappings.reduce_scatter_to_sequence_parallel_region, full * (rank + 1),
               upstream.chunk(world_size, 1)[rank])
    torch.testing.assert_close(y, (full * total).chunk(world_size, 1)[rank])
    torch.testing.assert_close(g, upstream)
    return True


@pytest.mark.slow
def test_mappings():
    assert all(run_on_ranks(_mappings_body, 2))
