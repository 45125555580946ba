"""The training entry point: flags, schedule, the demo run, and parallel layouts against one process."""

from __future__ import annotations

import pytest
import torch

import pretrain_longctx
from longctx_megatron.parallel.grad_norm import clip_grad_norm
from longctx_megatron.training.arguments import build_parser, parse_run_config
from longctx_megatron.training.lr_schedule import learning_rate
from longctx_megatron.training.precision import LossScaler
from tests.distributed import run_on_ranks
from tests.flags import LLAMA_ARCHITECTURE

SMALL = ["--train-iters", "5", "--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--num-layers", "8", "--attention-layout", "sliding:4,dilated:2,full:2", "--attention-backend", "chunked",
         "--log-interval", "5", "--eval-iters", "1",
         # the schedule these tests were tuned with (Megatron's defaults: no warm-up, linear, beta2 0.999, wd 0.01)
         "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--adam-beta2", "0.95", "--weight-decay", "0.1"]


def test_learning_rate_schedule():
    assert learning_rate(0, 1.0, 0.1, 10, 100, "cosine") == 0.0  # Megatron's first warm-up step
    assert learning_rate(10, 1.0, 0.1, 10, 100, "cosine") == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 0.1, 10, 100, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(55, 1.0, 0.1, 10, 100, "linear") == pytest.approx(0.55)
    assert learning_rate(500, 1.0, 0.1, 10, 100, "linear") == 0.1
    assert learning_rate(500, 1.0, 0.1, 10, 100, "constant") == 1.0
    with pytest.raises(ValueError, match="--lr-decay-style 'step' is unknown"):
        learning_rate(0, 1.0, 0.0, 0, 10, "step")


def test_loss_scaler():
    scaler = LossScaler(1024.0, growth_interval=2)
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 1024.0


@pytest.mark.parametrize("flags,world,message", [
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are exclusive"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible by (tensor 2 x pipeline 1) = 2"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6 must be a multiple"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "7"], 2, "divisible by"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "12", "--micro-batch-size", "4"], 2, "micro-batches per step (3) to be a multiple"),
    (["--data-path", "x"], 1, "--data-path needs --tokenizer-type"),
    (["--train-iters", "0"], 1, "--train-iters must be positive"),
    (["--clip-grad", "-1"], 1, "--clip-grad must be >= 0 (0: no clipping)"),
])
def test_bad_flags_fail_before_any_work(flags, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_run_config(flags, world)


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--tensor-model-parallel-size", "4"], "tensor-model-parallel size 4 must divide n_kv_heads=2"),
    (["--data-path", "/nonexistent/corpus", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50"],
     "no /nonexistent/corpus.bin/.idx"),
])
def test_layout_and_data_errors_come_before_any_process_group(flags, message, monkeypatch):
    import longctx_megatron.training.setup as setup

    monkeypatch.setattr(setup, "initialize_parallel", lambda **_: pytest.fail("process groups were created"))
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        setup.setup(parse_run_config(flags, 4))


def test_cli_reports_bad_model_config(tmp_path, capsys):
    bad = tmp_path / "model.yaml"
    bad.write_text("d_model: 100\nn_heads: 3\n")
    assert pretrain_longctx.main(["--config", str(bad)]) == 2
    assert "d_model=100 must be divisible by n_heads=3" in capsys.readouterr().err


def test_demo_trains_logs_and_evaluates(tmp_path):
    lines = []
    losses = pretrain_longctx.run(["--train-iters", "20", "--seq-length", "256", "--log-interval", "10",
                                   "--eval-interval", "10", "--tensorboard-dir", str(tmp_path / "tb")],
                                  log=lines.append)
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < losses[0] - 1.5
    text = "\n".join(lines)
    for field in ("consumed samples 80", "lr ", "grad norm", "tokens/s", "TFLOP/s per device", "peak memory",
                  "skipped 0", "ETA", "validation at iteration 10", "perplexity"):
        assert field in text, field
    assert list((tmp_path / "tb").iterdir())  # TensorBoard event file written


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_recompute_gives_the_same_losses(granularity):
    plain = pretrain_longctx.run(SMALL[:1] + ["2"] + SMALL[2:], log=lambda *_: None)
    again = pretrain_longctx.run(SMALL[:1] + ["2"] + SMALL[2:] + ["--recompute-granularity", granularity],
                                 log=lambda *_: None)
    assert again == plain


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    lines = []
    losses = pretrain_longctx.run(SMALL[:1] + ["3"] + SMALL[2:] + ["--fp16", "--initial-loss-scale", "1e30",
                                                                   "--log-interval", "1"], log=lines.append)
    steps = [line for line in lines if line.startswith("iteration")]
    assert "skipped 1 | loss scale 5e+29" in steps[0]  # gradients overflowed fp16: no update, scale halved
    assert "skipped 3" in steps[2]
    frozen = pretrain_longctx.run(SMALL[:1] + ["3"] + SMALL[2:] + ["--fp16", "--lr", "0", "--min-lr", "0"],
                                  log=lambda *_: None)
    assert losses == frozen  # the skipped steps left the weights exactly as a learning rate of 0 does


def _tied_copies_body(rank, world_size, flags):
    from longctx_megatron.training.arguments import parse_run_config
    from longctx_megatron.training.setup import setup

    trainer = setup(parse_run_config(flags, world_size), log=lambda *_: None)
    trainer.step(0)
    holder = next(chunk for chunk in trainer.chunks if chunk.embedding is not None)
    return holder.embedding.weight.detach().numpy().copy()


@pytest.mark.slow
def test_tied_embedding_copies_stay_equal_under_pipeline_and_zero1():
    """The first stage's embedding and the last stage's copy get the same update on every DP rank."""
    flags = ("--hidden-size 256 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 1024 --vocab-size 8192 "
             "--num-layers 6 --seq-length 64 --micro-batch-size 1 --train-iters 1 --pipeline-model-parallel-size 2 "
             "--use-distributed-optimizer").split() + LLAMA_ARCHITECTURE  # the embedding spans both DP shards
    weights = run_on_ranks(_tied_copies_body, 4, flags)
    assert all((weights[0] == other).all() for other in weights[1:])


def test_clip_grad_zero_means_no_clipping():
    """Megatron's --clip-grad 0 turns clipping off; it used to scale every gradient by 0."""
    model = torch.nn.Linear(4, 4)
    model.weight.grad = torch.full((4, 4), 3.0)
    norm = clip_grad_norm(model, 0.0, None)
    assert norm.item() == pytest.approx(12.0) and (model.weight.grad == 3.0).all()
    clip_grad_norm(model, 1.2, None)
    assert model.weight.grad.norm().item() == pytest.approx(1.2, rel=1e-5)

