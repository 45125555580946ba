"""Packed documents (--reset-attention-mask): every pattern and backend against the dense oracle,
and the oracle itself against attention on each document alone.

Document layouts: none; random boundaries with documents shorter than the window; a boundary inside a
block; a boundary at a global position; empty documents (a document index that is skipped); one
token per document. GQA 4:1 and 1:1, fp32 tight and bf16 loose, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.backends import chunked, flash
from longctx_megatron.model.attention.backends.base import BackendUnavailable
from longctx_megatron.model.attention.patterns import (
    DilatedPattern,
    Documents,
    FullPattern,
    SlidingPattern,
    dense_mask,
    keys_per_query_in_documents,
)

REFERENCE, CHUNKED, FLEX = (factory.create(name) for name in ("reference", "chunked", "flex"))
SEQ_LEN = 40

# Every pattern kind; windows shorter and longer than the documents; dilation 2 and 3 with offsets.
PATTERNS = [FullPattern(), SlidingPattern(8), SlidingPattern(8, 4), SlidingPattern(16, 5),
            DilatedPattern(3, 2, group_size=1), DilatedPattern(4, 3, group_size=4, first_kv_head=1)]


def _layout(name: str, batch: int = 2) -> Documents | None:
    """document ids (B, T) for a named layout; None is one document per sample."""
    if name == "none":
        return None
    starts = {"random": None, "inside-block": [3, 13, 22], "at-global": [4, 8, 20, 36],
              "empty-documents": [5, 5, 5, 30], "one-token": list(range(1, SEQ_LEN))}[name]
    rows = []
    for b in range(batch):
        cuts = starts if starts is not None else sorted(
            torch.randperm(SEQ_LEN - 1, generator=torch.Generator().manual_seed(b))[:6].add(1).tolist())
        ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        for cut in cuts[b % 2:] if name == "inside-block" else cuts:  # the samples differ
            ids[cut:] += 1
        rows.append(ids)
    return Documents(torch.stack(rows))


LAYOUTS = ["none", "random", "inside-block", "at-global", "empty-documents", "one-token"]


def _inputs(n_heads, n_kv, dtype, seed=0, batch=2, head_dim=8):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, SEQ_LEN, head_dim, generator=generator).to(dtype).requires_grad_()
            for heads in (n_heads, n_kv, n_kv)]


def _run(backend, pattern, q, k, v, documents, grad_out):
    out = backend.attend(q, k, v, pattern, 0.0, documents)
    return out, torch.autograd.grad(out, (q, k, v), grad_out)


def _heads(pattern) -> tuple[int, int]:
    group = pattern.group_size if isinstance(pattern, DilatedPattern) else 4
    return (group * 2, 2) if group > 1 else (2, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_chunked_matches_the_oracle_forward_and_backward(pattern, layout, dtype, tol):
    n_heads, n_kv = _heads(pattern)
    documents = _layout(layout)
    q, k, v = _inputs(n_heads, n_kv, dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want, want_grads = _run(REFERENCE, pattern, q, k, v, documents, grad_out)
    got, got_grads = _run(CHUNKED, pattern, q, k, v, documents, grad_out)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 5, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_flex_forward_matches_the_oracle_on_cpu(pattern, layout):
    n_heads, n_kv = _heads(pattern)
    documents = _layout(layout)
    q, k, v = (x.detach() for x in _inputs(n_heads, n_kv, torch.float32))
    torch.testing.assert_close(FLEX.attend(q, k, v, pattern, 0.0, documents),
                               REFERENCE.attend(q, k, v, pattern, 0.0, documents), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_the_oracle_is_attention_on_each_document_alone(pattern):
    """Independent of the mask rule's code: a document's rows equal the pattern run on that document
    as a sequence of its own (so global positions count from its start and its place does not matter)."""
    n_heads, n_kv = _heads(pattern)
    documents = _layout("random")
    q, k, v = (x.detach().double() for x in _inputs(n_heads, n_kv, torch.float32))
    packed = REFERENCE.attend(q, k, v, pattern, 0.0, documents)
    for b in range(q.shape[0]):
        start = 0
        for length in documents.lengths(b):
            piece = slice(start, start + length)
            alone = REFERENCE.attend(q[b:b + 1, :, piece], k[b:b + 1, :, piece], v[b:b + 1, :, piece], pattern)
            torch.testing.assert_close(packed[b:b + 1, :, piece], alone, atol=1e-12, rtol=1e-12)
            start += length


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_key_counts_in_closed_form_follow_the_documents(pattern):
    documents = _layout("random")
    n_heads = _heads(pattern)[0]
    mask = dense_mask(pattern, SEQ_LEN, n_heads, documents=documents)
    for head in range(n_heads):
        assert torch.equal(mask[:, head].sum(-1), keys_per_query_in_documents(pattern, documents, head))


def test_documents_positions_and_lengths():
    documents = Documents(torch.tensor([[0, 0, 0, 2, 2, 3], [0, 1, 1, 1, 1, 1]]))
    assert documents.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    assert documents.lengths(0) == [3, 2, 1] and documents.lengths(1) == [1, 5]
    with pytest.raises(ValueError, match="int64 \\(B, T\\)"):
        Documents(torch.zeros(6, dtype=torch.long))


def _flash_varlen_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           causal=False, window_size=(-1, -1)):
    """flash_attn_varlen_func's documented contract in plain torch, one sequence at a time: tokens
    (total, heads, D), sequences delimited by int32 cu_seqlens, positions counted from each sequence's
    start, GQA by head groups, window_size (left, right) inclusive. Checks the caller's arguments."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert int(cu_seqlens_q[0]) == 0 and int(cu_seqlens_q[-1]) == q.shape[0] == k.shape[0]
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert min(lengths) > 0 and max(lengths) == max_seqlen_q == max_seqlen_k
    assert causal and dropout_p == 0.0 and window_size[1] in (-1, 0)
    group = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True):
        qs = q[start:end].transpose(0, 1).float()
        ks, vs = (x[start:end].transpose(0, 1).float().repeat_interleave(group, 0) for x in (k, v))
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
        visible = (j <= i) & ((i - j <= window_size[0]) if window_size[0] >= 0 else True)
        scores = (qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("pattern", [FullPattern(), SlidingPattern(8), SlidingPattern(3)], ids=str)
@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (2, 2)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_flash_varlen_layout_matches_the_oracle(pattern, layout, n_heads, n_kv, dtype, tol, monkeypatch):
    """The flash path's part that runs without CUDA: flattening, cu_seqlens, window_size and the way
    back, through a stand-in with flash_attn_varlen_func's contract (the kernel itself: the GPU test)."""
    monkeypatch.setattr(flash, "flash_attn_varlen_func", _flash_varlen_stand_in)
    backend = flash.FlashBackend()
    monkeypatch.setattr(backend, "unsupported_reason", lambda *args: None)  # the CUDA and dtype checks
    documents = _layout(layout)
    q, k, v = _inputs(n_heads, n_kv, dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = backend.attend(q, k, v, pattern, 0.0, documents)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    want, want_grads = _run(REFERENCE, pattern, q, k, v, documents, grad_out)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 5, rtol=tol)


@pytest.mark.parametrize("pattern,cut", [(SlidingPattern(64), 9), (SlidingPattern(64, 4), 9), (SlidingPattern(5), 5),
                                         (DilatedPattern(64, 2), 5), (DilatedPattern(64, 3), 3)], ids=str)
def test_a_window_longer_than_every_document_is_cut_to_the_longest(pattern, cut, monkeypatch):
    """No block scores keys that no query of a document can see: with documents of at most 9 tokens a
    window of 64 becomes 9 (dilation r: (9 - 1) // r + 1 keys per residue class), and stays exact."""
    documents = Documents(torch.tensor([[0] * 9 + [1] * 7 + [2] * 9 + [3] * 7] * 2))
    windows = []
    real = chunked.sdpa_window_attention
    monkeypatch.setattr(chunked, "sdpa_window_attention", lambda q, k, v, window, *rest: windows.append(window) or real(
        q, k, v, window, *rest))
    q, k, v = (torch.randn(2, 2, 32, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3))
    got = CHUNKED.attend(q, k, v, pattern, 0.0, documents)
    torch.testing.assert_close(got, REFERENCE.attend(q, k, v, pattern, 0.0, documents), atol=2e-6, rtol=2e-6)
    assert windows and set(windows) == {cut}


def test_flash_takes_documents_only_where_it_can_express_the_layer_and_auto_never_drops_them():
    q = torch.zeros(1, 2, 8, 4)
    flash = factory.create("flash")
    documents = _layout("random", 1)
    for pattern in (SlidingPattern(4, 2), DilatedPattern(3, 2)):  # refused on every device
        assert flash.unsupported_reason(pattern, q, 0.0, documents) is not None
    with pytest.raises(BackendUnavailable):
        flash.check(SlidingPattern(4), q, 0.0, documents)  # here: no CUDA
    assert factory.select("auto", SlidingPattern(4), q, 0.0, documents) is CHUNKED  # CPU


# ----------------------------------------------------------------------------------- the whole model
def _model():
    from longctx_megatron.config import ModelConfig
    from longctx_megatron.model.build import build_model

    config = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=97,
                         max_seq_len=128, sliding_window=8, global_every=4, dilated_window=4, dilation=2)
    return build_model(config, attention_backend="chunked").eval()  # sliding+global, dilated, full


