"""tools/checkpoint/convert.py --from megatron / --to megatron against megatron-core's own GPTModel on CPU.

Megatron checkpoints are written here the way Megatron-LM lays them out (legacy ``torch`` format: one
pickle per TP x PP rank, with its args), or by megatron-core's dist_checkpointing (``torch_dist``);
the converted native checkpoint must give megatron-core's logits, and an exported one must load
into megatron-core's GPTModel with strict=True and give ours.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing
import os
import pickle

import pytest
import torch

from longctx_megatron.checkpoint import layout, megatron, state
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.checkpoint.sharded import Checkpointer
from longctx_megatron.config.serialization import config_from_dict
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.state import ParallelContext
from tests.checkpoint.helpers import assert_same_tensors, tensors
from tests.checkpoint.megatron_helpers import (
    TOKENS,
    args_namespace,
    global_state,
    gpt_model,
    megatron_cpu,
    megatron_logits,
    save_legacy,
    save_torch_dist,
)
from tests.distributed import run_on_ranks

_CONVERT = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint", "convert.py")
_spec = importlib.util.spec_from_file_location("convert", _CONVERT)  # tools/checkpoint is not a package
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)


@pytest.fixture(autouse=True)
def mcore(request):
    """Per test (conftest tears down every test's process group); a test that runs the trainer opts out
    with ``own_process_group`` in its name and enters megatron_cpu itself."""
    if "own_process_group" in request.node.name:
        yield
        return
    with megatron_cpu():
        yield


def _convert(*argv) -> None:
    assert convert.main([str(a) for a in argv], log=lambda *_: None) == 0


def _error(capsys, *argv) -> str:
    assert convert.main([str(a) for a in argv], log=lambda *_: None) == 2
    return capsys.readouterr().err


def _single_ctx() -> ParallelContext:
    return ParallelContext(world_size=1, rank=0, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                           tp_group=None, pp_group=None, dp_group=None, tp_ranks=(0,), pp_ranks=(0,), dp_ranks=(0,))


def _native(root: str):
    """Our model (one process, whatever layout the checkpoint was written for) loaded from ``root``."""
    reader = CheckpointReader(layout.iteration_dir(root, 0))
    config = config_from_dict(reader.metadata["config"])
    model = build_model(config).eval()
    state.load([model], None, _single_ctx(), torch.device("cpu"), reader, 0, False, False)
    return model, config, reader


def _native_logits(root: str) -> tuple[torch.Tensor, object]:
    model, config, _ = _native(root)
    with torch.no_grad():
        return model(TOKENS[None])[0][0], config


def _assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape[-1] <= theirs.shape[-1]
    assert (ours - theirs[:, :ours.shape[-1]]).abs().max() < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_legacy_tp1_matches_megatron_core(tmp_path, tied):
    args = args_namespace(tied=tied)
    model = gpt_model(args)
    root = save_legacy(str(tmp_path / "mega"), global_state(model), args)
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native")
    ours, config = _native_logits(str(tmp_path / "native"))
    assert config.tie_embeddings == tied and config.vocab_size == 384 and config.n_kv_heads == 2
    _assert_same_logits(ours, megatron_logits(model))
    assert os.path.isfile(tmp_path / "native" / "model.yaml")


def test_legacy_tp2_pp2_source_untied_layernorm_1p_to_tp2_pp2(tmp_path):
    """TP2 shards (fc1 [gate_r; up_r], vocabulary padded to 512 rows, 384 kept) x PP2 (layers from 0 per
    stage); norms stored as gamma - 1."""
    args = args_namespace(tied=False, tensor=2, pipeline=2, layernorm_1p=True)
    model = gpt_model(args)
    stored = {name: t - 1 if "norm" in name else t for name, t in global_state(model).items()}
    root = save_legacy(str(tmp_path / "mega"), stored, args)
    assert sorted(os.listdir(os.path.join(root, "iter_0000007"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native",
             "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    _, _, reader = _native(str(tmp_path / "native"))
    assert reader.metadata["layout"]["tensor"] == 2 and reader.metadata["layout"]["pipeline"] == 2
    ours, config = _native_logits(str(tmp_path / "native"))
    assert config.vocab_size == 384 and args.padded_vocab_size == 512
    _assert_same_logits(ours, megatron_logits(model))
    # the norms stay zero-centred (exact in any dtype), and so does the export
    assert config.norm_zero_centered_gamma
    _convert("--from", "native", "--to", "megatron", "--input", tmp_path / "native", "--output", tmp_path / "back")
    exported, saved_args = _exported_state(str(tmp_path / "back"), 1, 1)
    assert saved_args.apply_layernorm_1p and saved_args.layernorm_zero_centered_gamma
    torch.testing.assert_close(exported["decoder.final_layernorm.weight"], stored["decoder.final_layernorm.weight"],
                               rtol=0, atol=0)


def test_legacy_tied_virtual_pipeline_and_release_directory(tmp_path):
    """PP2 x virtual PP2 (model0, model1 on each rank, layers 0,2 | 1,3), tied (the last stage's copy of
    the embedding is ignored), in a ``release`` directory."""
    args = args_namespace(tied=True, pipeline=2, virtual_pipeline_model_parallel_size=2)
    model = gpt_model(args)
    root = save_legacy(str(tmp_path / "mega"), global_state(model), args, virtual=2, release=True)
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native")
    ours, _ = _native_logits(str(tmp_path / "native"))
    _assert_same_logits(ours, megatron_logits(model))


def test_sliding_window(tmp_path):
    args = args_namespace(tied=True, window=(7, 0))
    model = gpt_model(args)
    root = save_legacy(str(tmp_path / "mega"), global_state(model), args)
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native")
    ours, config = _native_logits(str(tmp_path / "native"))
    assert {(spec.kind, spec.window, spec.global_every) for spec in config.layer_plan()} == {("sliding", 8, 0)}
    _assert_same_logits(ours, megatron_logits(model))
    full = megatron_logits(gpt_model(args_namespace(tied=True)))  # the window matters at 24 tokens
    assert (ours - full[:, :ours.shape[-1]]).abs().max() > 1e-3


def test_llama3_rope_scaling(tmp_path):
    args = args_namespace(tied=True, use_rope_scaling=True, rope_scaling_factor=4.0, rotary_base=500000)
    model = gpt_model(args)
    root = save_legacy(str(tmp_path / "mega"), global_state(model), args)
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native")
    ours, config = _native_logits(str(tmp_path / "native"))
    assert (config.rope.scaling, config.rope.factor, config.rope.theta) == ("llama3", 4.0, 500000.0)
    _assert_same_logits(ours, megatron_logits(model))
    assert megatron.config_to_megatron(config, 1, 1, "local").use_rope_scaling


def test_torch_dist_written_by_megatron_core(tmp_path):
    args = args_namespace(tied=False)
    model = gpt_model(args)
    root = save_torch_dist(str(tmp_path / "mega"), model, args)
    names = os.listdir(os.path.join(root, "iter_0000005"))
    assert ".metadata" in names and "common.pt" in names and any(n.endswith(".distcp") for n in names)
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native",
             "--target-tensor-parallel-size", 2)
    ours, _ = _native_logits(str(tmp_path / "native"))
    _assert_same_logits(ours, megatron_logits(model))


def _exported_state(directory: str, tp: int, pp: int) -> tuple[dict, object]:
    """The global mcore state dict of an exported checkpoint (TP shards merged, layers renumbered)."""
    merged, args, offset = {}, None, 0
    for p in range(pp):
        ranks = [megatron.safe_load(os.path.join(directory, "iter_0000000", f"mp_rank_{t:02d}" + (
            f"_{p:03d}" if pp > 1 else ""), "model_optim_rng.pt")) for t in range(tp)]
        args = ranks[0]["args"]
        assert ranks[0]["checkpoint_version"] == 3.0 and ranks[0]["iteration"] == 0
        layers = set()
        for name, value in ranks[0]["model"].items():
            parts = name.split(".")
            if name.startswith("decoder.layers."):
                layers.add(int(parts[2]))
                parts[2] = str(int(parts[2]) + offset)
            glob = ".".join(parts)
            if value is None:
                merged[glob] = None
            elif not (glob == "output_layer.weight" and p < pp - 1):
                merged[glob] = megatron.merge(glob, [rank["model"][name] for rank in ranks])
        offset += len(layers)
    return merged, args


@pytest.mark.parametrize("tp, pp, tied", [(1, 1, True), (2, 2, False)])
def test_export_loads_into_megatron_core_strictly(tmp_path, tp, pp, tied):
    args = args_namespace(tied=tied)
    source = gpt_model(args, seed=3)
    save_legacy(str(tmp_path / "mega"), global_state(source), args)
    _convert("--from", "megatron", "--to", "native", "--input", tmp_path / "mega", "--output", tmp_path / "native")
    ours, config = _native_logits(str(tmp_path / "native"))
    out = tmp_path / "back"
    _convert("--from", "native", "--to", "megatron", "--input", tmp_path / "native", "--output", out,
             "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp)
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "0"
    exported, saved_args = _exported_state(str(out), tp, pp)
    assert saved_args.tensor_model_parallel_size == tp and saved_args.pipeline_model_parallel_size == pp
    assert saved_args.padded_vocab_size == 128 * tp * -(-384 // (128 * tp))
    target = gpt_model(megatron.config_to_megatron(config, 1, 1, "local"), seed=9)
    if tied:  # the last stage's copy of the embedding (PP > 1) has no place in a one-stage model
        exported.pop("output_layer.weight", None)
    padded = target.state_dict()["embedding.word_embeddings.weight"].shape[0]
    exported = {k: v[:padded] if k.startswith(("embedding.", "output_layer.")) and v is not None else v
                for k, v in exported.items()}
    target.load_state_dict(exported, strict=True)
    _assert_same_logits(ours, megatron_logits(target))
    # and back: the same global tensors as before the export
    _convert("--from", "megatron", "--to", "native", "--input", out, "--output", tmp_path / "again")
    assert_same_tensors(tensors(layout.iteration_dir(str(tmp_path / "native"), 0), "model/"),
                        tensors(layout.iteration_dir(str(tmp_path / "again"), 0), "model/"))


def test_export_transformer_engine_names_and_refusals(tmp_path, capsys):
    args = args_namespace(tied=True, window=(7, 0))
    save_legacy(str(tmp_path / "mega"), global_state(gpt_model(args)), args)
    _convert("--from", "megatron", "--to", "native", "--input", tmp_path / "mega", "--output", tmp_path / "native")
    _convert("--from", "native", "--to", "megatron", "--input", tmp_path / "native", "--output", tmp_path / "te",
             "--megatron-transformer-impl", "transformer_engine")
    saved = megatron.safe_load(str(tmp_path / "te" / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"))
    names = set(saved["model"])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    assert saved["args"].window_size == (7, 0) and saved["args"].transformer_impl == "transformer_engine"
    # what a killed export left beside its output is removed by the next one; a directory of others' files is not
    left = tmp_path / ".again.abcd1234.incomplete"
    os.makedirs(left / "iter_0000000" / "mp_rank_00")
    (left / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"x")
    (left / ".latest_checkpointed_iteration.txt.k2j4h5g6.tmp").write_text("0")
    foreign = tmp_path / ".again.zzzz9999.incomplete"
    os.makedirs(foreign)
    (foreign / "notes.txt").write_text("mine")
    _convert("--from", "native", "--to", "megatron", "--input", tmp_path / "native", "--output", tmp_path / "again")
    assert not left.exists() and (foreign / "notes.txt").exists()
    # an output directory that is not empty, and a layout Megatron cannot hold
    assert "not empty" in _error(capsys, "--from", "native", "--to", "megatron", "--input", tmp_path / "native",
                                 "--output", tmp_path / "te")
    assert "does not divide num_query_groups=2" in _error(
        capsys, "--from", "native", "--to", "megatron", "--input", tmp_path / "native", "--output",
        tmp_path / "tp4", "--target-tensor-parallel-size", 4)
    assert not os.path.exists(tmp_path / "tp4")


def test_export_refuses_plans_megatron_cannot_express():
    from longctx_megatron.config import ModelConfig

    config = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=384, max_seq_len=128,
                         attention_layout="sliding:2,dilated:2", sliding_window=16, global_every=8,
                         dilated_window=8, dilation=2)
    with pytest.raises(megatron.ConversionError) as error:
        megatron.config_to_megatron(config, 1, 1, "local")
    assert "layers 0-1: sliding window 16 with global tokens every 8" in str(error.value)
    assert "layers 2-3: dilated attention (window 8, dilation 2)" in str(error.value)


# ------------------------------------------------------------------------------------------ trust boundary
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    args = args_namespace()
    root = save_legacy(str(tmp_path / "mega"), global_state(gpt_model(args)), args)
    path = os.path.join(root, "iter_0000007", "mp_rank_00", "model_optim_rng.pt")
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": {}, "x": _Exploit()}, path)
    monkeypatch.chdir(tmp_path)
    message = _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert path in message and "refused to unpickle" in message and "system" in message
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists(tmp_path / "n")
    with open(path, "wb") as file:  # a plain pickle, not a torch zip file
        pickle.dump({"args": _Exploit()}, file)
    assert path in _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert not os.path.exists(tmp_path / "pwned")


def test_symlinks_traversal_and_shapes_are_refused(tmp_path, capsys):
    args = args_namespace(tensor=2)
    model = gpt_model(args)
    root = save_legacy(str(tmp_path / "mega"), global_state(model), args)
    iteration = os.path.join(root, "iter_0000007")
    # a rank directory that is a symlink (it may point anywhere)
    os.rename(os.path.join(iteration, "mp_rank_01"), tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", os.path.join(iteration, "mp_rank_01"))
    message = _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert "mp_rank_01 is a symlink" in message
    os.remove(os.path.join(iteration, "mp_rank_01"))
    os.rename(tmp_path / "elsewhere", os.path.join(iteration, "mp_rank_01"))
    # a shard whose shape disagrees with the args
    path = os.path.join(iteration, "mp_rank_01", "model_optim_rng.pt")
    saved = torch.load(path, weights_only=False)
    saved["model"]["decoder.layers.2.mlp.linear_fc2.weight"] = torch.zeros(64, 40)
    torch.save(saved, path)
    message = _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert path in message and "decoder.layers.2.mlp.linear_fc2.weight has shape [64, 40]" in message
    assert not os.path.exists(tmp_path / "n")
    # a missing rank, and a weight the converter does not know
    saved["model"]["decoder.layers.2.mlp.linear_fc2.weight"] = torch.zeros(64, 48)
    saved["model"]["decoder.layers.2.self_attention.q_layernorm.weight"] = torch.ones(16)
    torch.save(saved, path)
    assert "q_layernorm" in _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output",
                                   tmp_path / "n")
    os.rename(os.path.join(iteration, "mp_rank_01"), os.path.join(iteration, "old"))
    assert "missing [mp_rank_01]" in _error(capsys, "--from", "megatron", "--to", "native", "--input", root,
                                            "--output", tmp_path / "n")


def test_torch_dist_chunk_outside_the_directory_is_refused(tmp_path, capsys):
    from torch.distributed.checkpoint.metadata import Metadata

    args = args_namespace()
    root = save_torch_dist(str(tmp_path / "mega"), gpt_model(args), args)
    path = os.path.join(root, "iter_0000005", ".metadata")
    metadata = megatron.dcp_read_metadata(path)
    storage = {index: dataclasses.replace(info, relative_path="../../secret.distcp")
               for index, info in metadata.storage_data.items()}
    with open(path, "wb") as file:
        pickle.dump(Metadata(metadata.state_dict_metadata, metadata.planner_data, storage), file)
    message = _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert "'../../secret.distcp', not a plain file name" in message
    with open(path, "wb") as file:
        pickle.dump({"x": _Exploit()}, file)
    message = _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert path in message and "refused to unpickle" in message and "posix.system" in message


@pytest.mark.parametrize("arg, value", [("normalization", "LayerNorm"), ("add_bias_linear", True),
                                        ("position_embedding_type", "learned_absolute"), ("rotary_percent", 0.5),
                                        ("num_experts", 8), ("qk_l2_norm", True),
                                        ("rotary_seq_len_interpolation_factor", 4)])
def test_unsupported_architectures_are_refused_naming_the_arg(tmp_path, capsys, arg, value):
    args = args_namespace(**{"tied": True})
    setattr(args, arg, value)
    root = save_legacy(str(tmp_path / "mega"), global_state(gpt_model(args_namespace())), args)
    message = _error(capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")
    assert f"args.{arg}={value!r}" in message and "would build a model this one cannot" in message


@pytest.mark.parametrize("kind", ["torch", "torch_dist"])
def test_load_of_a_megatron_checkpoint_names_the_convert_command(tmp_path, capsys, kind):
    args = args_namespace()
    model = gpt_model(args)
    root = str(tmp_path / "mega")
    if kind == "torch":
        save_legacy(root, global_state(model), args)
    else:
        save_torch_dist(root, model, args)
    with pytest.raises(CheckpointError) as error:
        Checkpointer(None, log=lambda *_: None).find(root)
    message = str(error.value)
    assert f"Megatron-LM checkpoint ({kind} format" in message
    assert f"python tools/checkpoint/convert.py --from megatron --to native --input {root}" in message
    assert "convert.py --from megatron" in _error(capsys, "--from", "native", "--to", "hf", "--input", root,
                                                  "--output", tmp_path / "hf")


def test_pre_megatron_core_models_are_refused(tmp_path, capsys):
    args = args_namespace()
    state = {name.replace("decoder.", "language_model.encoder.", 1): tensor
             for name, tensor in global_state(gpt_model(args)).items()}
    root = save_legacy(str(tmp_path / "mega"), state, args)
    assert "legacy Megatron-LM model (language_model.*" in _error(
        capsys, "--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "n")


def test_pretrain_load_of_a_megatron_checkpoint_names_the_convert_command_own_process_group(tmp_path):
    import pretrain_longctx
    from tests.checkpoint.helpers import BASE

    args = args_namespace()
    with megatron_cpu():
        root = save_legacy(str(tmp_path / "mega"), global_state(gpt_model(args)), args)
    with pytest.raises(CheckpointError) as error:
        pretrain_longctx.run(BASE + ["--train-iters", "1", "--load", root], log=lambda *_: None)
    assert f"convert.py --from megatron --to native --input {root} --output {root}-native" in str(error.value)


def _tp2_rank(rank, world_size, root, load):
    """One rank of megatron-core's GPTModel at TP = 2 (gloo, CPU): save this rank's state dict as Megatron's
    legacy saver does (``load`` None), or load its shard of an export strictly; its logits' vocab slice."""
    with megatron_cpu(tensor_size=2):
        args = args_namespace(tied=False, tensor=2)
        model = gpt_model(args, seed=5 if load else 4)
        if load:
            saved = megatron.safe_load(os.path.join(load, "iter_0000000", f"mp_rank_{rank:02d}", "model_optim_rng.pt"))
            assert saved["args"].tensor_model_parallel_size == 2
            model.load_state_dict(saved["model"], strict=True)
        else:
            directory = os.path.join(root, "iter_0000007", f"mp_rank_{rank:02d}")
            os.makedirs(directory)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7,
                        "model": model.state_dict_for_save_checkpoint()}, os.path.join(directory, "model_optim_rng.pt"))
            if rank == 0:
                with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as file:
                    file.write("7")
            # collective: both ranks write their shards; megatron's writer forks workers, which a daemonic
            # process (run_on_ranks's ranks) may not, so this rank stops calling itself one
            multiprocessing.current_process().daemon = False
            save_torch_dist(root + "-dist", model, args)
        return megatron_logits(model)


