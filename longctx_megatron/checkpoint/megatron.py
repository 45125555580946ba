"""Megatron-LM checkpoints <-> native: safe reading of both formats, configs, tensor names and layouts.

Megatron-LM (megatron-core's GPTModel) saves weights in one of two formats (``--ckpt-format``):

* ``torch`` (legacy): ``<root>/latest_checkpointed_iteration.txt`` names ``iter_NNNNNNN`` (or says
  ``release``: the ``release/`` directory); there one ``mp_rank_TT/model_optim_rng.pt`` per tensor rank,
  ``mp_rank_TT_PPP`` under pipeline parallelism. Each file is a pickle of ``{"args": Namespace,
  "checkpoint_version", "iteration", "model" | "model0", "model1", ... (virtual pipeline chunks),
  "optimizer", "rng_state", ...}`` holding that rank's shard of every tensor, its layers numbered
  from 0 per pipeline stage and chunk.
* ``torch_dist``: ``iter_NNNNNNN/`` is a torch.distributed.checkpoint directory (``.metadata``,
  ``__R_N.distcp``) of global tensors, plus ``common.pt`` (the args, a pickle) and ``metadata.json``.
  The layers of a kind are one tensor with a leading layer dimension (megatron-core >= 0.7).

Every byte of both is untrusted. Pickles are read by torch's ``weights_only`` unpickler with an
explicit allow-list (``ALLOWED``, the names megatron-core's own ``safe_globals.py`` registers and
the other enums its args hold): ``argparse.Namespace``, ``types.SimpleNamespace`` and, for the
Megatron enums and objects that appear in ``args`` and for state we never use (numpy RNG state,
Transformer Engine extra state, paths, signals), inert stand-ins registered under those names, so
no Megatron or numpy code is imported or called and nothing else runs. torch's own reader of
``.metadata`` uses plain ``pickle``; we use a restricted unpickler (``DCP_ALLOWED``) instead and
read each chunk ourselves (``torch.load(weights_only=True)`` of its byte range), which also lets
us read one layer at a time.

Tensor mapping, per layer i (mcore names, local spec; the Transformer Engine spec fuses the norms
into the next linear as ``layer_norm_weight``, accepted and written on request):

* ``self_attention.linear_qkv`` -> ``attention.qkv``: both group rows per query group g (q heads of g,
  then k_g, then v_g; ``GroupedQKV``). Column parallel: rank r holds whole groups, shards concatenate.
* ``linear_proj`` -> ``attention.out``, ``linear_fc2`` -> ``mlp.down``: row parallel (dim 1).
* ``mlp.linear_fc1`` -> ``mlp.gate_up``: rank r holds [gate_r; up_r]; globally (and in torch_dist)
  [gate; up], as ours.
* ``input_layernorm`` -> ``attention_norm``, ``pre_mlp_layernorm`` -> ``mlp_norm``, ``final_layernorm``
  -> ``final_norm`` (stored as gamma - 1 under ``apply_layernorm_1p``); ``word_embeddings`` ->
  ``embedding`` and ``output_layer`` -> ``output`` (vocab parallel, dim 0; Megatron's padding rows to a
  multiple of make_vocab_size_divisible_by x TP are dropped down to ours, see ``native_vocab``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import re
import stat
import threading
import types
from dataclasses import dataclass

import torch

from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.hf import ConversionError
from longctx_megatron.checkpoint.paths import regular_file
from longctx_megatron.checkpoint.plan_export import layers_apart, plan_problems
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.megatron_args import MegatronArchitecture
from longctx_megatron.config.vocab import VOCAB_PADDING_MULTIPLE, padded_vocab_size

TRACKER = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?$")
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -------------------------------------------------------------------------------- safe unpickling
class StandIn:
    """An inert object unpickled in place of a class we must not import: it keeps the arguments it
    was built with (an enum's value, say) and ignores any state; it has no behaviour."""

    pickled_name = ""

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args = args
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return f"{self.pickled_name}{self.args!r}"


# Megatron classes that a checkpoint's args, rerun state or model chunks may pickle (enums, the pipeline
# layout object), and objects holding state we never read; each becomes its own StandIn subclass.
MEGATRON_NAMES = (
    "megatron.core.enums.ModelType", "megatron.core.enums.Fp8Recipe", "megatron.core.enums.Fp4Recipe",
    "megatron.core.transformer.enums.ModelType", "megatron.core.transformer.enums.LayerType",
    "megatron.core.transformer.enums.AttnType", "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.CudaGraphModule",
    "megatron.core.transformer.enums.CudaGraphScope", "megatron.core.transformer.enums.InferenceCudaGraphScope",
    "megatron.core.rerun_state_machine.RerunDiagnostic", "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState", "megatron.core.rerun_state_machine.RerunValidationStatus",
    "megatron.core.transformer.pipeline_parallel_layer_layout.PipelineParallelLayerLayout",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig", "pathlib.PosixPath", "signal.Signals",
)
DISCARDED_NAMES = (  # numpy RNG state (rng_state), Transformer Engine's _extra_state (io.BytesIO)
    "_io.BytesIO", "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.dtypes.UInt32DType",
)
_STAND_INS = {name: type(name.rsplit(".", 1)[1], (StandIn,), {"pickled_name": name})
              for name in MEGATRON_NAMES + DISCARDED_NAMES}
ALLOWED = [argparse.Namespace, types.SimpleNamespace] + [(cls, name) for name, cls in _STAND_INS.items()]


def safe_load(path: str) -> dict:
    """A Megatron pickle (``model_optim_rng.pt``, ``common.pt``) through the restricted unpickler; tensors
    are memory-mapped where the file allows it. Anything off the allow-list is refused, naming the file."""
    regular_file(path)
    with _only(ALLOWED):
        try:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):  # only a pre-zip (torch < 1.6) file cannot be mapped
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first = str(error).strip().splitlines()
            reason = next((line for line in first if "GLOBAL" in line or "global" in line), first[0] if first else "")
            raise CheckpointError(f"{path}: refused to unpickle it: {reason.strip()} (only Megatron-LM's "
                                  "own checkpoint contents are allowed; the file is damaged or not a checkpoint)"
                                  ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({error})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(loaded).__name__}")
    return loaded