def _packed(lengths: list[int], tokens: list[torch.Tensor]):
    """(input ids (1, T), document ids (1, T), reset position ids (1, T)) of documents in this order."""
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return torch.cat(tokens)[None], ids, positions


def test_changing_one_document_leaves_the_others_logits_bit_identical():
    model = _model()
    generator = torch.Generator().manual_seed(0)
    lengths = [13, 21, 9]
    docs = [torch.randint(0, 97, (n,), generator=generator) for n in lengths]
    tokens, ids, positions = _packed(lengths, docs)
    changed = _packed(lengths, [torch.randint(0, 97, (13,), generator=generator)] + docs[1:])[0]
    with torch.no_grad():
        before = model(tokens, position_ids=positions, document_ids=ids)[0]
        after = model(changed, position_ids=positions, document_ids=ids)[0]
        unmasked = model(changed, position_ids=positions)[0]
    assert torch.equal(before[:, 13:], after[:, 13:])
    assert not torch.equal(before[:, 13:], unmasked[:, 13:])  # without the mask document 1 leaks into 2


@pytest.mark.parametrize("reset_positions", [True, False], ids=["reset-position-ids", "absolute-positions"])
def test_a_documents_logits_do_not_depend_on_where_it_was_packed(reset_positions):
    model = _model()
    generator = torch.Generator().manual_seed(1)
    lengths = [11, 17, 6]
    docs = [torch.randint(0, 97, (n,), generator=generator) for n in lengths]
    first = _packed(lengths, docs)
    moved = _packed([lengths[1], lengths[2], lengths[0]], [docs[1], docs[2], docs[0]])
    with torch.no_grad():
        a = model(first[0], position_ids=first[2] if reset_positions else None, document_ids=first[1])[0]
        b = model(moved[0], position_ids=moved[2] if reset_positions else None, document_ids=moved[1])[0]
    torch.testing.assert_close(a[:, 11:28], b[:, :17], atol=1e-5, rtol=1e-5)  # document 2, first vs second
    torch.testing.assert_close(a[:, :11], b[:, 23:], atol=1e-5, rtol=1e-5)  # document 1, first vs last


