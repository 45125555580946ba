"""GPU backends (flex compiled, flash) against the oracle, forward and gradients. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.patterns import DilatedPattern, Documents, FullPattern, SlidingPattern

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


def _documents(batch, seq_len, generator):
    """Random document boundaries, including documents shorter than the windows and an empty one."""
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="cuda")
    for b in range(batch):
        cuts = torch.randperm(seq_len - 1, device="cuda", generator=generator)[:9] + 1
        for cut in [*cuts.tolist(), int(cuts[0])]:  # the repeated cut skips a document index: an empty one
            ids[b, cut:] += 1
    return Documents(ids)


@pytest.mark.parametrize("backend_name", ["flex", "flash"])
@pytest.mark.parametrize("pattern,seq_len", CASES, ids=lambda c: str(c))
def test_gpu_backend_with_documents_matches_reference_bf16(backend_name, pattern, seq_len):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()

    q, k, v = rand(2, 8, seq_len, 64), rand(2, 4, seq_len, 64), rand(2, 4, seq_len, 64)
    documents = _documents(2, seq_len, generator)
    backend = factory.create(backend_name)
    reason = backend.unsupported_reason(pattern, q, 0.0, documents)
    if reason is not None:
        pytest.skip(reason)
    grad_out = torch.randn(q.shape, device="cuda", generator=generator).to(torch.bfloat16)
    reference = factory.create("reference")
    want = reference.attend(q, k, v, pattern, 0.0, documents)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    got = backend.attend(q, k, v, pattern, 0.0, documents)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0.15, rtol=3e-2)
