"""Tensor and sequence parallelism reproduce the single-process model exactly (fp32, gloo ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longctx_megatron.config import ModelConfig
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.grad_norm import grad_norm
from longctx_megatron.parallel.layers import ShardSpec
from longctx_megatron.parallel.parallelize import build_parallel_model
from longctx_megatron.parallel.random import model_parallel_rng
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.parallel.tensor import apply_tensor_parallel, tensor_parallel_shards
from tests.distributed import run_on_ranks

COMMON = dict(
    n_layers=3, attention_layout="sliding:1,dilated:1,full:1", d_ff=96, vocab_size=97, max_seq_len=256,
    sliding_window=8, global_every=6, dilated_window=4, dilation=2,
)
CONFIGS = {
    "gqa4:1": dict(COMMON, d_model=128, n_heads=16, n_kv_heads=4),
    "gqa1:1-untied": dict(COMMON, d_model=64, n_heads=4, n_kv_heads=4, tie_embeddings=False),
}
SEQ_LEN = 24  # divisible by every TP size (sequence parallelism shards it)


def _batch():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, SEQ_LEN), generator=generator)
    labels = torch.randint(0, 97, (2, SEQ_LEN), generator=generator)
    labels[0, :3] = -100  # ignored labels
    loss_mask = (torch.rand(2, SEQ_LEN, generator=generator) > 0.2).float()
    return ids, labels, loss_mask


def gather_global(tensor: torch.Tensor, shard, group) -> torch.Tensor:
    """Reassemble a sharded tensor from all TP ranks and drop the padding."""
    shards = [torch.empty_like(tensor) for _ in range(shard.size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    split = [s.chunk(shard.parts, dim=shard.dim) for s in shards]  # the inverse of ShardSpec.take
    full = torch.cat([torch.cat([s[p] for s in split], dim=shard.dim) for p in range(shard.parts)], dim=shard.dim)
    return full.narrow(shard.dim, 0, shard.global_shape[shard.dim])


def _parity_body(rank, world_size, tp):
    ctx = initialize_parallel(tensor=tp, backend="gloo")
    report = {}
    for name, kwargs in CONFIGS.items():
        config = ModelConfig(**kwargs)
        ids, labels, loss_mask = _batch()
        reference = build_model(config, seed=11, attention_backend="chunked")
        ref_logits, ref_loss = reference(ids, labels=labels, loss_mask=loss_mask)
        ref_loss.backward()
        ref_params = dict(reference.named_parameters())
        for sequence_parallel in (False, True):
            model = build_parallel_model(config, ctx, seed=11, attention_backend="chunked",
                                         sequence_parallel=sequence_parallel)
            grads = DataParallelGradients([model], ctx)  # sums the SP norms' gradients over TP
            grads.start(1)
            logits, loss = model(ids, labels=labels, loss_mask=loss_mask)
            loss.backward()
            grads.finish()
            case = f"{name} tp={tp} sp={sequence_parallel}"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m, c=case: f"{c} loss: {m}")
            if tp > 1:  # logits are vocab-parallel: gather the vocabulary dimension
                vocab = ShardSpec(dim=2, rank=ctx.tp_rank, size=tp, global_shape=(0, 0, config.vocab_size), padded=0)
                logits = gather_global(logits, vocab, ctx.tp_group)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, c=case: f"{c} logits: {m}")
            # Sharding an already materialised model copies slices of its weights: same shard.
            resharded = apply_tensor_parallel(build_model(config, seed=11, attention_backend="chunked"), ctx,
                                              model_parallel_rng(11, ctx.tp_rank), sequence_parallel)
            for (pname, param), (_, other) in zip(model.named_parameters(), resharded.named_parameters(), strict=True):
                assert torch.equal(param, other), f"{case}: {pname} differs when sharding a built model"
            torch.testing.assert_close(grad_norm(model, ctx), grad_norm(reference, None), rtol=1e-5, atol=0,
                                       msg=lambda m, c=case: f"{c} grad norm: {m}")
            worst = 0.0
            shards = tensor_parallel_shards(model)
            for pname, param in model.named_parameters():
                shard = shards.get(pname)
                value, grad = param.detach(), param.grad
                if shard is not None:
                    value, grad = gather_global(value, shard, ctx.tp_group), gather_global(grad, shard, ctx.tp_group)
                want = ref_params[pname]
                assert torch.equal(value, want.detach()), f"{case}: {pname} differs from the global init"
                torch.testing.assert_close(grad, want.grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, c=case, p=pname: f"{c} grad {p}: {m}")
                worst = max(worst, ((grad - want.grad).abs().max() / want.grad.abs().max().clamp_min(1e-12)).item())
            report[case] = worst
    return report


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_matches_single_process(tp):
    reports = run_on_ranks(_parity_body, tp, tp)
    assert len(reports[0]) == 2 * len(CONFIGS)
    assert all(err < 1e-5 for err in reports[0].values()), reports[0]


def _count_collectives_body(rank, world_size, n_layers):
    ctx = initialize_parallel(tensor=world_size, backend="gloo")
    counts = {}

    def counting(kind, fn):
        def wrapped(x, *args, **kwargs):
            calls, nbytes = counts.get(kind, (0, 0))
            full_bytes = x.numel() * x.element_size() * (world_size if kind == "all_gather" else 1)
            counts[kind] = (calls + 1, nbytes + full_bytes)
            return fn(x, *args, **kwargs)
        return wrapped

    mappings.all_reduce = counting("all_reduce", mappings.all_reduce)
    mappings.all_gather = counting("all_gather", mappings.all_gather)
    mappings.reduce_scatter = counting("reduce_scatter", mappings.reduce_scatter)
    config = ModelConfig(**dict(CONFIGS["gqa4:1"], n_layers=n_layers, attention_layout=f"sliding:{n_layers}"))
    ids, _, _ = _batch()
    result = {}
    for sequence_parallel in (False, True):
        model = build_parallel_model(config, ctx, attention_backend="chunked", sequence_parallel=sequence_parallel)
        counts.clear()
        with torch.no_grad():
            model(ids)
        result[sequence_parallel] = dict(counts)
    return result


@pytest.mark.slow
def test_collectives_per_layer():
    n_layers = 3
    result = run_on_ranks(_count_collectives_body, 2, n_layers)[0]
    activation_bytes = 2 * SEQ_LEN * 128 * 4  # one (B, T, d) fp32 tensor
    # Without SP: two all-reduces per layer (attention out, MLP out) plus the embedding's.
    assert result[False] == {"all_reduce": (2 * n_layers + 1, (2 * n_layers + 1) * activation_bytes)}
    # With SP: each all-reduce becomes a reduce-scatter + all-gather pair of the same full tensor;
    # the embedding's reduce-scatter and the head's all-gather complete the pairs.
    assert result[True] == {
        "all_gather": (2 * n_layers + 1, (2 * n_layers + 1) * activation_bytes),
        "reduce_scatter": (2 * n_layers + 1, (2 * n_layers + 1) * activation_bytes),
    }


def test_offline_shard_specs_equal_the_applied_ones():
    """tools cut checkpoints with offline_shard_specs; it must agree with apply_tensor_parallel on every parameter."""
    from longctx_megatron.parallel.state import ParallelContext
    from longctx_megatron.parallel.tensor import offline_shard_specs, tensor_parallel_shards

    config = ModelConfig(d_model=64, n_layers=3, n_heads=8, n_kv_heads=4, d_ff=96, vocab_size=300, max_seq_len=256,
                         sliding_window=32, global_every=16, dilated_window=16, dilation=2, tie_embeddings=False)
    for size in (2, 4):
        for rank in range(size):
            ctx = ParallelContext(world_size=size, rank=rank, tp_size=size, pp_size=1, dp_size=1, tp_rank=rank,
                                  pp_rank=0, dp_rank=0, tp_group=None, pp_group=None, dp_group=None,
                                  tp_ranks=tuple(range(size)), pp_ranks=(rank,), dp_ranks=(rank,))
            model = build_parallel_model(config, ctx, device="meta")
            applied = tensor_parallel_shards(model)
            full = build_model(config, device="meta")
            offline = offline_shard_specs(config, size)[rank]
            for name, _ in full.named_parameters():
                assert offline.get(name) == applied.get(name), name