def test_flex_builds_one_block_mask_per_batch_and_window(monkeypatch):
    from longctx_megatron.model.attention.backends import flex

    built = []
    real = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    backend = flex.FlexBackend()
    q, k, v = (x.detach() for x in _inputs(4, 2, torch.float32))
    documents = _layout("random")
    for _ in range(3):  # three layers of the same window over the same batch
        backend.attend(q, k, v, SlidingPattern(8), 0.0, documents)
    assert len(built) == 1
    backend.attend(q, k, v, SlidingPattern(16), 0.0, documents)  # another window
    backend.attend(q, k, v, SlidingPattern(8), 0.0, _layout("at-global"))  # the next batch
    assert len(built) == 3


# (query rows, scores per group or None for the default): one block; 64-row blocks two to a group with
# a ragged tail (200 = 3 * 64 + 8); blocks of 4 rows cut by the score budget (9 = 2 * 4 + 1). The
# budgets are in units of one row's scores: batch 3 x 4 heads x 13 keys.
ROW_BLOCKS = [(9, None), (200, 156 * 128), (9, 156 * 4)]


def _masked_sdpa_inputs(dtype, mask_heads, rows, seed=3):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, heads, length, 8, generator=generator).to(dtype).requires_grad_()
               for heads, length in ((4, rows), (2, 13), (2, 13)))
    mask = torch.rand(3, mask_heads, rows, 13, generator=generator) < 0.5
    grad = torch.randn(3, 4, rows, 8, generator=generator).to(dtype)
    return q, k, v, mask, grad


