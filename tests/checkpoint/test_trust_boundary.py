"""Files named by someone else's manifest or index: only regular files inside the directory, only
verified ones, never a hang (issue 13's reading-outside-the-directory cases)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from longctx_megatron.checkpoint import layout
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.reader import CheckpointReader, verify_files
from longctx_megatron.checkpoint.safetensors_io import file_crc32, write_safetensors
from tests.checkpoint.test_convert import _error, convert, hf_model

METADATA = {"format": "longctx-megatron sharded checkpoint", "version": 1, "iteration": 0, "consumed_samples": 0,
            "skipped_iterations": 0, "optimizer_steps": 0, "loss_scaler": None, "learning_rate": None,
            "config": {}, "tokenizer": None, "params_dtype": "float32",
            "layout": {"tensor": 1, "pipeline": 1, "data": 1, "stage_layers": [1], "sequence_parallel": False,
                       "distributed_optimizer": False}}


def _checkpoint(directory, piece_file: str | None = None, files: dict | None = None) -> str:
    """A one-tensor checkpoint in ``directory``; ``piece_file`` / ``files`` replace what the manifest names."""
    os.makedirs(directory, exist_ok=True)
    written = write_safetensors(os.path.join(directory, "shard_00000.safetensors"), {"w#0": torch.ones(2)})
    listed = {"shard_00000.safetensors": {"bytes": written.bytes, "crc32": written.crc32}} if files is None else files
    piece = {"file": piece_file or "shard_00000.safetensors", "key": "w#0", "offsets": [0], "shape": [2]}
    with open(os.path.join(directory, layout.MANIFEST), "w") as file:
        json.dump({"files": listed, "tensors": {"model/w": {"shape": [2], "dtype": "torch.float32",
                                                            "pieces": [piece]}}}, file)
    with open(os.path.join(directory, layout.METADATA), "w") as file:
        json.dump(METADATA, file)
    return str(directory)


_OPENED: list[str] | None = None  # while a test records them: every path any code opens (audit events)


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_record_opens)  # cannot be removed; does nothing unless a test is recording


@pytest.fixture
def opened():
    """The real paths opened during the test (by open(), os.open(), anything that audits "open")."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def test_a_sound_checkpoint_reads(tmp_path, opened):
    directory = _checkpoint(tmp_path / "ckpt")
    opened.clear()
    assert verify_files(directory) == []
    assert CheckpointReader(directory).read_global("model/w").tolist() == [1.0, 1.0]
    assert os.path.realpath(os.path.join(directory, "shard_00000.safetensors")) in opened  # the recorder works


@pytest.mark.parametrize("absolute", [False, True])
def test_a_piece_outside_the_directory_is_refused_and_never_opened(tmp_path, opened, absolute):
    outside = str(tmp_path / "outside.safetensors")
    write_safetensors(outside, {"w#0": torch.full((2,), 7.0)})  # a sound file, if anything opened it
    directory = _checkpoint(tmp_path / "ckpt", piece_file=outside if absolute else "../outside.safetensors")
    opened.clear()  # what the test itself wrote
    with pytest.raises(CheckpointError, match="a plain file name"):
        CheckpointReader(directory)
    assert verify_files(directory) and "a plain file name" in verify_files(directory)[0]
    assert os.path.realpath(outside) not in opened


def test_a_piece_in_an_unverified_file_is_refused(tmp_path):
    directory = _checkpoint(tmp_path / "ckpt", piece_file="other.safetensors")
    write_safetensors(os.path.join(directory, "other.safetensors"), {"w#0": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not among the manifest's files"):
        CheckpointReader(directory)


@pytest.mark.parametrize("pieces,message", [
    ([([0], [2]), ([1], [1])], "hold 3 values, the tensor of shape \\[2\\] has 2"),  # overlap, too many values
    ([([0], [1]), ([0], [1])], "pieces\\[0\\] and pieces\\[1\\] overlap"),  # the right count, one element twice
    ([([0], [1])], "hold 1 values, the tensor of shape \\[2\\] has 2"),  # a gap: torch.empty memory would be loaded
])
def test_pieces_must_cover_every_element_exactly_once(tmp_path, pieces, message):
    directory = _checkpoint(tmp_path / "ckpt")
    path = os.path.join(directory, layout.MANIFEST)
    manifest = json.load(open(path))
    manifest["tensors"]["model/w"]["pieces"] = [{"file": "shard_00000.safetensors", "key": "w#0", "offsets": offsets,
                                                 "shape": shape} for offsets, shape in pieces]
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError, match=message):
        CheckpointReader(directory)


def test_a_piece_whose_stored_shape_differs_is_refused(tmp_path):
    directory = _checkpoint(tmp_path / "ckpt")
    written = write_safetensors(os.path.join(directory, "shard_00000.safetensors"), {"w#0": torch.ones(1, 2)})
    path = os.path.join(directory, layout.MANIFEST)
    manifest = json.load(open(path))
    manifest["files"]["shard_00000.safetensors"] = {"bytes": written.bytes, "crc32": written.crc32}
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError, match=r"'w#0' is \[1, 2\] torch.float32; the manifest says \[2\]"):
        CheckpointReader(directory).read_global("model/w")