_ALLOW_LIST_LOCK = threading.Lock()


@contextlib.contextmanager
def _only(allowed: list):
    """Exactly ``allowed`` as torch's user allow-list for the duration: what others registered in this
    process (megatron-core registers the real numpy and megatron classes on import) is set aside, or
    it could be chosen over a stand-in of the same name."""
    with _ALLOW_LIST_LOCK:
        others = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        try:
            torch.serialization.add_safe_globals(allowed)
            yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(others)


_DCP = "torch.distributed.checkpoint."
DCP_ALLOWED = {  # what torch.distributed.checkpoint writes in .metadata (torch 2.x)
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((f"{_DCP}metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "BytesStorageMetadata",
        "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}filesystem", "_StorageInfo"),
    *((f"{_DCP}planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    *(("torch", str(dtype).removeprefix("torch.")) for dtype in (
        torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
        torch.uint8, torch.bool)),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in DCP_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


# -------------------------------------------------------------------------------- configs
def _arg(args: dict, name: str, default=None, *aliases):
    for key in (name, *aliases):
        if args.get(key) is not None:
            return args[key]
    return default


def _positive(args: dict, name: str, where: str, default=None) -> int:
    value = _arg(args, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{where}: args.{name}={value!r} must be a positive integer")
    return value


@dataclass(frozen=True)
class MegatronLayout:
    """What the converter needs beyond the ModelConfig: Megatron's sharding and storage conventions."""

    tensor: int
    pipeline: int
    virtual: int
    padded_vocab: int  # rows of Megatron's embedding / output (padding included)


def native_vocab(args: dict, padded: int) -> int:
    """Our vocab_size: the tokenizer's (args.vocab_size, when Megatron recorded it) padded to our multiple
    of 128, never beyond Megatron's rows; Megatron's padded size when the true vocabulary is unknown."""
    true = args.get("vocab_size")
    if isinstance(true, int) and not isinstance(true, bool) and 0 < true <= padded:
        return min(padded_vocab_size(true), padded)
    return padded


def config_from_megatron(args, where: str) -> tuple[ModelConfig, MegatronLayout]:
    """Our ModelConfig and Megatron's layout from a checkpoint's ``args``: the architecture as the command
    line reads Megatron's flags (config/megatron_args.py, the one definition), norms kept as stored
    (gamma - 1 under apply_layernorm_1p); anything the native model cannot run the same way is refused,
    naming the arg."""
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{where}: 'args' is {type(args).__name__}, not an argparse.Namespace")
    values = vars(args)
    tensor = _positive(values, "tensor_model_parallel_size", where, 1)
    pipeline = _positive(values, "pipeline_model_parallel_size", where, 1)
    virtual = _positive(values, "virtual_pipeline_model_parallel_size", where, 1)
    padded = _positive(values, "padded_vocab_size", where)
    if padded % tensor:
        raise ConversionError(f"{where}: args.padded_vocab_size={padded} is not divisible by "
                              f"tensor_model_parallel_size={tensor}")
    _positive(values, "ffn_hidden_size", where)  # Megatron always records it; its default needs no guess
    for name in ("rotary_base", "rope_scaling_factor", "norm_epsilon", "init_method_std", "hidden_dropout",
                 "attention_dropout"):
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConversionError(f"{where}: args.{name}={value!r} must be a number")
    try:
        architecture = MegatronArchitecture.from_args(values, where)
        config = architecture.model_config(native_vocab(values, padded),
                                           _positive(values, "max_position_embeddings", where,
                                                     _arg(values, "seq_length")))
    except (ConfigError, TypeError, ValueError) as error:
        raise ConversionError(f"{where}: {error}" if not str(error).startswith(where) else str(error)) from None
    return config, MegatronLayout(tensor, pipeline, virtual, padded)


def megatron_padded_vocab(vocab_size: int, tensor: int) -> int:
    """Megatron's padded_vocab_size for make_vocab_size_divisible_by=128 (ours) and ``tensor`` ranks."""
    return math.ceil(vocab_size / (VOCAB_PADDING_MULTIPLE * tensor)) * VOCAB_PADDING_MULTIPLE * tensor


def config_to_megatron(config: ModelConfig, tensor: int, pipeline: int, transformer_impl: str) -> argparse.Namespace:
    """The args Megatron-LM reads from a checkpoint (check_checkpoint_args, --use-checkpoint-args) for a
    model it can express: full causal attention in every layer, or full and sliding layers of one
    window without global tokens, and one RoPE for all."""
    plan = config.layer_plan()
    problems = plan_problems(config, *layers_apart(
        config, lambda spec: spec.kind == "dilated" or (spec.kind == "sliding" and spec.global_every)))
    windows = sorted({spec.window for spec in plan if spec.kind == "sliding"})
    if len(windows) > 1:
        problems.append(f"sliding windows of {windows} keys (Megatron has one window_size)")
    rope = config.rope
    if rope.scaling == "llama3" and (rope.original_max_position, rope.low_freq_factor, rope.high_freq_factor) != (
            8192, 1.0, 4.0):
        problems.append(f"llama3 RoPE scaling with {rope} (Megatron fixes original 8192, low 1, high 4)")
    elif rope.scaling not in ("none", "llama3"):
        problems.append(f"RoPE scaling {rope.scaling!r} (Megatron has only llama3's, --use-rope-scaling)")
    if config.n_layers % pipeline:
        problems.append(f"{config.n_layers} layers do not split evenly into {pipeline} pipeline stages")
    if problems:
        raise ConversionError("Megatron-LM cannot express this model: " + "; ".join(problems))
    sliding = [spec.kind == "sliding" for spec in plan]
    window = (windows[0] - 1, 0) if windows else None
    skip = None if all(sliding) or not any(sliding) else [int(flag) for flag in sliding]
    return argparse.Namespace(
        num_layers=config.n_layers, hidden_size=config.d_model, num_attention_heads=config.n_heads,
        ffn_hidden_size=config.d_ff, kv_channels=config.head_dim,
        group_query_attention=config.n_kv_heads != config.n_heads, num_query_groups=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len, seq_length=config.max_seq_len,
        vocab_size=config.vocab_size, make_vocab_size_divisible_by=VOCAB_PADDING_MULTIPLE,
        padded_vocab_size=megatron_padded_vocab(config.vocab_size, tensor),
        normalization="RMSNorm", norm_epsilon=config.norm_eps,
        apply_layernorm_1p=config.norm_zero_centered_gamma,
        layernorm_zero_centered_gamma=config.norm_zero_centered_gamma, swiglu=True,
        add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope", add_position_embedding=False,
        use_rotary_position_embeddings=True, rotary_base=int(rope.theta) if float(rope.theta).is_integer()
        else rope.theta, rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=rope.scaling == "llama3",
        rope_scaling_factor=rope.factor if rope.scaling == "llama3" else 8.0,
        untie_embeddings_and_output_weights=not config.tie_embeddings, window_size=window,
        window_attn_skip_freq=skip, init_method_std=config.init_std, hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout, apply_query_key_layer_scaling=False, squared_relu=False,
        num_experts=None, transformer_impl=transformer_impl, tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline, virtual_pipeline_model_parallel_size=None, ckpt_format="torch",
        params_dtype=torch.float32, consumed_train_samples=0, consumed_valid_samples=0, skipped_train_samples=0,
    )


# -------------------------------------------------------------------------------- tensors
_ATTN_NORM = ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
_MLP_NORM = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
LAYER_PARAMS = _ATTN_NORM + _MLP_NORM + ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                                         "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
OUTER_PARAMS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")
# how a TP rank holds each parameter: its split dimension, "swiglu" for [gate_r; up_r]; norms are replicated
SPLIT = {"self_attention.linear_qkv.weight": 0, "self_attention.linear_proj.weight": 1, "mlp.linear_fc1.weight":
         "swiglu", "mlp.linear_fc2.weight": 1, "embedding.word_embeddings.weight": 0, "output_layer.weight": 0}


def split_of(name: str):
    """The TP split of Megatron parameter ``name`` (a layer's name without ``decoder.layers.N.`` too)."""
    return SPLIT.get(re.sub(r"^decoder\.layers\.\d+\.", "", name))


def unknown_parameter(name: str) -> bool:
    """Whether ``name`` (a model-state key) is a weight this converter does not know: refused, since
    dropping it would change the model (``_extra_state`` holds no weights and is skipped)."""
    if "._extra_state" in name or name in OUTER_PARAMS:  # torch_dist: "<module>._extra_state/shard_0_2"
        return False
    layer = re.match(r"^decoder\.layers\.(?:\d+\.)?(.+)$", name)
    return not (layer and layer.group(1) in LAYER_PARAMS + ("mlp.linear_fc1.weight_w", "mlp.linear_fc1.weight_v"))


def layer_from_megatron(index: int, get, config: ModelConfig, layout: MegatronLayout) -> dict[str, torch.Tensor]:
    """Native tensors of layer ``index``; ``get(names, global_shape)`` reads the first of ``names`` present
    (Megatron's global layout: what torch_dist stores and legacy shards concatenate to)."""
    d, heads, kv, head_dim = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    mega, ours = f"decoder.layers.{index}.", f"layers.{index}."
    return {
        ours + "attention_norm.weight": get([mega + n for n in _ATTN_NORM], (d,)),
        ours + "attention.qkv.weight": get([mega + "self_attention.linear_qkv.weight"],
                                           ((heads + 2 * kv) * head_dim, d)),
        ours + "attention.out.weight": get([mega + "self_attention.linear_proj.weight"], (d, heads * head_dim)),
        ours + "mlp_norm.weight": get([mega + n for n in _MLP_NORM], (d,)),
        ours + "mlp.gate_up.weight": get([mega + "mlp.linear_fc1.weight"], (2 * config.d_ff, d)),
        ours + "mlp.down.weight": get([mega + "mlp.linear_fc2.weight"], (d, config.d_ff)),
    }


def outer_from_megatron(get, config: ModelConfig, layout: MegatronLayout) -> dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) output weight, without the padding rows beyond our vocab."""
    rows = (layout.padded_vocab, config.d_model)
    out = {"embedding.weight": get(["embedding.word_embeddings.weight"], rows)[:config.vocab_size],
           "final_norm.weight": get(["decoder.final_layernorm.weight"], (config.d_model,))}
    if not config.tie_embeddings:
        out["output.weight"] = get(["output_layer.weight"], rows)[:config.vocab_size]
    return out


def layer_to_megatron(index: int, get, config: ModelConfig, transformer_impl: str) -> dict[str, torch.Tensor]:
    """Megatron's global tensors of layer ``index`` (local index ``index`` in its stage's file is applied
    by the caller); ``get(native_name)`` reads one global native tensor."""
    ours, mega = f"layers.{index}.", f"decoder.layers.{index}."
    te = transformer_impl == "transformer_engine"
    return {
        mega + _ATTN_NORM[te]: get(ours + "attention_norm.weight"),
        mega + "self_attention.linear_qkv.weight": get(ours + "attention.qkv.weight"),
        mega + "self_attention.linear_proj.weight": get(ours + "attention.out.weight"),
        mega + _MLP_NORM[te]: get(ours + "mlp_norm.weight"),
        mega + "mlp.linear_fc1.weight": get(ours + "mlp.gate_up.weight"),
        mega + "mlp.linear_fc2.weight": get(ours + "mlp.down.weight"),
    }


def outer_to_megatron(get, config: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer, the vocabulary padded with zero rows to ``padded_vocab``."""
    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros(padded_vocab - tensor.shape[0], tensor.shape[1])])

    out = {"embedding.word_embeddings.weight": pad(get("embedding.weight")),
           "decoder.final_layernorm.weight": get("final_norm.weight")}
    if not config.tie_embeddings:
        out["output_layer.weight"] = pad(get("output.weight"))
    return out


