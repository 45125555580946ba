"""Context parallelism's attention against one process: every layer kind, with documents, with chunks
shorter than the window, forward and the q/k/v gradients, for CP 2 and 4 and both comm types (fp32,
gloo). Also the split, the patterns' reach and the positional kernel against the dense oracle."""

from __future__ import annotations

import functools

import pytest
import torch

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.model.attention.backends import recompute
from longctx_megatron.model.attention.backends.reference import ReferenceBackend
from longctx_megatron.model.attention.patterns import (
    DilatedPattern,
    Documents,
    FullPattern,
    SlidingPattern,
    dense_mask,
)
from longctx_megatron.model.attention.positional import attend_at_positions
from longctx_megatron.parallel.context import check_comm_type, rows_sent, shard_batch, zigzag_positions
from longctx_megatron.parallel.state import ParallelContext
from tests.distributed import run_on_ranks

SEQ, BATCH, HEADS, KV_HEADS, DIM = 48, 2, 4, 2, 8
PATTERNS = {  # CP2 chunks hold 12 positions, CP4 chunks 6: shorter than every window and reach here
    "full": FullPattern(),
    "sliding": SlidingPattern(20),
    "sliding+global": SlidingPattern(14, 8),
    "dilated": DilatedPattern(5, 3, HEADS // KV_HEADS),
}
DOCUMENTS = torch.tensor([[0] * 10 + [1] * 25 + [2] * 13, [0] * 3 + [1] * 45])


def _inputs():
    generator = torch.Generator().manual_seed(7)
    shapes = [(BATCH, HEADS, SEQ, DIM), (BATCH, KV_HEADS, SEQ, DIM), (BATCH, KV_HEADS, SEQ, DIM),
              (BATCH, HEADS, SEQ, DIM)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _cp_attention(rank, world, comm_types):
    from longctx_megatron.parallel.context import ContextParallelAttention, record_traffic
    from longctx_megatron.parallel.state import initialize_parallel

    ctx = initialize_parallel(context=world, backend="gloo")
    here = zigzag_positions(SEQ, world, ctx.cp_rank)
    results = {}
    for comm in comm_types:
        for name, pattern in PATTERNS.items():
            for with_documents in (False, True):
                q, k, v, grad = _inputs()
                q, k, v = (x[:, :, here].clone().requires_grad_() for x in (q, k, v))
                attention = ContextParallelAttention(pattern, ctx, comm)
                with record_traffic() as sent:
                    out = attention(q, k, v, Documents(DOCUMENTS) if with_documents else None)
                    out.backward(grad[:, :, here])
                results[comm, name, with_documents] = (out.detach(), q.grad, k.grad, v.grad, dict(sent))
    return here, results


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_equals_one_process(world):
    outcomes = run_on_ranks(_cp_attention, world, ("p2p", "allgather"), timeout=300)
    for key in outcomes[0][1]:
        _, name, with_documents = key
        q, k, v, grad = (x.requires_grad_() for x in _inputs())
        reference = ReferenceBackend().attend(q, k, v, PATTERNS[name], 0.0, Documents(DOCUMENTS) if with_documents
                                              else None)
        reference.backward(grad)
        for index, expected in enumerate((reference.detach(), q.grad, k.grad, v.grad)):
            got = torch.zeros_like(expected)
            for here, results in outcomes:
                got[:, :, here] += results[key][index]
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m, key=key, i=index:
                                       f"{key}, {'out q k v'.split()[i]}: {m}")
    # What went into the exchanges is what the plans say (rows_sent, the traffic benchmark's numbers).
    row_bytes = {"kv": BATCH * 2 * KV_HEADS * DIM * 8, "queries": BATCH * HEADS * DIM * 8,
                 "answers": BATCH * HEADS * (DIM + 1) * 8}  # float64; an answer is out and its lse
    for (comm, name, with_documents), _ in outcomes[0][1].items():
        documents = Documents(DOCUMENTS) if with_documents else None
        planned = rows_sent(PATTERNS[name], SEQ, world, comm, documents)
        for rank, (_, results) in enumerate(outcomes):
            sent = {part: nbytes for (kind, part, direction), nbytes in results[comm, name, with_documents][4].items()
                    if direction == "forward" and nbytes}
            expected = {part: rows * row_bytes[part] for part, rows in planned[rank].items() if rows}
            assert sent == expected, (comm, name, with_documents, rank, sent, expected)
    # The halo moves less than gathering everything, for every local kind.
    for name in ("sliding", "dilated"):
        halo = sum(sum(results["p2p", name, False][4].values()) for _, results in outcomes)
        gathered = sum(sum(results["allgather", name, False][4].values()) for _, results in outcomes)
        assert 0 < halo < gathered, (name, halo, gathered)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_reach_bounds_every_non_global_pair(name):
    pattern = PATTERNS[name]
    heads = pattern.group_size * pattern.dilation if isinstance(pattern, DilatedPattern) else 1  # every offset
    mask = dense_mask(pattern, SEQ, heads).any(0)
    i, j = torch.meshgrid(torch.arange(SEQ), torch.arange(SEQ), indexing="ij")
    if isinstance(pattern, SlidingPattern) and pattern.global_every:
        mask = mask & ~(pattern.is_global(i) | pattern.is_global(j))
    span = ((i - j + 1) * mask).amax()
    if pattern.reach is None:
        assert span == SEQ
    else:
        assert span == pattern.reach  # attained: the bound is tight


@pytest.mark.parametrize("need_lse,off_cpu", [(True, False), (False, False), (False, True)],
                         ids=["recomputed", "fused", "fused-as-off-cpu"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_positional_kernel_equals_the_oracle(name, need_lse, off_cpu, monkeypatch):
    """Any query subset at its positions over all keys (reach-limited where the rule allows), forward
    and backward, by both block kernels; the fused one also through masked_sdpa's off-CPU branch
    (what CUDA runs)."""
    if off_cpu:
        monkeypatch.setattr(recompute, "masked_sdpa", functools.partial(recompute.masked_sdpa, fused=False))
    pattern = PATTERNS[name]
    q, k, v, _ = (x.requires_grad_() for x in _inputs())
    documents = Documents(DOCUMENTS)
    reference = ReferenceBackend().attend(q, k, v, pattern, 0.0, documents)
    rows = torch.tensor([1, 2, 5, 17, 18, 19, 30, 47])
    positions = torch.arange(SEQ)
    local = pattern.reach is not None and not getattr(pattern, "global_every", 0)
    if not local:  # without a reach queries may come in any order (global queries, peer by peer)
        rows = rows[torch.tensor([6, 0, 7, 1, 4, 2, 3, 5])]
    out, lse = attend_at_positions(q[:, :, rows], k, v, pattern, rows, positions, documents,
                                   reach=pattern.reach if local else None, block=3, need_lse=need_lse)
    torch.testing.assert_close(out, reference[:, :, rows], rtol=1e-12, atol=1e-12)
    assert (lse is not None) == need_lse and (lse is None or torch.isfinite(lse).all())
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    expected = torch.autograd.grad((reference[:, :, rows] * grad).sum(), (q, k, v))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_zigzag_split_and_shard_batch():
    assert zigzag_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert torch.cat([zigzag_positions(24, 3, r) for r in range(3)]).sort().values.tolist() == list(range(24))
    with pytest.raises(ConfigError, match="not divisible by 2 x context-parallel size"):
        zigzag_positions(18, 2, 0)
    ctx = ParallelContext(world_size=2, rank=1, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                          tp_group=None, pp_group=None, dp_group=None, tp_ranks=(1,), pp_ranks=(1,), dp_ranks=(1,),
                          cp_size=2, cp_rank=1, cp_ranks=(0, 1))
    labels = torch.arange(8).expand(2, 8).clone()
    labels[0, 6] = -100
    batch = {"tokens": torch.arange(8).expand(2, 8), "labels": labels, "document_ids": torch.zeros(2, 8).long()}
    part = shard_batch(batch, ctx)
    assert part["tokens"][0].tolist() == [2, 3, 4, 5] and part["position_ids"][0].tolist() == [2, 3, 4, 5]
    assert part["document_ids"].shape == (2, 8) and part["loss_tokens"].item() == 15


def test_refused_comm_types_say_why():
    with pytest.raises(ConfigError, match="a2a.*use one of"):
        check_comm_type("a2a", 2)
    check_comm_type("a2a", 1)  # Megatron's value; nothing is exchanged at CP 1
    with pytest.raises(ConfigError, match="not one of"):
        check_comm_type("ring", 1)