def test_absolute_file_entries_are_refused_and_never_opened(tmp_path, opened):
    directory = _checkpoint(tmp_path / "ckpt", files={"/etc/hostname": {"bytes": 1, "crc32": 0}})
    opened.clear()
    assert "a plain file name" in " ".join(verify_files(directory))
    assert os.path.realpath("/etc/hostname") not in opened


def test_a_fifo_is_reported_not_read(tmp_path):
    directory = _checkpoint(tmp_path / "ckpt")
    os.remove(os.path.join(directory, "shard_00000.safetensors"))
    os.mkfifo(os.path.join(directory, "shard_00000.safetensors"))  # opening it for reading would block forever
    assert any("is a FIFO" in problem for problem in verify_files(directory))
    with pytest.raises(CheckpointError, match="is a FIFO"):
        CheckpointReader(directory).read_global("model/w")
    os.remove(os.path.join(directory, layout.METADATA))
    os.mkfifo(os.path.join(directory, layout.METADATA))
    assert any("is a FIFO" in problem for problem in verify_files(directory))


def test_a_symlink_is_not_followed(tmp_path, opened):
    directory = _checkpoint(tmp_path / "ckpt")
    outside = _checkpoint(tmp_path / "elsewhere")
    shard = os.path.join(directory, "shard_00000.safetensors")
    os.remove(shard)
    os.symlink(os.path.join(outside, "shard_00000.safetensors"), shard)
    opened.clear()  # what the test itself wrote
    assert any("is a symlink" in problem for problem in verify_files(directory))
    with pytest.raises(CheckpointError, match="is a symlink"):
        CheckpointReader(directory).read_global("model/w")
    assert not [path for path in opened if path.startswith(os.path.realpath(outside))]


@pytest.mark.parametrize("target", ["../model.safetensors", "/etc/hostname", "sub/model.safetensors"])
def test_a_hugging_face_index_cannot_point_outside(tmp_path, capsys, opened, target):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    shutil.copy(os.path.join(hf_dir, "model.safetensors"), tmp_path / "model.safetensors")  # sound, outside
    os.makedirs(os.path.join(hf_dir, "sub"))
    shutil.copy(os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "sub"))
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as file:
        json.dump({"weight_map": {"model.embed_tokens.weight": target}}, file)
    opened.clear()  # what the test itself wrote
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "model.safetensors.index.json: weight_map must be a plain file name" in message
    outside = {os.path.realpath(path) for path in (tmp_path / "model.safetensors", "/etc/hostname",
                                                   os.path.join(hf_dir, "sub", "model.safetensors"))}
    assert not outside & set(opened)


@pytest.mark.parametrize("contents", ['{"metadata": {}}', "[1]", "{not json", '{"weight_map": {"a": 3}}'])
def test_a_malformed_hugging_face_index_is_a_named_error(tmp_path, capsys, contents):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as file:
        file.write(contents)
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "model.safetensors.index.json" in message and "Traceback" not in message


def test_invalid_json_in_a_hugging_face_config_is_a_named_error(tmp_path, capsys):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    with open(os.path.join(hf_dir, "config.json"), "w") as file:
        file.write("{not json")
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "config.json is not valid JSON" in message


@pytest.mark.parametrize("change,message", [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
    ({"hidden_size": "64"}, "hidden_size='64' must be a positive integer"),
    ({"num_hidden_layers": -2}, "num_hidden_layers=-2 must be a positive integer"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "10000"}}, "rope_theta='10000' must be a number"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' must be a number"),
    ({"rope_scaling": [1]}, "rope_scaling must be an object or null"),
    ({"rope_parameters": {"rope_type": ["llama3"]}}, "rope type ['llama3'] is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "4"}}, "rope.factor='4' must be a finite number"),
    ({"model_type": ["llama"]}, "unsupported architecture"),
    ({"max_position_embeddings": None}, "missing field 'max_position_embeddings'"),
])
def test_wrong_types_in_a_hugging_face_config_are_named_errors(tmp_path, capsys, change, message):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    path = os.path.join(hf_dir, "config.json")
    json.dump({**json.load(open(path)), **change}, open(path, "w"))
    error = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert f"{path}: " in error and message in error and "Traceback" not in error
    assert not os.path.exists(tmp_path / "o")


