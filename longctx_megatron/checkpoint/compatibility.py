"""Whether a checkpoint can be loaded into this run's model: shapes and vocabulary must match exactly;
anything else that differs (attention windows, RoPE, dropout, parallel layout) is reported, not refused."""

from __future__ import annotations

from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.serialization import config_to_dict

# Fields that decide which parameters exist and their shapes.
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "tie_embeddings")


def config_differences(saved: dict, config: ModelConfig) -> dict[str, tuple]:
    current = config_to_dict(config)
    return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)}


def check_compatible(metadata: dict, config: ModelConfig, tokenizer_checksum: str | None, directory: str,
                     log=print) -> None:
    """Raise CheckpointError naming each field that makes the checkpoint unloadable; log the other differences."""
    differences = config_differences(metadata["config"], config)
    fatal = {key: pair for key, pair in differences.items() if key in SHAPE_FIELDS}
    if fatal:
        listed = ", ".join(f"{key} = {saved} in the checkpoint but {now} in this run" for key, (saved, now)
                           in fatal.items())
        raise CheckpointError(f"{directory} was saved from a different model: {listed}")
    saved_tokenizer = (metadata.get("tokenizer") or {}).get("checksum")
    if saved_tokenizer and tokenizer_checksum and saved_tokenizer != tokenizer_checksum:
        raise CheckpointError(f"{directory} was trained with another tokenizer ({metadata['tokenizer'].get('name')}, "
                              f"checksum {saved_tokenizer[:12]}...) than this run's (checksum "
                              f"{tokenizer_checksum[:12]}...): the token ids would mean different things")
    for key, (saved, now) in differences.items():
        log(f"note: {key} differs from the checkpoint: {saved} there, {now} here")