def shard(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Tensor rank ``rank``'s part of Megatron global tensor ``name`` (inverse of ``merge``)."""
    split = split_of(name)
    if split is None:
        return tensor
    if split == "swiglu":
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return tensor.chunk(size, dim=split)[rank].clone()


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor of Megatron parameter ``name`` from its TP ranks' parts."""
    split = split_of(name)
    if split is None:
        return shards[0]
    if split == "swiglu":
        halves = [part.chunk(2) for part in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=split)


def local_shape(name: str, global_shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    split = split_of(name)
    if split is None:
        return tuple(global_shape)
    dim = 0 if split == "swiglu" else split
    shape = list(global_shape)
    shape[dim] //= size
    return tuple(shape)


# -------------------------------------------------------------------------------- directories
def _plain_dir(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"{path} is {'a symlink' if stat.S_ISLNK(mode) else 'not a directory'}; only "
                              "directories inside the checkpoint are read")
    return path


def iteration_directory(root: str, step: int | None) -> tuple[str, int]:
    """The checkpoint directory the tracker (or ``step``) names, and its iteration (0 for ``release``)."""
    if step is None:
        tracker = regular_file(os.path.join(root, TRACKER))
        if os.path.getsize(tracker) > 64:
            raise CheckpointError(f"{tracker} is not an iteration number ({os.path.getsize(tracker)} bytes)")
        with open(tracker, "rb") as file:
            text = file.read().decode("ascii", "replace").strip()
        if text == "release":
            return _plain_dir(os.path.join(root, "release")), 0
        if not text.isdigit():
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:20]!r}")
        step = int(text)
    return _plain_dir(os.path.join(root, f"iter_{step:07d}")), step