@pytest.mark.parametrize("rows,budget", ROW_BLOCKS, ids=["one-block", "64-row-blocks", "4-row-blocks"])
@pytest.mark.parametrize("mask_heads", [1, 4], ids=["shared-mask", "mask-per-head"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_masked_sdpa_off_cpu_path_equals_the_fused_one(dtype, tol, mask_heads, rows, budget, monkeypatch):
    """masked_sdpa's recomputing branch (what CUDA runs) against SDPA's fused one, forward and backward,
    with one mask for every head and with a mask per query head (dilated layers' heads differ), its
    rows in one block or cut into blocks (and groups of them) with a ragged last block."""
    from longctx_megatron.model.attention.backends import recompute

    if budget is not None:
        monkeypatch.setattr(recompute, "SCORES_PER_GROUP", budget)
    q, k, v, mask, grad = _masked_sdpa_inputs(dtype, mask_heads, rows)
    mask[..., 0] = True  # every row has a key
    results = []
    for fused in (True, False):
        out = recompute.masked_sdpa(q, k, v, mask, fused=fused)
        results.append((out, torch.autograd.grad(out, (q, k, v), grad)))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for x, y in zip(grads_b, grads_a, strict=True):
        torch.testing.assert_close(x, y, atol=tol * 5, rtol=tol)


@pytest.mark.parametrize("rows,budget", ROW_BLOCKS, ids=["one-block", "64-row-blocks", "4-row-blocks"])
@pytest.mark.parametrize("mask_heads", [1, 4], ids=["shared-mask", "mask-per-head"])
def test_masked_sdpa_off_cpu_rows_without_a_key_are_zero_as_in_the_dense_oracle(mask_heads, rows, budget,
                                                                                monkeypatch):
    """A row with no visible key (SDPA's result for one varies by kernel) gets output 0 and finite
    gradients from the block branch, as from softmax.masked_attention on every row at once; the
    float64 gradients pass gradcheck."""
    from longctx_megatron.model.attention.backends import recompute
    from longctx_megatron.model.attention.softmax import masked_attention

    if budget is not None:
        monkeypatch.setattr(recompute, "SCORES_PER_GROUP", budget)
    q, k, v, mask, grad = _masked_sdpa_inputs(torch.float64, mask_heads, rows)
    mask[:, :, ::3] = False  # every third row sees nothing, the last block's included

    def dense(q, k, v):  # (N, H, R, D) grouped as (N, Hkv, g, R, D) over (N, Hkv, 1, K, D)
        grouped = mask.unflatten(1, (2, 2)) if mask_heads > 1 else mask[:, None]
        out, _ = masked_attention(q.unflatten(1, (2, 2)), k[:, :, None], v[:, :, None], grouped)
        return out.flatten(1, 2)

    results = []
    for attend in (dense, lambda q, k, v: recompute.masked_sdpa(q, k, v, mask, fused=False)):
        out = attend(q, k, v)
        results.append((out, torch.autograd.grad(out, (q, k, v), grad)))
    (want, want_grads), (got, got_grads) = results
    assert (got[:, :, ::3] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for x, y in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)
    if rows < 64:  # cheap: a few hundred inputs
        inputs = tuple(x.detach()[:1].requires_grad_() for x in (q, k, v))
        mask = mask[:1]
        assert torch.autograd.gradcheck(lambda q, k, v: recompute.masked_sdpa(q, k, v, mask, fused=False), inputs)


def test_masked_sdpa_off_cpu_memory_does_not_grow_with_rows_times_keys():
    """2048 queries over 4096 keys, 8 query heads: one float32 score tensor of every row is 256 MiB,
    which the branch once held three of (one block of all rows); cut into blocks, forward and backward
    peak far below one (measured 85 MiB with the inputs' gradients and the mask)."""
    from longctx_megatron.memory.measure import PeakTracker
    from longctx_megatron.model.attention.backends.recompute import masked_sdpa

    generator = torch.Generator().manual_seed(0)
    rows, keys = 2048, 4096
    q = torch.randn(1, 8, rows, 64, generator=generator, requires_grad=True)
    k, v = (torch.randn(1, 2, keys, 64, generator=generator, requires_grad=True) for _ in range(2))
    mask = torch.arange(keys)[None, :] <= 2 * torch.arange(rows)[:, None]
    grad = torch.randn(q.shape, generator=generator)
    with PeakTracker() as tracker:
        masked_sdpa(q, k, v, mask, fused=False).backward(grad)
    scores = 8 * rows * keys * 4
    assert tracker.peak < scores / 2


@pytest.mark.parametrize("layout", ["none", "random"])
@pytest.mark.parametrize("pattern", [SlidingPattern(100), SlidingPattern(70, 16), DilatedPattern(40, 2, group_size=2),
                                     FullPattern()], ids=str)
def test_many_blocks_and_a_ragged_tail_match_the_oracle(pattern, layout):
    """T = 301 > the 64-query blocks, not a multiple of them, batch 3 with different documents."""
    generator = torch.Generator().manual_seed(4)
    seq_len, batch = 301, 3
    documents = None
    if layout == "random":
        starts = torch.rand(batch, seq_len, generator=generator) < 1 / 60
        starts[:, 0] = False
        documents = Documents(torch.cumsum(starts.long(), dim=1))
    q, k, v = (torch.randn(batch, heads, seq_len, 8, generator=generator, dtype=torch.float64).requires_grad_()
               for heads in (4, 2, 2))
    grad = torch.randn(batch, 4, seq_len, 8, generator=generator, dtype=torch.float64)
    want, want_grads = _run(REFERENCE, pattern, q, k, v, documents, grad)
    got, got_grads = _run(CHUNKED, pattern, q, k, v, documents, grad)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_flex_reuses_block_masks_across_dilated_layers(monkeypatch):
    from longctx_megatron.model.attention.backends import flex

    built = []
    real = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    backend = flex.FlexBackend()
    pattern = DilatedPattern(4, 2, group_size=2)
    q, k, v = (x.detach() for x in _inputs(4, 2, torch.float32))
    documents = _layout("random")
    for _ in range(3):
        backend.attend(q, k, v, pattern, 0.0, documents)
    assert len(built) == 2  # one per offset group, shared by the three layers


@pytest.mark.parametrize("backend", [CHUNKED, FLEX], ids=["chunked", "flex"])
def test_full_attention_in_long_documents_runs_per_document_and_matches_the_oracle(monkeypatch, backend):
    """Documents of at least LONG_DOCUMENT tokens go to causal attention on their own slice."""
    from longctx_megatron.model.attention import decompose

    monkeypatch.setattr(decompose, "LONG_DOCUMENT", 8)
    documents = _layout("random")  # documents of 1 to ~20 tokens: some long, some short
    assert any(length >= 8 for b in range(2) for length in documents.lengths(b))
    q, k, v = _inputs(4, 2, torch.float32)
    if backend is FLEX:
        q, k, v = (x.detach() for x in (q, k, v))
        torch.testing.assert_close(backend.attend(q, k, v, FullPattern(), 0.0, documents),
                                   REFERENCE.attend(q, k, v, FullPattern(), 0.0, documents), atol=2e-6, rtol=2e-6)
        return
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    want, want_grads = _run(REFERENCE, FullPattern(), q, k, v, documents, grad)
    got, got_grads = _run(backend, FullPattern(), q, k, v, documents, grad)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=2e-6)
    monkeypatch.setattr(decompose, "LONG_DOCUMENT", 1)  # every document long: no window at all
    torch.testing.assert_close(backend.attend(q, k, v, FullPattern(), 0.0, documents), want, atol=2e-6, rtol=2e-6)


def test_chunked_window_shorter_than_its_window_on_the_off_cpu_path(monkeypatch):
    """A sequence no longer than the window leaves the chunked backend's second SDPA call no blocks:
    the off-CPU kernel gets an empty batch and must return an empty result (it divided by zero)."""
    from longctx_megatron.model.attention.backends import chunked

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 32, generator=generator, requires_grad=True)
    k = torch.randn(1, 2, 300, 32, generator=generator, requires_grad=True)
    v = torch.randn(1, 2, 300, 32, generator=generator, requires_grad=True)
    expected = chunked.sdpa_window_attention(q, k, v, 1024)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    fused = chunked.masked_sdpa
    monkeypatch.setattr(chunked, "masked_sdpa", lambda *args, **kwargs: fused(*args, fused=False, **kwargs))
    out = chunked.sdpa_window_attention(q, k, v, 1024)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5)
