"""Megatron-LM's flags with Megatron's meanings: the model its size flags describe, refusals that name the
flag, flags accepted with no effect, the schedule in samples, decoupled learning rates, recomputation."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.megatron_args import MegatronArchitecture, megatron_ffn_hidden_size
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.parallelize import apply_recompute
from longctx_megatron.training.arguments import build_parser, parse_run_config
from longctx_megatron.training.lr_schedule import learning_rate
from longctx_megatron.training.run_config import demo_config
from tests.flags import LLAMA_ARCHITECTURE

SIZES = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"]


def model_of(argv: list[str]) -> ModelConfig:
    run = parse_run_config(argv, 1)
    return run.model.resolve(demo_config(), run.training.seq_length)


def test_size_flags_without_config_build_megatrons_model():
    config = model_of([*SIZES, *LLAMA_ARCHITECTURE[1:], "--seq-length", "256"])  # no --group-query-attention
    assert {spec.kind for spec in config.layer_plan()} == {"full"}
    assert config.n_kv_heads == 4  # multi-head attention, as Megatron without --group-query-attention
    assert config.d_ff == megatron_ffn_hidden_size(64, swiglu=True) == 128
    assert config.max_seq_len == 256 and config.rope.theta == 10000 and config.tie_embeddings


def test_num_query_groups_needs_group_query_attention_as_in_megatron():
    run = parse_run_config([*SIZES, *LLAMA_ARCHITECTURE[1:], "--num-query-groups", "2"], 1)
    assert run.model.resolve(demo_config(), 64).n_kv_heads == 4
    assert any("--num-query-groups has no effect" in notice for notice in run.notices)
    assert model_of([*SIZES, *LLAMA_ARCHITECTURE, "--num-query-groups", "2"]).n_kv_heads == 2


def test_megatrons_defaults_are_refused_by_name():
    with pytest.raises(ValueError) as error:
        parse_run_config(SIZES, 1)
    for flag in ("--normalization RMSNorm", "--swiglu", "--position-embedding-type rope", "--disable-bias-linear"):
        assert flag in str(error.value)


@pytest.mark.parametrize("extra,message", [
    (["--kv-channels", "32"], "--kv-channels 32 != --hidden-size / --num-attention-heads = 16"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5"),
    (["--rotary-interleaved"], "--rotary-interleaved"),
    (["--qk-layernorm"], "--qk-layernorm"),
    (["--add-qkv-bias"], "biases"),
    (["--window-size", "16,4"], "causal windows only"),
])
def test_what_this_model_cannot_build_is_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config([*SIZES, *LLAMA_ARCHITECTURE, *extra], 1)


def test_statements_against_a_config_or_the_built_in_model_are_checked():
    with pytest.raises(ConfigError, match="--normalization LayerNorm"):
        model_of(["--num-layers", "2", "--normalization", "LayerNorm"])
    config = model_of(["--num-layers", "2", "--swiglu", "--normalization", "RMSNorm"])  # true statements
    assert config.n_layers == 2 and config.attention_layout == demo_config().attention_layout


def test_a_window_beyond_the_models_length_is_refused_not_cut():
    with pytest.raises(ConfigError, match="reaches 128 keys, beyond the model's length 64"):
        model_of([*SIZES, *LLAMA_ARCHITECTURE, "--seq-length", "64", "--window-size", "127,0"])


def test_window_size_is_megatrons_left_reach_plus_self():
    config = model_of([*SIZES, *LLAMA_ARCHITECTURE, "--window-size", "(15,0)", "--seq-length", "64"])
    assert [(spec.kind, spec.window, spec.global_every) for spec in config.layer_plan()] == [("sliding", 16, 0)] * 4


def test_attention_layout_keeps_this_projects_plan():
    config = model_of([*SIZES, *LLAMA_ARCHITECTURE, "--attention-layout", "sliding:2,full:2", "--sliding-window",
                       "32", "--seq-length", "64"])
    assert [spec.kind for spec in config.layer_plan()] == ["sliding", "sliding", "full", "full"]


def test_megatron_attention_backend_names_map_to_ours():
    assert parse_run_config(["--attention-backend", "unfused"], 1).model.attention_backend == "reference"
    assert parse_run_config(["--use-flash-attn"], 1).model.attention_backend == "flash"


def test_refused_flags_name_the_reason_before_argparse():
    with pytest.raises(ValueError, match="--fp8-recipe: FP8 training is not supported"):
        parse_run_config(["--fp8-recipe=delayed"], 1)
    with pytest.raises(ValueError, match="--moe-ffn-hidden-size: mixture-of-experts"):
        parse_run_config(["--moe-ffn-hidden-size", "64"], 1)
    with pytest.raises(ValueError, match="--rampup-batch-size"):
        parse_run_config(["--rampup-batch-size", "16", "16", "1000"], 1)


def test_no_effect_flags_are_listed_in_help_and_reported(capsys):
    run = parse_run_config(["--manual-gc", "--num-workers", "4", "--transformer-impl", "local"], 1)
    assert [notice.split(": ", 1)[1].split(" (")[0] for notice in run.notices] == [
        "--transformer-impl", "--manual-gc", "--num-workers"]
    help_text = build_parser().format_help()
    assert "accepted for compatibility with Megatron-LM's scripts, with no effect here" in help_text


def test_shell_quoted_split_and_sequence_parallel_at_tp1():
    run = parse_run_config(["--split", "'99,1,0'", "--sequence-parallel"], 1)
    assert run.data.split == "99,1,0" and not run.parallel.sequence_parallel


@pytest.mark.parametrize("flags,message", [
    (["--train-samples", "64", "--train-iters", "3"], "--train-iters and --train-samples are exclusive"),
    (["--train-samples", "64", "--lr-decay-iters", "3"], "use --lr-decay-samples"),
    (["--lr-decay-samples", "64"], "need --train-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "are exclusive"),
    (["--recompute-method", "block"], "--recompute-method needs --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
     "uniform with --recompute-num-layers > 1"),
    (["--recompute-granularity", "full", "--recompute-method", "block"], "needs --recompute-num-layers"),
    (["--decoupled-min-lr", "0.1"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--lr", "0.1", "--min-lr", "0.2"], "Megatron asserts min_lr <= lr"),
    ([*SIZES, *LLAMA_ARCHITECTURE, "--seq-length", "128", "--max-position-embeddings", "64"],
     "--max-position-embeddings 64 is less than --seq-length 128"),
    (["--mock-data", "--data-path", "x", "--tokenizer-type", "NullTokenizer"], "exclusive"),
    (["--mock-data"], "--mock-data needs --tokenizer-type"),
])
def test_contradictions_fail_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config(flags, 1)


def test_zero_warmups_of_the_other_unit_are_accepted_as_in_megatron():
    parse_run_config(["--train-samples", "64", "--lr-warmup-iters", "0"], 1)
    parse_run_config(["--train-iters", "4", "--lr-warmup-samples", "0"], 1)


def test_train_samples_set_iterations_and_a_schedule_in_samples():
    run = parse_run_config(["--train-samples", "100", "--global-batch-size", "8", "--micro-batch-size", "2",
                            "--lr-warmup-samples", "16", "--lr-decay-samples", "80"], 1)
    assert run.training.train_iters == 12
    assert run.training.lr_schedule(run.global_batch) == (8, 16, 80)
    run = parse_run_config(["--train-iters", "100", "--lr-warmup-fraction", "0.1", "--lr-decay-iters", "50"], 1)
    assert run.training.lr_schedule(run.global_batch) == (4, 20.0, 200)  # in samples of the global batch 4


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
@pytest.mark.parametrize("flags,warmup,decay", [  # in samples of the global batch 8, as Megatron's training.py
    (["--train-iters", "40", "--lr-warmup-iters", "3", "--lr-decay-iters", "30"], 24, 240),
    (["--train-iters", "40", "--lr-warmup-fraction", "0.07", "--lr-decay-iters", "30"], 0.07 * 240, 240),
    (["--train-samples", "320", "--lr-warmup-samples", "12", "--lr-decay-samples", "250"], 12, 250),
    (["--train-samples", "320", "--lr-warmup-fraction", "0.013"], 0.013 * 320, 320),
])
def test_learning_rate_equals_megatron_cores_scheduler(flags, warmup, decay, style):
    """Our schedule, update by update, against megatron-core's OptimizerParamScheduler given the warm-up
    and decay Megatron's training.py derives from the same flags (one scheduler step per update)."""
    megatron_scheduler = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    run = parse_run_config([*flags, "--lr", "1.0", "--min-lr", "0.1", "--lr-decay-style", style,
                            "--global-batch-size", "8", "--micro-batch-size", "8"], 1)
    training, batch = run.training, run.global_batch
    assert training.lr_schedule(batch) == (8, pytest.approx(warmup), decay)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    theirs = megatron_scheduler.OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=style, start_wd=0.0, end_wd=0.0, wd_incr_steps=decay, wd_incr_style="constant")
    step, ours_warmup, ours_decay = training.lr_schedule(batch)
    for update in range(training.train_iters):
        ours = learning_rate(update * step, 1.0, 0.1, ours_warmup, ours_decay, style)
        assert ours == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12), (update, ours)
        theirs.step(increment=batch)