def checkpoint_format(directory: str) -> str:
    """``torch`` or ``torch_dist`` for an iteration directory, by its files."""
    names = os.listdir(directory)
    if ".metadata" in names or "metadata.json" in names:
        return "torch_dist"
    if any(_RANK_DIR.match(name) for name in names):
        return "torch"
    raise CheckpointError(f"{directory}: neither mp_rank_* directories (torch format) nor .metadata "
                          "(torch_dist format): not a Megatron-LM checkpoint")


def describe(root: str, step: int | None = None) -> str | None:
    """``"<format> format, iteration N"`` when ``root`` holds a Megatron-LM checkpoint rather than a native
    one (the tracker's directory, or ``step``'s, has Megatron's files and no manifest.json), else None."""
    if step is None and not os.path.isfile(os.path.join(root, TRACKER)):
        return None
    try:
        directory, iteration = iteration_directory(root, step)
    except CheckpointError:
        return None
    names = os.listdir(directory)
    if "manifest.json" in names:
        return None
    if ".metadata" in names and "common.pt" in names:
        return f"torch_dist format, iteration {iteration}"
    if any(_RANK_DIR.match(name) and os.path.isfile(os.path.join(directory, name, LEGACY_FILE)) for name in names):
        return f"torch format, iteration {iteration}"
    return None


