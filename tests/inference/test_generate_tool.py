"""tools/generate.py and inference loading on real checkpoints: a native one saved under TP2 x PP2
(loaded on one process and on TP2: resharded), and Hugging Face Llama / Mistral directories."""

from __future__ import annotations

import contextlib
import io
import json
import os

import generate as generate_tool
import pytest
import torch

from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.generate import generate
from longctx_megatron.inference.loading import load_model
from longctx_megatron.parallel.state import initialize_parallel
from tests.checkpoint.test_convert import _single_ctx, hf_model
from tests.distributed import run_on_ranks
from tests.inference.oracles import greedy_by_full_forward, reference_model

PROMPTS = ["The quick brown fox jumps over the lazy dog; " * 3, "Hello"]




def _tool(rank, world_size, argv):
    return generate_tool.main(argv, log=lambda *_: None)


def _tool_error(rank, world_size, argv):
    """The exit code and what the tool printed to stderr."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = generate_tool.main(argv, log=lambda *_: None)
    return code, errors.getvalue()


def _argv(root, output, *more):
    prompts = [flag for prompt in PROMPTS for flag in ("--prompt", prompt)]
    return ["--load", root, "--tokenizer-type", "ByteTokenizer", *prompts, "--greedy", "--max-new-tokens", "12",
            "--ignore-eod", "--prefill-chunk", "16", "--output-file", output, *more]


@pytest.mark.slow
def test_the_tool_on_one_process_and_on_tp2_generates_what_full_forwards_do(checkpoint, tmp_path):
    single, tp2 = str(tmp_path / "single.jsonl"), str(tmp_path / "tp2.jsonl")
    assert run_on_ranks(_tool, 1, _argv(checkpoint, single)) == [0]
    assert run_on_ranks(_tool, 2, _argv(checkpoint, tp2, "--tensor-model-parallel-size", "2")) == [0, 0]
    reference = reference_model(checkpoint)
    tokenizer = ByteTokenizer()
    for path in (single, tp2):
        lines = [json.loads(line) for line in open(path)]
        assert [line["prompt"] for line in lines] == PROMPTS
        for line, prompt in zip(lines, PROMPTS, strict=True):
            assert line["tokens"] == greedy_by_full_forward(reference, tokenizer.encode(prompt), 12)
            assert line["text"] == tokenizer.decode(line["tokens"]) and line["finish_reason"] == "length"


def test_the_tool_under_context_parallelism_generates_what_full_forwards_do(checkpoint, tmp_path):
    """--context-parallel-size 2: the 405-token prompt's first 404 tokens are prefilled over the CP
    group (the checkpoint is the TP2 x PP2 one, loaded whole on each rank)."""
    output = str(tmp_path / "cp2.jsonl")
    argv = ["--load", checkpoint, "--tokenizer-type", "ByteTokenizer", "--prompt", PROMPTS[0] * 3, "--greedy",
            "--max-new-tokens", "12", "--ignore-eod", "--prefill-chunk", "16", "--output-file", output,
            "--context-parallel-size", "2"]
    assert run_on_ranks(_tool, 2, argv) == [0, 0]
    tokenizer = ByteTokenizer()
    [line] = [json.loads(line) for line in open(output)]
    assert line["tokens"] == greedy_by_full_forward(reference_model(checkpoint), tokenizer.encode(PROMPTS[0] * 3), 12)


def _tp2_logits(rank, world_size, root, prompts, steps):
    ctx = initialize_parallel(tensor=2)
    engine = InferenceEngine(load_model(root, ctx, torch.device("cpu"), torch.float32, "chunked",
                                        log=lambda *_: None).model, prefill_chunk=7, tp_group=ctx.tp_group)
    cache, logits = engine.prefill([p[:-steps] for p in prompts])
    out = [logits]
    for step in range(steps - 1):
        logits = engine.decode(cache, torch.tensor([p[-steps + step] for p in prompts]))
        out.append(logits)
    return torch.stack(out)


@pytest.mark.slow
def test_tp2_decoding_logits_equal_one_full_forward(checkpoint):
    tokenizer = ByteTokenizer()
    prompts = [tokenizer.encode(PROMPTS[0])[:90], tokenizer.encode(PROMPTS[0][::-1])[:90]]
    steps = 30  # decoded one at a time after a prefill of 60 tokens
    ranks = run_on_ranks(_tp2_logits, 2, checkpoint, prompts, steps, timeout=300)
    assert torch.equal(ranks[0], ranks[1])  # every rank samples from the same logits
    reference = reference_model(checkpoint)
    with torch.no_grad():
        full = reference(torch.tensor(prompts))[0]
    want = full[:, -steps - 1:-1].transpose(0, 1)  # logits after tokens 59 .. 88
    torch.testing.assert_close(ranks[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generation_from_a_hugging_face_directory_equals_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    directory = hf_model(str(tmp_path / "hf"), kind)
    loaded = load_model(directory, _single_ctx(), torch.device("cpu"), torch.float32, "chunked")
    prompt = (torch.arange(30) * 11 % 300).tolist()  # past the Mistral window of 16 once generating
    ours = generate(InferenceEngine(loaded.model, prefill_chunk=8), [prompt], 16)[0].tokens
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert ours == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("argv,message", [
    (["--load", "/nonexistent", "--prompt", "x"], "no such directory"),
    (["--load", "."], "at least one --prompt"),
    (["--load", ".", "--prompt-file", "/nonexistent.txt"], "nonexistent.txt"),
])
def test_bad_flags_are_named_with_exit_code_2(argv, message, capsys):
    assert generate_tool.main([*argv, "--tokenizer-type", "ByteTokenizer"], log=lambda *_: None) == 2
    assert message in capsys.readouterr().err


def test_another_tokenizer_than_the_checkpoints_is_refused(checkpoint):
    [(code, error)] = run_on_ranks(_tool_error, 1, ["--load", checkpoint, "--tokenizer-type", "NullTokenizer",
                                                    "--vocab-size", "200", "--prompt", "1 2 3"])
    assert code == 2 and "trained with another tokenizer" in error and "Traceback" not in error


def test_a_directory_without_a_checkpoint_is_named(tmp_path):
    os.makedirs(tmp_path / "empty")
    [(code, error)] = run_on_ranks(_tool_error, 1, ["--load", str(tmp_path / "empty"), "--tokenizer-type",
                                                    "ByteTokenizer", "--prompt", "x"])
    assert code == 2 and "no checkpoint there" in error and "Traceback" not in error
