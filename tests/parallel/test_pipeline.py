"""Pipeline parallelism: the cost-balanced split, and 1F1B (with TP and SP) against the single-process model."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ConfigError, ModelConfig
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.grad_norm import grad_norm
from longctx_megatron.parallel.pipeline_plan import (
    balanced_split,
    describe_split,
    parse_split,
    plan_pipeline,
    stage_costs,
)
from longctx_megatron.parallel.pipeline_schedule import (
    forward_backward_pipelined,
    schedule_1f1b,
    schedule_interleaved,
)
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.parallel.tensor import tensor_parallel_shards
from longctx_megatron.training.stages import build_pipeline_chunks
from tests.distributed import run_on_ranks
from tests.parallel.test_tensor_parallel import gather_global


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_split([4, 1, 1, 1, 1], 2) == [1, 4]
    assert balanced_split([1, 1, 1, 1], 2, last_extra=2) == [3, 1]
    assert balanced_split([5, 1, 1, 1], 4) == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="needs between 1 and n_layers=2 stages"):
        balanced_split([1, 1], 3)


def test_design_plan_at_100k_is_balanced_better_than_an_even_split():
    config = ModelConfig()
    sizes, costs, head = plan_pipeline(config, 4, 102400)
    balanced, even = stage_costs(sizes, costs, head), stage_costs([8, 8, 8, 8], costs, head)
    print(f"\nbalanced {sizes}: stage GFLOP/token {[round(c / 1e9, 2) for c in balanced]}; "
          f"even [8, 8, 8, 8]: {[round(c / 1e9, 2) for c in even]}")
    print(describe_split(config, sizes, costs, head))
    assert sizes != [8, 8, 8, 8] and sum(sizes) == 32
    assert max(balanced) < max(even)
    assert max(balanced) / min(balanced) < max(even) / min(even)


def test_split_override():
    assert parse_split("10,8,7,7", 32, 4) == [10, 8, 7, 7]
    for bad in ("10,8,7", "10,8,7,8", "a,b,c,d", "0,16,8,8"):
        with pytest.raises(ConfigError, match="--pipeline-layer-split"):
            parse_split(bad, 32, 4)
    sizes, _, _ = plan_pipeline(ModelConfig(), 4, 4096, override="10,8,7,7")
    assert sizes == [10, 8, 7, 7]


CONFIG = dict(d_model=64, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=96, vocab_size=97, max_seq_len=128,
              attention_layout="sliding:2,dilated:1,full:1", sliding_window=8, global_every=6, dilated_window=4,
              dilation=2)
MICRO, SEQ = 4, 24


def _microbatches():
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 97, (MICRO, SEQ), generator=generator)
    labels = torch.randint(0, 97, (MICRO, SEQ), generator=generator)
    return tokens, labels


def _pipeline_body(rank, world_size, tp, pp, sequence_parallel, sizes):
    ctx = initialize_parallel(tensor=tp, pipeline=pp, backend="gloo")
    config = ModelConfig(**CONFIG)
    tokens, labels = _microbatches()
    reference = build_model(config, seed=21, attention_backend="chunked")
    chunks = build_pipeline_chunks(config, ctx, sizes, seed=21, attention_backend="chunked",
                                   sequence_parallel=sequence_parallel)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW([p for chunk in chunks for p in chunk.parameters()], lr=1e-2)
    grads = DataParallelGradients(chunks, ctx)  # fp32 gradients; sums the tied copies and the SP norms
    hidden = (1, SEQ // tp if sequence_parallel else SEQ, config.d_model)
    batches = [{"tokens": tokens[i:i + 1], "labels": labels[i:i + 1]} for i in range(MICRO)]
    result = {"losses": [], "ref_losses": []}
    for step in range(3):
        _, ref_loss = reference(tokens, labels=labels)
        ref_opt.zero_grad()
        ref_loss.backward()
        grads.start(len(batches))
        losses = forward_backward_pipelined(chunks, batches, ctx, hidden)
        grads.finish()
        if step == 0:  # gradients of every parameter of this rank, and the global norm
            ref_params = dict(reference.named_parameters())
            for chunk in chunks:
                shards = tensor_parallel_shards(chunk)
                for name, param in chunk.named_parameters():
                    grad = gather_global(param.grad, shards[name], ctx.tp_group) if name in shards else param.grad
                    torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-5, atol=1e-6,
                                               msg=lambda m, n=name: f"stage {ctx.pp_rank} grad {n}: {m}")
            torch.testing.assert_close(grad_norm(chunks, ctx), grad_norm(reference, None), rtol=1e-5, atol=0)
            result["parameters"] = sorted(n for chunk in chunks for n, _ in chunk.named_parameters())
        ref_opt.step()
        opt.step()
        result["ref_losses"].append(ref_loss.item())
        if any(chunk.post_process for chunk in chunks):
            result["losses"].append(sum(losses).item() / (MICRO * SEQ))  # token-loss sums -> mean
    return result


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,sequence_parallel,sizes", [
    (1, 2, False, [3, 1]),
    (1, 4, False, [1, 1, 1, 1]),
    (2, 2, True, [2, 2]),
    (1, 2, False, [1, 1, 1, 1]),  # interleaved: 2 chunks of one layer per rank
    (2, 2, False, [1, 1, 1, 1]),
], ids=["pp2", "pp4", "tp2xpp2-sp", "pp2-interleaved", "tp2xpp2-interleaved"])
def test_pipeline_schedules_match_single_process(tp, pp, sequence_parallel, sizes):
    results = run_on_ranks(_pipeline_body, tp * pp, tp, pp, sequence_parallel, sizes)
    last = [r for r in results if r["losses"]]
    assert len(last) == tp  # the last stage's TP ranks report the loss
    for result in last:
        assert result["losses"] == pytest.approx(result["ref_losses"], rel=1e-5)
    first = results[0]["parameters"]
    assert "embedding.weight" in first and "layers.0.attention.qkv.weight" in first
    assert not any(name.startswith("final_norm") for name in first)


def test_schedules_are_megatrons_orders():
    assert schedule_1f1b(4, 2, 0) == [("F", 0, 0), ("F", 1, 0), ("B", 0, 0), ("F", 2, 0), ("B", 1, 0),
                                      ("F", 3, 0), ("B", 2, 0), ("B", 3, 0)]
    assert schedule_1f1b(4, 2, 1) == [("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0), ("F", 2, 0),
                                      ("B", 2, 0), ("F", 3, 0), ("B", 3, 0)]
    order = schedule_interleaved(4, 2, 0, 2)
    assert order[:4] == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1)]  # warm-up 2*(2-0-1)+(2-1)*2 = 4
    assert order[4:6] == [("F", 2, 0), ("B", 0, 1)]  # backwards start from the last chunk
    for stage in range(2):
        actions = schedule_interleaved(4, 2, stage, 2)
        assert sorted(a for a in actions if a[0] == "F") == [("F", m, c) for m in range(4) for c in range(2)]
        assert sorted(a for a in actions if a[0] == "B") == [("B", m, c) for m in range(4) for c in range(2)]
    with pytest.raises(ConfigError, match="multiple of the pipeline-model-parallel size"):
        schedule_interleaved(3, 2, 0, 2)