def _rewrite_header(path: str, edit) -> None:
    """Apply ``edit`` to the JSON header of safetensors file ``path``, keeping the data bytes."""
    raw = open(path, "rb").read()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    open(path, "wb").write(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length:])


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["model.norm.weight"].update(shape=[-64]), "shape [-64] must be a list of non-negative integers"),
    (lambda h: h["model.norm.weight"].update(dtype="I32"), "model.norm.weight has dtype torch.int32; weights must "
                                                           "be floating point"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[-256, 0]), "data_offsets [-256, 0] must be [begin, end]"),
])
def test_a_crafted_hugging_face_shard_is_a_named_error(tmp_path, capsys, edit, message):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    _rewrite_header(os.path.join(hf_dir, "model.safetensors"), edit)
    error = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert message in error and "Traceback" not in error


# ------------------------------------------------------------------------- never destroying data
def _native(tmp_path) -> str:
    """A native checkpoint directory (converted from a tiny Hugging Face Llama)."""
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    assert convert.main(["--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "ckpt")],
                        log=lambda *_: None) == 0
    return str(tmp_path / "ckpt")


def _tree(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def test_output_overlapping_input_is_refused(tmp_path, capsys):
    native = _native(tmp_path)
    before = _tree(native)
    for output in (native, os.path.join(native, "hf"), str(tmp_path)):
        message = _error(capsys, "--from", "native", "--to", "hf", "--input", native, "--output", output)
        assert "overlap (one is inside the other)" in message
    assert _tree(native) == before


def test_an_existing_output_is_kept_unless_overwrite_and_then_only_our_files_change(tmp_path, capsys):
    native = _native(tmp_path)
    unrelated = tmp_path / "results"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    (unrelated / "config.json").write_text("{}")
    message = _error(capsys, "--from", "native", "--to", "hf", "--input", native, "--output", str(unrelated))
    assert "exists and is not empty; pass --overwrite" in message
    assert sorted(os.listdir(unrelated)) == ["config.json", "notes.txt"]
    assert convert.main(["--from", "native", "--to", "hf", "--input", native, "--output", str(unrelated),
                         "--overwrite"], log=lambda *_: None) == 0
    assert sorted(os.listdir(unrelated)) == ["config.json", "model.safetensors", "notes.txt"]
    assert (unrelated / "notes.txt").read_text() == "mine" and json.loads((unrelated / "config.json").read_text())
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".incomplete")]


def test_converting_into_a_directory_with_checkpoints_is_refused(tmp_path, capsys):
    native = _native(tmp_path)
    before = _tree(native)
    hf_dir = str(tmp_path / "hf")
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", native)
    assert "already holds checkpoints: converting into it would move its tracker" in message
    assert _tree(native) == before


def test_a_killed_conversions_leftovers_are_removed_by_the_next_and_a_failed_one_leaves_none(tmp_path, monkeypatch):
    native = _native(tmp_path)
    staging = tmp_path / ".hf_out.Ab3_x9Zq.incomplete"  # mkdtemp's name for --output hf_out
    staging.mkdir()
    (staging / "part-00000.safetensors").write_bytes(b"partial")
    (staging / ".config.json.Qw3rty12.tmp").write_text("{")
    foreign = tmp_path / ".hf_out.Zz9_y8Xw.incomplete"  # our name, but holding a file we never write
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    consolidated = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.incomplete").write_bytes(b"partial")
    lines = []
    assert convert.main(["--from", "native", "--to", "hf", "--input", native, "--output", str(tmp_path / "hf_out")],
                        log=lines.append) == 0
    assert f"deleted {staging} (left by a killed conversion)" in lines and not staging.exists()
    assert (foreign / "notes.txt").read_text() == "mine"
    assert convert.main(["--from", "native", "--to", "native", "--input", native, "--output", str(consolidated),
                         "--consolidate"], log=lines.append) == 0
    assert not (tmp_path / "model.safetensors.incomplete").exists() and consolidated.exists()

    def fails(*_):
        raise OSError("No space left on device")

    monkeypatch.setattr(convert, "write_safetensors", fails)
    before = sorted(os.listdir(tmp_path))
    for argv in (["--to", "hf", "--output", str(tmp_path / "hf_again")],
                 ["--to", "native", "--output", str(tmp_path / "again.safetensors"), "--consolidate"]):
        assert convert.main(["--from", "native", "--input", native, *argv], log=lambda *_: None) == 2
    assert sorted(os.listdir(tmp_path)) == before  # no staging directory, no .incomplete file


