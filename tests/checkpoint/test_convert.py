"""tools/checkpoint/convert.py: Hugging Face Llama/Mistral <-> native, offline resharding, consolidation, errors."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist
import transformers  # a dev dependency: these tests must run, not skip

import pretrain_longctx
from longctx_megatron.checkpoint import layout, state
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.checkpoint.safetensors_io import SafetensorsReader
from longctx_megatron.config.serialization import config_from_dict
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.training.stages import build_pipeline_chunks
from tests.checkpoint.helpers import BASE, assert_same_tensors, tensors
from tests.distributed import run_on_ranks

_CONVERT = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint", "convert.py")
_spec = importlib.util.spec_from_file_location("convert", _CONVERT)  # tools/checkpoint is not a package
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

TOKENS = torch.arange(40) * 7 % 300  # a fixed sequence of 40 ids below the vocabulary size


def hf_model(directory: str, kind: str, **overrides) -> str:
    """A tiny random Llama (llama3 RoPE scaling) or Mistral (sliding window 16), saved as safetensors."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    if kind == "llama":
        config = transformers.LlamaConfig(**{**common, **overrides}, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    else:
        config = transformers.MistralConfig(**{**common, **overrides}, sliding_window=16)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: str) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS[None]).logits[0]


def _convert(*argv) -> None:
    assert convert.main(list(argv), log=lambda *_: None) == 0