@pytest.mark.slow
def test_real_tp2_megatron_core_both_ways_own_process_group(tmp_path):
    """The shards a 2-process TP = 2 megatron-core model saves (torch format, and torch_dist by its
    dist_checkpointing) convert to its logits, and the TP = 2 export loads into it (strict) with ours."""
    root = str(tmp_path / "mega")
    theirs = torch.cat(run_on_ranks(_tp2_rank, 2, root, None, timeout=300), dim=-1)
    _convert("--from", "megatron", "--to", "native", "--input", root, "--output", tmp_path / "native")
    ours, _ = _native_logits(str(tmp_path / "native"))
    _assert_same_logits(ours, theirs)
    _convert("--from", "megatron", "--to", "native", "--input", root + "-dist", "--output", tmp_path / "from-dist")
    assert_same_tensors(tensors(layout.iteration_dir(str(tmp_path / "native"), 0), "model/"),
                        tensors(layout.iteration_dir(str(tmp_path / "from-dist"), 0), "model/"))
    _convert("--from", "native", "--to", "megatron", "--input", tmp_path / "native", "--output", tmp_path / "out",
             "--target-tensor-parallel-size", 2)
    loaded = torch.cat(run_on_ranks(_tp2_rank, 2, root, str(tmp_path / "out"), timeout=300), dim=-1)
    _assert_same_logits(ours, loaded)
