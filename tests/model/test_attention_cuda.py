"""GPU backends (flex compiled, flash) against the oracle, forward and gradients. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.patterns import DilatedPattern, FullPattern, SlidingPattern

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [
    (FullPattern(), 300),
    (SlidingPattern(128), 700),
    (SlidingPattern(100, 64), 650),
    (DilatedPattern(64, 4, group_size=2), 600),
]


@pytest.mark.parametrize("backend_name", ["flex", "flash"])
@pytest.mark.parametrize("pattern,seq_len", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_gpu_backend_matches_reference(backend_name, pattern, seq_len, dtype, tol):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(dtype).requires_grad_()

    q, k, v = rand(2, 8, seq_len, 64), rand(2, 4, seq_len, 64), rand(2, 4, seq_len, 64)
    backend = factory.create(backend_name)
    reason = backend.unsupported_reason(pattern, q)
    if reason is not None:
        pytest.skip(reason)
    grad_out = torch.randn(q.shape, device="cuda", generator=generator).to(dtype)
    reference = factory.create("reference")
    want = reference.attend(q, k, v, pattern)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    got = backend.attend(q, k, v, pattern)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 5, rtol=tol)