def test_a_hugging_face_config_with_absurd_sizes_is_refused_at_once(tmp_path, capsys):
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    path = os.path.join(hf_dir, "config.json")
    json.dump({**json.load(open(path)), "num_hidden_layers": 10**9}, open(path, "w"))
    message = _error(capsys, "--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(tmp_path / "o"))
    assert "n_layers=1000000000 exceeds 4,096" in message


def test_a_shape_larger_than_the_files_is_refused_before_allocating(tmp_path):
    directory = _checkpoint(tmp_path / "ckpt")
    path = os.path.join(directory, layout.MANIFEST)
    manifest = json.load(open(path))
    manifest["tensors"]["model/w"] = {"shape": [2**20, 2**20], "dtype": "torch.float32", "pieces": [
        {"file": "shard_00000.safetensors", "key": "w#0", "offsets": [0, 0], "shape": [2**20, 2**20]}]}
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError, match="needs 4,398,046,511,104 bytes, more than all the checkpoint's files"):
        CheckpointReader(directory)


def test_integer_weights_and_an_integer_params_dtype_are_refused(tmp_path):
    directory = _checkpoint(tmp_path / "ckpt")
    path = os.path.join(directory, layout.MANIFEST)
    manifest = json.load(open(path))
    manifest["tensors"]["model/w"]["dtype"] = "torch.int32"
    json.dump(manifest, open(path, "w"))
    assert verify_files(directory) == [f"{path}: tensor 'model/w' has dtype torch.int32; weights and optimizer "
                                       "state are floating point"]
    directory = _checkpoint(tmp_path / "other")
    json.dump({**METADATA, "params_dtype": "int32"}, open(os.path.join(directory, layout.METADATA), "w"))
    assert "params_dtype must be one of float32, bfloat16, float16, not 'int32'" in verify_files(directory)[0]
    json.dump({**METADATA, "params_dtype": "float32"}, open(os.path.join(directory, layout.METADATA), "w"))
    manifest = json.load(open(os.path.join(directory, layout.MANIFEST)))
    manifest["tensors"]["model/w"]["dtype"] = "torch.qint8"  # an attribute of torch, not a safetensors dtype
    json.dump(manifest, open(os.path.join(directory, layout.MANIFEST), "w"))
    assert "dtype must be one of" in verify_files(directory)[0]


def test_a_shard_header_made_wrong_before_its_crc_was_taken_is_found_by_verification(tmp_path):
    """A wrong header whose file still matches the manifest's CRC-32 is a problem verify_files reports,
    so loading falls back to the previous sound checkpoint as for a damaged shard."""
    directory = _checkpoint(tmp_path / "ckpt")
    shard = os.path.join(directory, "shard_00000.safetensors")
    _rewrite_header(shard, lambda header: header["w#0"].update(data_offsets=[-8, 0]))
    path = os.path.join(directory, layout.MANIFEST)
    manifest = json.load(open(path))
    manifest["files"]["shard_00000.safetensors"] = {"bytes": os.path.getsize(shard), "crc32": file_crc32(shard)}
    json.dump(manifest, open(path, "w"))
    assert verify_files(directory) == [f"{shard}: tensor 'w#0': data_offsets [-8, 0] must be [begin, end] with "
                                       "0 <= begin <= end"]


def test_damage_to_the_manifest_itself_is_caught_by_its_crc(tmp_path):
    root = str(tmp_path / "ckpt")
    hf_dir = hf_model(str(tmp_path / "hf"), "llama")
    assert convert.main(["--from", "hf", "--to", "native", "--input", hf_dir, "--output", root],
                        log=lambda *_: None) == 0
    directory = layout.iteration_dir(root, 0)
    assert verify_files(directory) == []
    path = os.path.join(directory, layout.MANIFEST)
    text = open(path).read()
    open(path, "w").write(text.replace('"bytes": ', '"bytes":  ', 1))  # still valid JSON, same values
    assert verify_files(directory) == [f"{path} does not match its CRC-32 in manifest.crc32 (corrupt)"]
    open(os.path.join(directory, layout.MANIFEST_CRC), "w").write("zz\n")
    assert "is not a CRC-32" in verify_files(directory)[0]
