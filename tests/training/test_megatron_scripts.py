"""Megatron-LM's own launch scripts, as their torchrun received them (tests/training/megatron_scripts/*.json,
recorded with a stand-in torchrun from NVIDIA/Megatron-LM d98e8a6), against pretrain_longctx.py's parser.

Each either parses, validates and builds the model Megatron would build (checked against megatron-core's
own GPTModel built on the meta device from the same flags), or is refused with the reason, naming the flag.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from longctx_megatron.config.megatron_args import megatron_ffn_hidden_size
from longctx_megatron.model.build import build_model
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.setup import tokenizer_and_model

SCRIPTS = os.path.join(os.path.dirname(__file__), "megatron_scripts")


def recorded(name: str) -> tuple[list[str], int]:
    """(argv, world size) of a recorded launch: torchrun's --nproc_per_node x --nnodes."""
    with open(os.path.join(SCRIPTS, f"{name}.json")) as file:
        record = json.load(file)
    launcher = record["torchrun"]
    nodes = int(launcher[launcher.index("--nnodes") + 1]) if "--nnodes" in launcher else 1
    per_node = int(launcher[launcher.index("--nproc_per_node") + 1]) if "--nproc_per_node" in launcher else 1
    return record["argv"], per_node * nodes


def flag(argv: list[str], name: str, default=None):
    if name not in argv:
        return default
    index = argv.index(name)
    value = argv[index + 1] if index + 1 < len(argv) else None
    return True if value is None or value.startswith("--") else value


REFUSED = {
    "gpt3_175b": ["--step-batch-size-schedule: batch-size schedules are not supported"],
    "llama3_8b_mock": ["--fp8-format: FP8 training is not supported", "--fp8-param-gather"],
    "llama3_8b_data": ["--fp8-format: FP8 training is not supported"],
    "mixtral_8x7b": ["--num-experts: mixture-of-experts models are not supported", "--moe-router-topk",
                     "--expert-model-parallel-size"],
    # GPT-3's architecture: LayerNorm, GeLU, learned absolute positions, biases (Megatron's defaults).
    "gpt_345m": ["--normalization LayerNorm", "a GeLU MLP", "--position-embedding-type learned_absolute",
                 "biases in the linear layers"],
    "gpt3_tp2_cp2_functional": ["--normalization LayerNorm", "pass --swiglu", "pass --disable-bias-linear"],
}


def test_every_recorded_script_is_covered():
    names = {name.removesuffix(".json") for name in os.listdir(SCRIPTS)}
    assert names == set(REFUSED) | {"llama3_8b_bf16_mock"}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_scripts_this_project_cannot_train_are_refused_with_the_reason(name):
    argv, world = recorded(name)
    with pytest.raises(ValueError) as error:
        parse_run_config(argv, world)
    for part in REFUSED[name]:
        assert part in str(error.value)