def not_native_message(root: str, description: str) -> str:
    """What to tell someone who points --load (or --from native) at a Megatron-LM checkpoint."""
    output = root.rstrip(os.sep) + "-native"
    return (f"{root} is a Megatron-LM checkpoint ({description}), not this trainer's (it has no manifest.json); "
            f"convert it first: python tools/checkpoint/convert.py --from megatron --to native --input {root} "
            f"--output {output} (add --target-tensor-parallel-size / --target-pipeline-parallel-size for the "
            f"layout you train with), then train with --config {os.path.join(output, 'model.yaml')} --load {output}")


def dcp_read_metadata(path: str):
    """torch.distributed.checkpoint's ``.metadata`` through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(regular_file(path), "rb") as file:
        try:
            metadata = _MetadataUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as error:
            raise CheckpointError(f"{path}: refused to unpickle it: {error}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata")
    return metadata


def read_json_object(path: str) -> dict:
    with open(regular_file(path)) as file:
        try:
            value = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_chunk(directory: str, info, where: str) -> torch.Tensor:
    """One stored chunk: the byte range ``info`` (a _StorageInfo) of a file of ``directory``, a torch.save
    of one tensor, read with ``weights_only``."""
    name = getattr(info, "relative_path", None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise CheckpointError(f"{where}: stored in {name!r}, not a plain file name inside {directory}")
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(f"{where}: transformed (compressed?) storage {info.transform_descriptors} is not "
                              "supported")
    path = regular_file(os.path.join(directory, name))
    offset, length = info.offset, info.length
    if (not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length)) or offset < 0
            or length <= 0 or offset + length > os.path.getsize(path)):
        raise CheckpointError(f"{where}: bytes {offset}+{length} lie outside {path} ({os.path.getsize(path)} bytes)")
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(length)
    try:
        with _only([]):  # a tensor needs nothing beyond torch's defaults
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{where}: cannot read its bytes in {path} ({str(error).splitlines()[0]})") from None
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{where}: {path} holds a {type(tensor).__name__}, not a tensor")
    return tensor
