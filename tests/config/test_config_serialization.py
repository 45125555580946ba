"""YAML / JSON round trips of ModelConfig, unknown-key and syntax errors that name the key or file, and the
atomicity of save_config."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import yaml

from longctx_megatron.config import ConfigError, LayerSpec, ModelConfig, RopeConfig, load_config, save_config
from longctx_megatron.config.serialization import config_from_dict, config_to_dict
from tests.config.tiny_config import TINY

LLAMA3 = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=64)
YARN = RopeConfig(theta=20000.0, scaling="yarn", factor=4.0, original_max_position=64, beta_fast=16.0, beta_slow=2.0)


def _default() -> ModelConfig:
    return ModelConfig()


def _tiny() -> ModelConfig:
    return ModelConfig(
        **TINY,
        norm_eps=1e-6,
        init_method="xavier",
        init_std=0.015,
        hidden_dropout=0.1,
        attention_dropout=0.05,
        tie_embeddings=False,
        rope=RopeConfig(theta=123456.5),
        rope_by_kind={"dilated": YARN},
    )


def _compact() -> ModelConfig:
    return ModelConfig(
        **{**TINY, "n_layers": 5, "sliding_window": 16, "global_every": 0, "dilated_window": 4},
        attention_layout="sliding:2,dilated:1,full:1,sliding:1",
        rope_by_kind={"full": LLAMA3},
    )


def _explicit() -> ModelConfig:
    return ModelConfig(
        **{**TINY, "n_layers": 4},
        layers=[
            LayerSpec("sliding", window=16, global_every=4),
            LayerSpec("dilated", window=8, dilation=2, rope=YARN),
            LayerSpec("full", rope=LLAMA3),
            LayerSpec("full", rope=RopeConfig(scaling="linear", factor=2.5)),
        ],
    )


CONFIGS = {"default": _default, "tiny": _tiny, "compact": _compact, "explicit": _explicit}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json", ".YAML"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip(tmp_path, name, suffix):
    config = CONFIGS[name]()
    path = tmp_path / f"model{suffix}"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.layer_plan() == config.layer_plan()
    assert isinstance(loaded.rope, RopeConfig)
    assert all(isinstance(rope, RopeConfig) for rope in loaded.rope_by_kind.values())
    if config.layers is not None:
        assert all(isinstance(spec, LayerSpec) for spec in loaded.layers)
        assert all(isinstance(spec.rope, RopeConfig) for spec in loaded.layer_plan())
    # Saving the loaded config again gives byte-identical text.
    again = tmp_path / f"again{suffix}"
    save_config(loaded, again)
    assert again.read_text() == path.read_text()


def test_round_trip_accepts_str_paths(tmp_path):
    path = str(tmp_path / "model.json")
    save_config(_tiny(), path)
    assert load_config(path) == _tiny()


def test_saved_yaml_content(tmp_path):
    path = tmp_path / "model.yaml"
    save_config(_explicit(), path)
    data = yaml.safe_load(path.read_text())
    assert list(data)[:7] == ["d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"]
    assert data["d_model"] == 64
    assert data["attention_layout"] == ""
    assert data["layers"][2]["kind"] == "full"
    assert data["layers"][2]["rope"]["scaling"] == "llama3"
    assert data["layers"][2]["rope"]["theta"] == 500000.0
    assert data["layers"][1]["rope"]["beta_fast"] == 16.0
    assert data["rope_by_kind"] == {}


def test_saved_json_content(tmp_path):
    path = tmp_path / "model.json"
    save_config(_tiny(), path)
    text = path.read_text()
    assert text.endswith("}\n")
    data = json.loads(text)
    assert data == config_to_dict(_tiny())
    assert data["layers"] is None
    assert data["tie_embeddings"] is False
    assert data["rope_by_kind"]["dilated"]["scaling"] == "yarn"
    assert data["rope"]["theta"] == 123456.5


def test_hand_written_yaml_with_defaults_omitted(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(
        "d_model: 64\nn_layers: 3\nn_heads: 4\nn_kv_heads: 2\nd_ff: 128\nvocab_size: 100\nmax_seq_len: 256\n"
        "layers:\n"
        "  - {kind: sliding, window: 16}\n"
        "  - {kind: dilated, window: 8, dilation: 2}\n"
        "  - kind: full\n"
        "    rope: {theta: 500000.0, scaling: llama3, factor: 8.0, original_max_position: 64}\n"
    )
    config = load_config(path)
    assert config.layer_plan() == [
        LayerSpec("sliding", window=16, rope=RopeConfig()),
        LayerSpec("dilated", window=8, dilation=2, rope=RopeConfig()),
        LayerSpec("full", rope=LLAMA3),
    ]
    assert config.init_method == "normal"
    assert config.tie_embeddings is True


def test_config_from_dict_and_to_dict_round_trip():
    config = _compact()
    assert config_from_dict(config_to_dict(config)) == config


# ---------------------------------------------------------------- unknown keys


def _dump(tmp_path, data: dict, suffix: str = ".yaml"):
    path = tmp_path / f"bad{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize(
    ("mutate", "where", "key"),
    [
        (lambda d: d.update(d_modle=64), "a model config", "d_modle"),
        (lambda d: d.update(num_layers=4, zzz=1), "a model config", "num_layers, zzz"),
        (lambda d: d["rope"].update(base=10000.0), "rope", "base"),
        (lambda d: d.update(rope_by_kind={"full": {"theta": 1e4, "type": "yarn"}}), "rope_by_kind.full", "type"),
        (lambda d: d["layers"][1].update(size=8), r"layers\[1\]", "size"),
        (lambda d: d["layers"][2]["rope"].update(rope_type="llama3"), r"layers\[2\]\.rope", "rope_type"),
    ],
)
def test_unknown_keys_are_named(tmp_path, mutate, where, key, suffix):
    data = config_to_dict(_explicit())
    mutate(data)
    path = _dump(tmp_path, data, suffix)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: {where}: unknown field\(s\) {key}; known fields: "
    ):
        load_config(path)


def test_unknown_key_message_lists_known_fields(tmp_path):
    data = config_to_dict(_tiny())
    data["rope"]["scale"] = 2.0
    with pytest.raises(ConfigError) as info:
        load_config(_dump(tmp_path, data))
    assert str(info.value).endswith(
        "rope: unknown field(s) scale; known fields: beta_fast, beta_slow, factor, high_freq_factor, "
        "low_freq_factor, original_max_position, scaling, theta"
    )


def test_invalid_values_in_files_are_prefixed_with_the_path(tmp_path):
    data = config_to_dict(_tiny())
    data["n_kv_heads"] = 3
    path = _dump(tmp_path, data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: n_heads=4 must be divisible by n_kv_heads=3"):
        load_config(path)
    data = config_to_dict(_tiny())
    data["rope_by_kind"] = {"global": data["rope"]}
    with pytest.raises(ConfigError, match=re.escape("rope_by_kind has unknown attention kind 'global'")):
        load_config(_dump(tmp_path, data))


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize("name", ["model.txt", "model.toml", "model", "model.yaml.bak", "model.jsonl"])
def test_bad_suffix(tmp_path, name):
    path = tmp_path / name
    message = f"{path}: config files must end in .yaml, .yml or .json"
    with pytest.raises(ConfigError, match=re.escape(message)):
        save_config(_tiny(), path)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    path.write_text("d_model: 64\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("broken.yaml", "d_model: [64, 128\nn_layers: 4\n", "YAML"),
        ("broken.yml", "d_model: 64\n  n_layers: 4\n", "YML"),
        ("broken.yaml", "rope: {theta: 1.0\n", "YAML"),
        ("broken.json", '{"d_model": 64,}', "JSON"),
        ("broken.json", "d_model: 64\n", "JSON"),
    ],
)
def test_invalid_syntax_names_the_file(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid {kind}: "):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "type_name"),
    [("- 1\n- 2\n", "list"), ("", "NoneType"), ("just text\n", "str"), ("42\n", "int")],
)
def test_non_mapping_document(tmp_path, text, type_name):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    message = f"{path}: a model config must be a mapping, got {type_name}"
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        load_config(path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")


# ---------------------------------------------------------------- atomic save


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_leaves_no_temporary_files(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_config(_tiny(), path)
    save_config(_explicit(), path)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{suffix}"]
    assert load_config(path) == _explicit()


def _raise(*args, **kwargs):
    raise RuntimeError("disk full")


@pytest.mark.parametrize(
    ("suffix", "target", "attribute"),
    [
        (".yaml", yaml, "safe_dump"),
        (".json", json, "dumps"),
        (".yaml", os, "replace"),
        (".json", os, "replace"),
    ],
)
def test_failing_save_keeps_the_existing_file(tmp_path, monkeypatch, suffix, target, attribute):
    path = tmp_path / f"model{suffix}"
    save_config(_tiny(), path)
    before = path.read_bytes()
    monkeypatch.setattr(target, attribute, _raise)
    with pytest.raises(RuntimeError, match="disk full"):
        save_config(_explicit(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{suffix}"]
    assert load_config(path) == _tiny()


def test_failing_write_keeps_the_existing_file(tmp_path, monkeypatch):
    # The failure happens after the temporary file exists: it must be removed, the target untouched.
    path = tmp_path / "model.yaml"
    save_config(_tiny(), path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FailingHandle:
        def __init__(self, fd, mode, **kwargs):
            self.handle = real_fdopen(fd, mode, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, text):
            self.handle.write(text[: len(text) // 2])  # a partial write, then the failure
            raise OSError("no space left on device")

    monkeypatch.setattr(os, "fdopen", FailingHandle)
    with pytest.raises(OSError, match="no space left"):
        save_config(_explicit(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]


def test_saved_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "model.yaml"
        save_config(_tiny(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(umask)