def test_block_recomputation_recomputes_the_first_layers_of_a_chunk():
    model = apply_recompute(build_model(ModelConfig(d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=64,
                                                    vocab_size=64, max_seq_len=64, attention_layout="full:4"),
                                        "meta"), "full", first_layers=2)
    assert [type(block).__name__.startswith("Recomputed") for block in model.layers] == [True, True, False, False]
    run = parse_run_config(["--recompute-granularity", "full", "--recompute-method", "block",
                            "--recompute-num-layers", "1"], 1)
    assert run.parallel.recompute_first_layers == 1
    assert parse_run_config(["--recompute-activations"], 1).parallel.recompute_granularity == "selective"


def test_layernorm_1p_is_the_same_function_with_weights_minus_one():
    plain = MegatronArchitecture(2, 32, 2, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                                 add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    base = plain.model_config(64, 16)
    one_p = MegatronArchitecture(**{**plain.__dict__, "apply_layernorm_1p": True}).model_config(64, 16)
    ours, theirs = build_model(base, seed=3), build_model(one_p, seed=3)
    assert all((p == 0).all() for name, p in theirs.named_parameters() if name.endswith("norm.weight"))
    with torch.no_grad():
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            if name.endswith("norm.weight"):
                a.uniform_(0.5, 1.5)
                b.copy_(a - 1)
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(theirs(tokens), ours(tokens))


@pytest.mark.parametrize("precision", [[], ["--bf16"], ["--use-distributed-optimizer"]])
def test_decoupled_lr_schedules_the_embedding_and_output_apart(precision):
    """--decoupled-lr 0 freezes the embedding (tied: also the output) while the rest trains, in the local
    optimizer, and in ZeRO-1 with fp32 and with bf16 weights."""
    from longctx_megatron.training.setup import setup

    argv = ["--train-iters", "2", "--seq-length", "64", "--micro-batch-size", "1", "--eval-iters", "1",
            "--decoupled-lr", "0", "--decoupled-min-lr", "0", *precision]
    trainer = setup(parse_run_config(argv, 1), log=lambda *_: None)
    model = trainer.chunks[0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert "embedding.weight" not in moved and "layers.0.attention.qkv.weight" in moved
    groups = trainer.optimizer.param_groups
    assert [group["lr"] for group in groups if group["decoupled"]] == [0.0] * sum(g["decoupled"] for g in groups)


def test_window_attn_skip_freq_and_llama3_rope_scaling():
    config = model_of([*SIZES, *LLAMA_ARCHITECTURE, "--window-size", "7,0", "--window-attn-skip-freq", "2",
                       "--use-rope-scaling", "--rope-scaling-factor", "4", "--seq-length", "64"])
    assert [spec.kind for spec in config.layer_plan()] == ["sliding", "full", "sliding", "full"]
    assert config.sliding_window == 8 and config.rope.scaling == "llama3" and config.rope.factor == 4
    listed = model_of([*SIZES, *LLAMA_ARCHITECTURE, "--window-size", "7,0", "--window-attn-skip-freq", "[1,0]*2",
                       "--seq-length", "64"])
    assert [spec.kind for spec in listed.layer_plan()] == ["sliding", "full", "sliding", "full"]
    with pytest.raises(SystemExit):
        parse_run_config(["--window-attn-skip-freq", "__import__('os')"], 1)
    run = parse_run_config(["--window-attn-skip-freq", "([1]*3+[0]*1)*2"], 1)
    assert run.model.megatron["window_attn_skip_freq"] == [1, 1, 1, 0] * 2
    with pytest.raises(ValueError, match="must be a positive integer or a list of 4"):
        parse_run_config([*SIZES, *LLAMA_ARCHITECTURE, "--window-size", "7,0", "--window-attn-skip-freq", "[1,0]"],
                         1)


def test_zero_centred_norm_keeps_bf16_gains_precise():
    """In bf16, 1 + weight rounds to steps of 2^-7 near 1; the norm forms the gain in fp32 instead, so its
    output is off by the output's own rounding (2^-8 relative), where bf16 gains were off by twice that."""
    from longctx_megatron.model.norm import RMSNorm

    norm = RMSNorm(4096, zero_centered_gamma=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.003)
    norm = norm.to(torch.bfloat16)
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(1)).bfloat16()
    reference = torch.nn.functional.rms_norm(x.double(), (4096,), norm.weight.double() + 1)
    error = ((norm(x).double() - reference).abs() / reference.abs().clamp(min=1e-3)).max()
    assert error <= 2**-8


def test_each_evaluation_reads_fresh_validation_batches(monkeypatch):
    """As Megatron's validation iterator moves on: evaluations at iterations 2 and 4 (the last, evaluated in
    the loop as Megatron does) and the one after training read slots 0, 1 and 2 of the validation set."""
    from longctx_megatron.training import trainer as trainer_module
    from longctx_megatron.training.setup import setup

    starts, read = [], trainer_module.micro_batches
    trainer = setup(parse_run_config(["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "2",
                                      "--seq-length", "64", "--micro-batch-size", "1"], 1), log=lambda *_: None)

    def recording(dataset, consumed, *args):
        if dataset is trainer.valid_data:
            starts.append(consumed)
        return read(dataset, consumed, *args)

    monkeypatch.setattr(trainer_module, "micro_batches", recording)
    trainer.train()
    assert starts == [0, 1, 2, 3, 4, 5]
    assert len(trainer.valid_data) >= 6


def test_megatron_flags_adjust_a_config_by_the_same_rules():
    """On the built-in model (or a --config) the flags change what they name and nothing else, by the rules
    a whole Megatron model follows: sizes before the head-size check, windows with their skip frequency,
    RoPE scaling, the 1p norms."""
    base = demo_config()
    config = model_of(["--hidden-size", "512", "--kv-channels", "128", "--use-rope-scaling", "--rope-scaling-factor",
                       "4", "--apply-layernorm-1p", "--window-size", "15,0", "--window-attn-skip-freq", "[1,0]*2"])
    assert (config.d_model, config.n_heads, config.head_dim) == (512, base.n_heads, 128)
    assert config.rope.scaling == "llama3" and config.rope.factor == 4 and config.norm_zero_centered_gamma
    assert [(spec.kind, spec.window) for spec in config.layer_plan()] == [("sliding", 16), ("full", 0)] * 2
    assert model_of(["--window-size=-1,0"]).attention_layout == f"full:{base.n_layers}"  # Megatron: no window
    kept = model_of(["--rotary-base", "500000"])
    assert kept.rope.theta == 500000 and kept.attention_layout == base.attention_layout
    with pytest.raises(ConfigError, match="are exclusive"):
        model_of(["--window-size", "15,0", "--attention-layout", "sliding:2,full:2"])
