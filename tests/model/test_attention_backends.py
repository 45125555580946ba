"""Every attention backend against the dense oracle built from patterns.py: forward and gradients."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.backends.base import BackendUnavailable
from longctx_megatron.model.attention.patterns import DilatedPattern, FullPattern, SlidingPattern

REFERENCE = factory.create("reference")
CHUNKED = factory.create("chunked")

# (pattern, T, n_heads, n_kv_heads): windows smaller, equal and larger than T, T not a multiple
# of the window or the dilation, GQA 4:1, 2:1 and 1:1, global tokens dense and sparse.
CASES = [
    (FullPattern(), 37, 4, 1),
    (FullPattern(), 16, 2, 2),
    (SlidingPattern(8), 37, 4, 1),
    (SlidingPattern(8), 8, 2, 2),
    (SlidingPattern(16), 5, 4, 2),
    (SlidingPattern(7, 5), 41, 4, 2),
    (SlidingPattern(8, 16), 64, 4, 1),
    (SlidingPattern(64, 4), 13, 2, 2),
    (SlidingPattern(1, 3), 20, 2, 1),
    (DilatedPattern(3, 2, group_size=2), 37, 4, 2),
    (DilatedPattern(4, 3, group_size=1, first_kv_head=1), 40, 3, 3),
    (DilatedPattern(2, 4, group_size=2), 7, 8, 4),
    (DilatedPattern(5, 4, group_size=4, first_kv_head=2), 50, 8, 2),
    (DilatedPattern(16, 2, group_size=1), 9, 2, 2),
]


def _inputs(pattern, seq_len, n_heads, n_kv, dtype=torch.float32, batch=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, seq_len, head_dim, generator=generator).to(dtype).requires_grad_()
    k = torch.randn(batch, n_kv, seq_len, head_dim, generator=generator).to(dtype).requires_grad_()
    v = torch.randn(batch, n_kv, seq_len, head_dim, generator=generator).to(dtype).requires_grad_()
    return q, k, v


def _forward_backward(backend, pattern, q, k, v, grad_out):
    out = backend.attend(q, k, v, pattern)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


@pytest.mark.parametrize("pattern,seq_len,n_heads,n_kv", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_chunked_matches_reference(pattern, seq_len, n_heads, n_kv, dtype, tol):
    q, k, v = _inputs(pattern, seq_len, n_heads, n_kv, dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_out, ref_grads = _forward_backward(REFERENCE, pattern, q, k, v, grad_out)
    out, grads = _forward_backward(CHUNKED, pattern, q, k, v, grad_out)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=tol * 5, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize(
    "pattern",
    [SlidingPattern(3, 4), DilatedPattern(2, 3, group_size=2, first_kv_head=1), FullPattern()],
    ids=str,
)
def test_chunked_gradcheck_float64(pattern):
    q, k, v = _inputs(pattern, 11, 4, 2, torch.float64, batch=1, head_dim=4)
    assert torch.autograd.gradcheck(lambda *t: CHUNKED.attend(*t, pattern), (q, k, v))


@pytest.mark.parametrize("pattern,seq_len,n_heads,n_kv", CASES, ids=lambda c: str(c))
def test_flex_forward_matches_reference_on_cpu(pattern, seq_len, n_heads, n_kv):
    """FlexAttention runs eagerly (forward only) on CPU: enough to check its masks and LSE merge."""
    q, k, v = (t.detach() for t in _inputs(pattern, seq_len, n_heads, n_kv))
    torch.testing.assert_close(
        factory.create("flex").attend(q, k, v, pattern), REFERENCE.attend(q, k, v, pattern), atol=2e-6, rtol=2e-6
    )


@pytest.mark.parametrize("pattern,seq_len,n_heads,n_kv", CASES, ids=lambda c: str(c))
def test_rows_are_convex_combinations(pattern, seq_len, n_heads, n_kv):
    """With every value equal to 1 each output is the sum of its attention row: 1, or 0 if it sees no key."""
    q, k, _ = _inputs(pattern, seq_len, n_heads, n_kv)
    v = torch.ones_like(k)
    sees_keys = torch.stack([pattern.keys_per_query(seq_len, h) > 0 for h in range(n_heads)]).float()
    for backend in (REFERENCE, CHUNKED):
        out = backend.attend(q, k, v, pattern)
        torch.testing.assert_close(out, sees_keys[None, :, :, None].expand_as(out), atol=1e-6, rtol=0)


def test_empty_rows_give_zero_output_and_finite_gradients():
    """Dilated heads with offset s see nothing before position s; T=1 is all such rows for s > 0."""
    pattern = DilatedPattern(4, 4, group_size=1)
    for seq_len in (1, 3):
        q, k, v = _inputs(pattern, seq_len, 4, 4)
        for backend in (REFERENCE, CHUNKED):
            out = backend.attend(q, k, v, pattern)
            assert out[:, 1:, 0].abs().max() == 0  # heads 1..3 at position 0: no key
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("pattern", [FullPattern(), SlidingPattern(6, 4), DilatedPattern(3, 2, group_size=2)], ids=str)
def test_extreme_logits_stay_finite(pattern):
    q, k, v = _inputs(pattern, 30, 4, 2)
    with torch.no_grad():
        q.mul_(1e3)
        k.mul_(1e3)
    for backend in (REFERENCE, CHUNKED):
        out = backend.attend(q, k, v, pattern)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(g).all() for g in grads)


def test_single_token_sequence():
    for pattern in (FullPattern(), SlidingPattern(4, 2), DilatedPattern(2, 2, group_size=1)):
        q, k, v = _inputs(pattern, 1, 2, 2)
        torch.testing.assert_close(CHUNKED.attend(q, k, v, pattern), REFERENCE.attend(q, k, v, pattern))


def test_deterministic():
    pattern = SlidingPattern(8, 4)
    q, k, v = _inputs(pattern, 33, 4, 2)
    first = CHUNKED.attend(q, k, v, pattern)
    assert torch.equal(first, CHUNKED.attend(q, k, v, pattern))


def test_attention_dropout_only_when_asked():
    pattern = SlidingPattern(8, 4)
    q, k, v = _inputs(pattern, 33, 4, 2)
    plain = CHUNKED.attend(q, k, v, pattern)
    torch.manual_seed(0)
    dropped = CHUNKED.attend(q, k, v, pattern, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(dropped, CHUNKED.attend(q, k, v, pattern, dropout_p=0.5))
    assert not torch.allclose(dropped, plain)


def test_factory_registry_and_errors():
    assert {"reference", "chunked", "flex", "flash"} <= set(factory.list_variants())
    with pytest.raises(BackendUnavailable, match="unknown attention backend 'nope'; known: auto, .*chunked"):
        factory.create("nope")
    with pytest.raises(ValueError, match="already registered"):
        factory.register_variant("chunked", factory.ChunkedBackend)

    class Doubled(factory.ChunkedBackend):
        name = "doubled"

    factory.register_variant("doubled-test", Doubled)
    try:
        assert isinstance(factory.create("doubled-test"), Doubled)
        assert "doubled-test" in factory.list_variants()
    finally:
        factory.register_variant("doubled-test", factory.ChunkedBackend, replace=True)


def test_selection_on_cpu():
    q, k, v = _inputs(FullPattern(), 8, 2, 2)
    assert factory.select("auto", SlidingPattern(4, 2), q).name == "chunked"
    with pytest.raises(BackendUnavailable, match="no backward pass on CPU; use 'chunked'"):
        factory.select("flex", SlidingPattern(4), q)
    with pytest.raises(BackendUnavailable, match="flash"):
        factory.select("flash", FullPattern(), q)


@pytest.mark.parametrize("pattern", [SlidingPattern(4), SlidingPattern(4, 2), DilatedPattern(3, 2, group_size=2)],
                         ids=str)
def test_auto_picks_only_a_backend_that_runs_the_layer_with_its_dropout(monkeypatch, pattern):
    """CUDA's order (flash, flex, chunked) on CPU inputs without grad, where flex can run: with
    attention dropout 'auto' must pass over flex, which has none, instead of picking it and raising."""
    monkeypatch.setitem(factory.AUTO_ORDER, "cpu", factory.AUTO_ORDER["cuda"])
    q, k, v = _inputs(pattern, 8, 2, 2)
    q, k, v = q.detach(), k.detach(), v.detach()
    assert factory.select("auto", pattern, q).name == "flex"
    backend = factory.select("auto", pattern, q, dropout_p=0.1)
    assert backend.name == "chunked"
    torch.manual_seed(0)
    out = backend.attend(q, k, v, pattern, dropout_p=0.1)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert factory.select("auto", FullPattern(), q, dropout_p=0.1).name == "flex"  # causal SDPA has dropout
    with pytest.raises(BackendUnavailable, match="FlexAttention has no attention dropout"):
        factory.select("flex", pattern, q, dropout_p=0.1)


@pytest.mark.parametrize(
    "pattern", [SlidingPattern(4, 3), DilatedPattern(3, 2, group_size=2, first_kv_head=1)], ids=str
)
def test_recomputed_blocks_in_many_groups_match_reference(monkeypatch, pattern):
    """Force one query block per group so the grouped forward/backward loops really iterate."""
    from longctx_megatron.model.attention.backends import recompute

    monkeypatch.setattr(recompute, "SCORES_PER_GROUP", 1)
    q, k, v = _inputs(pattern, 23, 4, 2)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = _forward_backward(REFERENCE, pattern, q, k, v, grad_out)
    out, grads = _forward_backward(CHUNKED, pattern, q, k, v, grad_out)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=2e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=2e-6)