def megatron_core_parameters(argv: list[str], vocab_size: int) -> int:
    """Parameters of megatron-core's GPTModel for ``argv``'s architecture flags, built on the meta device."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    import torch.nn.functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig
    from tests.distributed import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        hidden, heads = int(flag(argv, "--hidden-size")), int(flag(argv, "--num-attention-heads"))
        config = TransformerConfig(
            num_layers=int(flag(argv, "--num-layers")), hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=int(flag(argv, "--num-query-groups")) if flag(argv, "--group-query-attention") else heads,
            ffn_hidden_size=int(flag(argv, "--ffn-hidden-size", megatron_ffn_hidden_size(hidden, True))),
            kv_channels=int(flag(argv, "--kv-channels", hidden // heads)), normalization="RMSNorm",
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            # --apply-layernorm-1p changes the norms' stored values, not their shapes; megatron-core's
            # local (non-Transformer-Engine) norm refuses it, so the count is taken without it.
            use_cpu_initialization=True, perform_initialization=False)
        with torch.device("meta"):
            model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab_size,
                             max_sequence_length=int(flag(argv, "--max-position-embeddings")),
                             position_embedding_type="rope", share_embeddings_and_output_weights=not flag(
                                 argv, "--untie-embeddings-and-output-weights"))
        return sum(p.numel() for p in model.parameters())
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def test_llama3_8b_bf16_script_builds_megatrons_model():
    """The Llama-3 8B example with its DTYPE switch on bf16 (the shipped fp8 is refused above): every
    layer full causal attention, Megatron's sizes, and megatron-core's parameter count."""
    argv, world = recorded("llama3_8b_bf16_mock")
    run = parse_run_config(argv, world)
    assert (run.parallel.tensor, run.data_parallel, run.training.precision) == (1, 8, "bf16")
    assert run.parallel.sequence_parallel is False  # turned off at TP 1, as Megatron does
    assert any("--sequence-parallel is turned off" in notice for notice in run.notices)
    assert any(notice.startswith("accepted for compatibility, no effect here: --manual-gc") for notice in run.notices)
    # --train-samples 1953125000 at global batch 128; the schedule counts samples
    assert run.training.train_iters == 1953125000 // 128
    assert run.training.lr_schedule(run.global_batch) == (128, 3906252, 1949218748)
    assert run.data.mock_data and run.data.split == "99,1,0"
    assert run.model.attention_backend == "flex"  # Megatron's "fused"
    _, config = tokenizer_and_model(run)
    assert {spec.kind for spec in config.layer_plan()} == {"full"}
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.d_ff) == (32, 4096, 32, 8, 14336)
    assert config.rope.theta == 1e6 and config.norm_zero_centered_gamma and not config.tie_embeddings
    assert (config.hidden_dropout, config.attention_dropout, config.init_std) == (0.0, 0.0, 0.0134)
    # NullTokenizer(128256) has 128257 ids with eod; padded to 128 as Megatron pads at TP 1
    assert config.vocab_size == math.ceil(128257 / 128) * 128
    model = build_model(config, "meta")
    ours = sum(p.numel() for p in model.parameters())
    assert ours == megatron_core_parameters(argv, config.vocab_size) == 8_031_309_824


def shrunk(argv: list[str], sizes: dict[str, str]) -> list[str]:
    """``argv`` with the values of ``sizes``' flags replaced (every other flag as recorded)."""
    out = list(argv)
    for name, value in sizes.items():
        out[out.index(name) + 1] = value
    return out


TINY = {"--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "96", "--num-attention-heads": "4",
        "--num-query-groups": "2", "--kv-channels": "16", "--seq-length": "32", "--max-position-embeddings": "64",
        "--global-batch-size": "2", "--train-samples": "6", "--lr-decay-samples": "6", "--lr-warmup-samples": "2",
        "--vocab-size": "250", "--eval-iters": "1", "--profile-step-start": "1", "--profile-step-end": "2",
        # fused -> FlexAttention, which has no backward pass on CPU (BackendUnavailable says so)
        "--attention-backend": "unfused"}


def _train(rank, world_size, argv):
    from pretrain_longctx import run

    return run(argv, log=lambda *_: None)


@pytest.mark.slow
def test_llama3_8b_bf16_script_trains_when_shrunk(tmp_path):
    """The same argv with the sizes made tiny (and FlexAttention, forward-only on CPU, swapped for the
    reference) trains on 2 gloo ranks: samples-based schedule,
    decoupled lr, 1p norms, untied output, bf16 with the distributed optimizer, mock data, save."""
    from tests.distributed import run_on_ranks

    argv, _ = recorded("llama3_8b_bf16_mock")
    argv = shrunk(argv, {**TINY, "--save": str(tmp_path / "ckpt"), "--load": str(tmp_path / "ckpt"),
                         "--tensorboard-dir": str(tmp_path / "tb"), "--data-cache-path": str(tmp_path / "cache")})
    losses = run_on_ranks(_train, 2, argv)
    assert len(losses[0]) == 3 and all(math.isfinite(loss) for loss in losses[0])
    assert os.path.isdir(tmp_path / "ckpt")