def _pipeline_logits(rank, world_size, root, hf_dir):
    """Our model on TP=2 x PP=2 from the converted checkpoint: max |logits - Hugging Face's| on the last stage."""
    ctx = initialize_parallel(tensor=2, pipeline=2)
    reader = CheckpointReader(layout.iteration_dir(root, 0))
    config = config_from_dict(reader.metadata["config"])
    chunks = build_pipeline_chunks(config, ctx, reader.metadata["layout"]["stage_layers"])
    state.load(chunks, None, ctx, torch.device("cpu"), reader, steps=0, load_optimizer=False, load_rng=False)
    positions = torch.arange(len(TOKENS))[None]
    with torch.no_grad():
        if ctx.pp_rank == 0:
            dist.send(chunks[0].eval()(TOKENS[None], positions).contiguous(), dst=ctx.pp_ranks[1])
            return None
        hidden = torch.empty(1, len(TOKENS), config.d_model)
        dist.recv(hidden, src=ctx.pp_ranks[0])
        local, _ = chunks[0].eval()(None, positions, hidden=hidden)
        shards = [torch.empty_like(local) for _ in range(ctx.tp_size)]
        dist.all_gather(shards, local.contiguous(), group=ctx.tp_group)
        ours = torch.cat(shards, dim=-1)[0, :, :config.vocab_size]
    return float((ours - hf_logits(hf_dir)).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_converted_model_matches_hugging_face_on_tp2_pp2(tmp_path, kind):
    hf_dir = hf_model(str(tmp_path / "hf"), kind)
    root = str(tmp_path / "native")
    _convert("--from", "hf", "--to", "native", "--input", hf_dir, "--output", root,
             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    differences = [d for d in run_on_ranks(_pipeline_logits, 4, root, hf_dir, timeout=300) if d is not None]
    assert len(differences) == 2 and max(differences) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_hf_native_hf_round_trip_and_single_process_logits(tmp_path, kind):
    hf_dir = hf_model(str(tmp_path / "hf"), kind)
    root, back = str(tmp_path / "native"), str(tmp_path / "back")
    _convert("--from", "hf", "--to", "native", "--input", hf_dir, "--output", root)
    reader = CheckpointReader(layout.iteration_dir(root, 0))
    config = config_from_dict(reader.metadata["config"])
    assert config.layer_plan()[0].kind == ("full" if kind == "llama" else "sliding")
    model = build_model(config).eval()
    state.load([model], None, _single_ctx(), torch.device("cpu"), reader, 0, False, False)
    with torch.no_grad():
        assert (model(TOKENS[None])[0][0] - hf_logits(hf_dir)).abs().max() < 1e-4
    _convert("--from", "native", "--to", "hf", "--input", root, "--output", back)
    original, again = _safetensors(hf_dir), _safetensors(back)
    assert_same_tensors(original, again)
    assert json.load(open(os.path.join(back, "config.json")))["model_type"] == kind
    assert hf_logits(back).equal(hf_logits(hf_dir))  # transformers loads the export with no custom code


def _single_ctx():
    from longctx_megatron.parallel.state import ParallelContext

    return ParallelContext(world_size=1, rank=0, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                           tp_group=None, pp_group=None, dp_group=None, tp_ranks=(0,), pp_ranks=(0,), dp_ranks=(0,))


def _safetensors(directory: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with SafetensorsReader(os.path.join(directory, name)) as reader:
                out.update({key: reader.get(key).clone() for key in reader.keys()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A native checkpoint of a full-attention model after 3 iterations (so it has optimizer state)."""
    root = str(tmp_path_factory.mktemp("trained") / "ckpt")
    pretrain_longctx.run(BASE + ["--attention-layout", "full:8", "--untie-embeddings-and-output-weights",
                                 "--train-iters", "3", "--save", root], log=lambda *_: None)
    return root


def test_native_hf_native_round_trip_is_bit_identical(tmp_path, trained):
    hf_dir, again = str(tmp_path / "hf"), str(tmp_path / "again")
    _convert("--from", "native", "--to", "hf", "--input", trained, "--output", hf_dir)
    _convert("--from", "hf", "--to", "native", "--input", hf_dir, "--output", again,
             "--target-tensor-parallel-size", "2")
    assert_same_tensors(tensors(layout.iteration_dir(trained, 3), "model/"),
                        tensors(layout.iteration_dir(again, 0), "model/"))


def test_offline_reshard_keeps_every_tensor_and_cuts_the_target_layout(tmp_path, trained):
    out = str(tmp_path / "tp4pp2")
    _convert("--from", "native", "--to", "native", "--input", trained, "--output", out,
             "--target-tensor-parallel-size", "4", "--target-pipeline-parallel-size", "2")
    source, resharded = layout.iteration_dir(trained, 3), layout.iteration_dir(out, 3)
    # Global tensors unchanged: what loading under the new layout reads (on-the-fly resharding
    # reproduces the same global tensors, tests/checkpoint/test_resume_and_reshard.py).
    assert_same_tensors(tensors(source, "model/"), tensors(resharded, "model/"))
    assert_same_tensors(tensors(source, "optimizer/"), tensors(resharded, "optimizer/"))
    reader = CheckpointReader(resharded)
    qkv = reader.tensors["model/layers.0.attention.qkv.weight"]["pieces"]
    assert sorted(piece["offsets"][0] for piece in qkv) == [0, 96, 192, 288]  # 4 TP row blocks of 384 rows
    assert reader.metadata["layout"]["tensor"] == 4 and reader.metadata["consumed_samples"] == 12
    losses = pretrain_longctx.run(BASE + ["--attention-layout", "full:8", "--untie-embeddings-and-output-weights",
                                          "--train-iters", "4", "--load", out], log=lambda *_: None)
    expected = pretrain_longctx.run(BASE + ["--attention-layout", "full:8", "--untie-embeddings-and-output-weights",
                                            "--train-iters", "4", "--load", trained], log=lambda *_: None)
    assert losses == expected
    consolidated = str(tmp_path / "model.safetensors")
    _convert("--from", "native", "--to", "native", "--input", trained, "--output", consolidated, "--consolidate")
    with SafetensorsReader(consolidated) as file:
        assert torch.equal(file.get("layers.3.mlp.down.weight"), reader.read_global("model/layers.3.mlp.down.weight"))
        assert json.loads(file.metadata["config"])["n_layers"] == 8


def _error(capsys, *argv) -> str:
    assert convert.main(list(argv), log=lambda *_: None) == 2
    return capsys.readouterr().err


def test_errors_name_what_is_wrong(tmp_path, capsys, trained):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    config_path = os.path.join(hf_dir, "config.json")
    hf_config = json.load(open(config_path))
    json.dump({**hf_config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, open(config_path, "w"))
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "unsupported architecture 'GPT2LMHeadModel'" in message
    assert "supported: LlamaForCausalLM, MistralForCausalLM" in message  # the list is never empty
    json.dump([hf_config], open(config_path, "w"))
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "config.json: expected a JSON object, got a JSON list" in message
    json.dump({**hf_config, "intermediate_size": 80}, open(config_path, "w"))
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "model.layers.0.mlp.gate_proj.weight: shape [96, 64] in the checkpoint, [80, 64] expected" in message
    json.dump(hf_config, open(config_path, "w"))
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"),
                     "--target-tensor-parallel-size", "4")
    assert "tensor-model-parallel size 4 must divide n_kv_heads=2" in message
    sharded = hf_model(str(tmp_path / "sharded"), "llama")
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as file:
        json.dump({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}, file)
    assert "model-00001-of-00002.safetensors: missing shard" in _error(
        capsys, "--from", "hf", "--to", "native", "--input", sharded, "--output", str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "iter_0000000")  # nothing half-written


def test_plans_without_a_hugging_face_equivalent_are_refused_or_approximated(tmp_path, capsys):
    root = str(tmp_path / "ckpt")
    pretrain_longctx.run(BASE + ["--train-iters", "1", "--save", root], log=lambda *_: None)
    message = _error(capsys, "--from", "native", "--to", "hf", "--input", root, "--output", str(tmp_path / "hf"))
    assert "layers 0-3: sliding window 128 with global tokens every 64" in message
    assert "layers 4-5: dilated attention (window 64, dilation 2)" in message and "--allow-approximate" in message
    notes = []
    assert convert.main(["--from", "native", "--to", "hf", "--input", root, "--output", str(tmp_path / "hf"),
                         "--allow-approximate"], log=notes.append) == 0
    assert ("approximate: layers 0-3: sliding window 128 with global tokens every 64 -> full causal attention "
            "(every key they saw, and more)") in notes
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).config.model_type == "llama"


def test_sharded_hugging_face_directories_both_ways(tmp_path, monkeypatch):
    """Reading a model saved in several safetensors shards, and writing one (with its index)."""
    single = hf_model(str(tmp_path / "single"), "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(single, torch_dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    for name in ("single", "sharded"):
        _convert("--from", "hf", "--to", "native", "--input", str(tmp_path / name),
                 "--output", str(tmp_path / f"n-{name}"))
    assert_same_tensors(tensors(layout.iteration_dir(str(tmp_path / "n-single"), 0)),
                        tensors(layout.iteration_dir(str(tmp_path / "n-sharded"), 0)))
    monkeypatch.setattr(convert, "SHARD_BYTES", 100_000)
    _convert("--from", "native", "--to", "hf", "--input", str(tmp_path / "n-sharded"),
             "--output", str(tmp_path / "out"))
    assert len([n for n in os.listdir(tmp_path / "out") if n.endswith(".safetensors")]) > 1
    assert hf_logits(str(tmp_path / "out")).equal(hf_logits(single))
