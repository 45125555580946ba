"""Convert checkpoints: Hugging Face <-> native, Megatron-LM <-> native, native -> native (reshard or consolidate).
No training job needed.

    python tools/checkpoint/convert.py --from hf --to native --input llama-dir --output ckpt \\
        --target-tensor-parallel-size 8 --target-pipeline-parallel-size 4
    python tools/checkpoint/convert.py --from native --to hf --input ckpt --output hf-dir [--allow-approximate]
    python tools/checkpoint/convert.py --from native --to native --input ckpt --output ckpt-tp2 \\
        --target-tensor-parallel-size 2
    python tools/checkpoint/convert.py --from native --to native --input ckpt --output model.safetensors --consolidate
    python tools/checkpoint/convert.py --from megatron --to native --input megatron-ckpt --output ckpt \\
        [--target-tensor-parallel-size 2 --target-pipeline-parallel-size 2] [--ckpt-step N]
    python tools/checkpoint/convert.py --from native --to megatron --input ckpt --output megatron-ckpt \\
        [--target-tensor-parallel-size 2 --target-pipeline-parallel-size 2] [--megatron-transformer-impl local]

Hugging Face input: a Llama or Mistral directory (config.json and model.safetensors, or shards with
model.safetensors.index.json; never pickle). Native input: a --save directory (its tracker's
checkpoint, or --ckpt-step). Megatron-LM input: a --save directory in the ``torch`` (mp_rank_*/
model_optim_rng.pt) or ``torch_dist`` format, any TP/PP/virtual-PP layout, weights only; its pickles
are read by a restricted unpickler (longctx_megatron/checkpoint/megatron.py). Megatron-LM output:
the ``torch`` format that ``pretrain_gpt.py --ckpt-format torch --finetune --no-load-optim
--no-load-rng`` loads (pass it the same --transformer-impl). Memory holds one layer's tensors (one
pipeline stage's for Megatron output); every output is written under a
temporary name and renamed when complete. The native output also gets ``model.yaml``, the
model config to pass as ``--config`` when training from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.checkpoint import keys, layout
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.hf import (
    ConversionError,
    config_from_hf,
    config_to_hf,
    layer_from_hf,
    layer_to_hf,
    outer_from_hf,
    outer_to_hf,
)
from longctx_megatron.checkpoint.hf_directory import HFCheckpoint
from longctx_megatron.checkpoint.manifest import CheckpointMetadata
from longctx_megatron.checkpoint.megatron import (
    config_to_megatron,
    describe,
    layer_from_megatron,
    layer_to_megatron,
    not_native_message,
    outer_from_megatron,
    outer_to_megatron,
    shard,
)
from longctx_megatron.checkpoint.megatron_directory import open_megatron
from longctx_megatron.checkpoint.offline import OfflineWriter, converted_metadata
from longctx_megatron.checkpoint.reader import CheckpointReader, read_json, verify_files
from longctx_megatron.checkpoint.safetensors_io import (
    Deferred,
    write_safetensors,
)
from longctx_megatron.config import ConfigError, save_config
from longctx_megatron.config.serialization import config_from_dict
from longctx_megatron.parallel.state import ParallelLayoutError

SHARD_BYTES = 2 * 2**30  # Hugging Face output shard size
HF_OUTPUT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _newest(root: str, step: int | None) -> tuple[CheckpointReader, CheckpointMetadata]:
    """The checkpoint to convert (verified) and its metadata."""
    if megatron := describe(root, step):
        raise CheckpointError(not_native_message(root, megatron))
    iteration = step if step is not None else layout.read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"{root}: no {layout.TRACKER} (pass --ckpt-step)")
    directory = layout.iteration_dir(root, iteration)
    problems = verify_files(directory) if os.path.isdir(directory) else [f"{directory} does not exist"]
    if problems:
        raise CheckpointError("; ".join(problems))
    reader = CheckpointReader(directory)
    return reader, reader.checkpoint_metadata()


def hf_to_native(args, log) -> str:
    config_path = os.path.join(args.input, "config.json")
    config = config_from_hf(read_json(config_path), config_path)
    source = HFCheckpoint(args.input)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    writer = OfflineWriter(args.output, 0, config, args.target_tensor_parallel_size,
                           args.target_pipeline_parallel_size)
    _write_native(writer, config, lambda: outer_from_hf(source.get, config),
                  lambda index: layer_from_hf(index, source.get, config), dtype, log)
    return _finish_native(writer, config, args, dtype or source.get("model.norm.weight", (config.d_model,)).dtype,
                          log)


def _write_native(writer: OfflineWriter, config, outer, layer, dtype, log) -> torch.dtype:
    """Write ``outer()`` (embedding, final norm, output) and ``layer(index)`` of every layer, native tensors
    by name, cast to ``dtype`` when given, one group at a time; returns the first tensor's dtype."""
    first = []

    def group(tensors: dict, what: str) -> None:
        converted = {keys.model_key(name): t.to(dtype) if dtype else t for name, t in tensors.items()}
        first.append(next(iter(converted.values())).dtype)
        files = writer.write_group(converted)
        log(f"{what}: {len(converted)} tensors -> {len(files)} files")

    group(outer(), "embedding, final norm, output")
    for index in range(config.n_layers):
        group(layer(index), f"layer {index + 1}/{config.n_layers}")
    return first[0]


def _finish_native(writer: OfflineWriter, config, args, params_dtype, log) -> str:
    """Publish a converted native checkpoint and its model.yaml; say how to train from it."""
    directory = writer.finish(converted_metadata(config, os.path.abspath(args.input), params_dtype, writer.layout()))
    save_config(config, os.path.join(args.output, "model.yaml"))
    log(f"wrote {directory} for tensor {writer.tensor} x pipeline {len(writer.stage_layers)} (stage layers "
        f"{writer.stage_layers}); train from it with --config {os.path.join(args.output, 'model.yaml')} "
        f"--load {args.output}")
    return directory


def megatron_to_native(args, log) -> str:
    source = open_megatron(args.input, args.ckpt_step)
    config, megatron = source.config, source.layout
    log(f"Megatron-LM {source.format} checkpoint, iteration {source.iteration}: tensor {megatron.tensor} x "
        f"pipeline {megatron.pipeline} x virtual {megatron.virtual}; vocabulary {megatron.padded_vocab} rows -> "
        f"{config.vocab_size}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    created = not os.path.lexists(args.output)
    writer = OfflineWriter(args.output, 0, config, args.target_tensor_parallel_size,
                           args.target_pipeline_parallel_size)
    try:  # input found bad half-way (a shard's shape, say) leaves nothing behind
        return _megatron_to_native(args, log, source, writer, dtype)
    except BaseException:
        shutil.rmtree(writer.staged, ignore_errors=True)
        if created:
            shutil.rmtree(args.output, ignore_errors=True)
        raise


def _megatron_to_native(args, log, source, writer: OfflineWriter, dtype) -> str:
    config, megatron = source.config, source.layout
    params_dtype = _write_native(writer, config, lambda: outer_from_megatron(source.get, config, megatron),
                                 lambda index: layer_from_megatron(index, source.get, config, megatron), dtype, log)
    return _finish_native(writer, config, args, params_dtype, log)


def native_to_megatron(args, log) -> str:
    """Write the legacy ``torch`` format, one pipeline stage at a time: Megatron's files hold a rank's
    shard of every layer of its stage, so memory holds one stage's global tensors."""
    reader, saved = _newest(args.input, args.ckpt_step)
    config = config_from_dict(saved.training.config)
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    for what, count in (("num_attention_heads", config.n_heads), ("num_query_groups", config.n_kv_heads),
                        ("ffn_hidden_size", config.d_ff)):
        if count % tp:
            raise ConversionError(f"--target-tensor-parallel-size {tp} does not divide {what}={count}")
    if pp > config.n_layers:
        raise ConversionError(f"--target-pipeline-parallel-size {pp} exceeds the model's {config.n_layers} layers")
    namespace = config_to_megatron(config, tp, pp, args.megatron_transformer_impl)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    namespace.params_dtype = dtype or reader.read_global(keys.model_key("final_norm.weight")).dtype
    namespace.bf16, namespace.fp16 = (namespace.params_dtype == torch.bfloat16,
                                      namespace.params_dtype == torch.float16)

    def get(name: str) -> torch.Tensor:
        tensor = reader.read_global(keys.model_key(name))
        return tensor.to(dtype) if dtype else tensor

    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".incomplete", dir=os.path.dirname(output))
    try:
        per_stage = config.n_layers // pp
        for stage in range(pp):
            tensors = {}
            if stage == 0:
                tensors.update({k: v for k, v in outer_to_megatron(get, config, namespace.padded_vocab_size).items()
                                if k.startswith("embedding.")})
            for local, index in enumerate(range(stage * per_stage, (stage + 1) * per_stage)):
                for name, tensor in layer_to_megatron(index, get, config, args.megatron_transformer_impl).items():
                    tensors[name.replace(f"decoder.layers.{index}.", f"decoder.layers.{local}.", 1)] = tensor
            if stage == pp - 1:
                outer = outer_to_megatron(get, config, namespace.padded_vocab_size)
                tensors["decoder.final_layernorm.weight"] = outer["decoder.final_layernorm.weight"]
                if not config.tie_embeddings or pp > 1:  # a tied model's last stage keeps its copy of the embedding
                    tensors["output_layer.weight"] = outer.get("output_layer.weight",
                                                               outer["embedding.word_embeddings.weight"])
            for rank in range(tp):
                model = {name: shard(name, tensor, rank, tp).contiguous() for name, tensor in tensors.items()}
                for name in [n for n in model if n.endswith(".weight") and "linear_" in n] + (
                        ["output_layer.weight"] if stage == pp - 1 else []):
                    model[name.rsplit(".", 1)[0] + "._extra_state"] = None  # what mcore's linears save
                if args.megatron_transformer_impl == "transformer_engine":
                    for index in range(per_stage):
                        model[f"decoder.layers.{index}.self_attention.core_attention._extra_state"] = None
                rank_dir = f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
                path = os.path.join(staged, "iter_0000000", rank_dir, "model_optim_rng.pt")
                os.makedirs(os.path.dirname(path))
                torch.save({"args": namespace, "checkpoint_version": 3.0, "iteration": 0, "model": model}, path)
            log(f"pipeline stage {stage + 1}/{pp}: {len(tensors)} tensors -> {tp} files")
        with atomic_write(os.path.join(staged, "latest_checkpointed_iteration.txt"), "w") as file:
            file.write("0")
        if os.path.isdir(output):
            os.rmdir(output)  # empty: check_output refused anything else
        os.rename(staged, output)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log(f"wrote {args.output} (Megatron-LM torch format, tensor {tp} x pipeline {pp}); load it with pretrain_gpt.py "
        f"--load {args.output} --ckpt-format torch --finetune --no-load-optim --no-load-rng --transformer-impl "
        f"{args.megatron_transformer_impl} --tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}")
    return args.output


def native_to_hf(args, log) -> str:
    reader, saved = _newest(args.input, args.ckpt_step)
    config = config_from_dict(saved.training.config)
    hf_config, notes = config_to_hf(config, args.allow_approximate)
    for note in notes:
        log(f"approximate: {note}")
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".incomplete", dir=os.path.dirname(output))
    try:  # a failed conversion leaves nothing behind; a killed one is tidied by the next (remove_leftovers)
        total = _write_hf(staged, reader, config, hf_config, getattr(torch, args.dtype) if args.dtype else None, log)
        _publish_hf(staged, output)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log(f"wrote {args.output} ({hf_config['architectures'][0]}, {total} safetensors file(s))")
    return args.output


def _write_hf(staged: str, reader: CheckpointReader, config, hf_config: dict, dtype, log) -> int:
    """Write the Hugging Face files into ``staged``, one layer at a time; returns the safetensors count."""
    def get(name: str) -> torch.Tensor:
        tensor = reader.read_global(keys.model_key(name))
        return tensor.to(dtype) if dtype else tensor

    groups = [("embedding, final norm, output", lambda: outer_to_hf(get, config))] + [
        (f"layer {i + 1}/{config.n_layers}", lambda i=i: layer_to_hf(i, get, config)) for i in range(config.n_layers)]
    shards, current, size = [], {}, 0
    weight_map = {}

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"part-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(staged, name), current, {"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for what, build in groups:
        tensors = build()
        for name, tensor in tensors.items():
            current[name] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
        log(f"{what}: {len(tensors)} tensors")
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = len(shards)
    for number, (name, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        os.rename(os.path.join(staged, name), os.path.join(staged, final))
        weight_map.update({tensor: final for tensor in names})
    if total > 1:
        with atomic_write(os.path.join(staged, "model.safetensors.index.json"), "w") as file:
            json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, file, indent=2)
    hf_config["torch_dtype"] = str(dtype or get("final_norm.weight").dtype).removeprefix("torch.")
    with atomic_write(os.path.join(staged, "config.json"), "w") as file:
        json.dump(hf_config, file, indent=2)
    return total


def _is_hf_output(name: str) -> bool:
    """Whether ``name`` is a file native_to_hf writes (and so may replace with --overwrite)."""
    return name in HF_OUTPUT_FILES or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


def _publish_hf(staged: str, output: str) -> None:
    """Move the finished files of ``staged`` to ``output``: a rename when ``output`` does not exist; into
    an existing one (--overwrite, checked before any work), replacing only the files this tool writes."""
    if not os.path.exists(output):
        os.rename(staged, output)
        return
    for name in os.listdir(output):
        if _is_hf_output(name):
            os.remove(os.path.join(output, name))
    for name in os.listdir(staged):
        os.replace(os.path.join(staged, name), os.path.join(output, name))
    os.rmdir(staged)


def _is_megatron_staging(path: str) -> bool:
    """Whether ``path`` holds only what ``native_to_megatron`` writes (the tracker, possibly as its
    temporary file, and iter_0000000/mp_rank_*/model_optim_rng.pt)."""
    for directory, subdirs, files in os.walk(path):
        relative = os.path.relpath(directory, path)
        allowed_dirs = {".": {"iter_0000000"}, "iter_0000000": None}.get(relative, set())
        for name in subdirs:
            if os.path.islink(os.path.join(directory, name)) or not (
                    re.fullmatch(r"mp_rank_\d{2}(_\d{3})?", name) if allowed_dirs is None else name in allowed_dirs):
                return False
        wanted = (r"(\.)?latest_checkpointed_iteration\.txt(\.\w{8}\.tmp)?" if relative == "." else
                  r"model_optim_rng\.pt" if re.fullmatch(r"iter_0000000/mp_rank_\d{2}(_\d{3})?", relative) else None)
        if any(wanted is None or not re.fullmatch(wanted, name) for name in files):
            return False
    return True


def _staging_dirs(output: str, check=None) -> list[str]:
    """Temporary directories a killed ``native_to_hf`` (or ``native_to_megatron``, with ``check``) into
    ``output`` left beside it (mkdtemp's names, holding only files this tool writes)."""
    parent, base = os.path.split(os.path.abspath(output))
    ours = re.compile(rf"^\.{re.escape(base)}\.[A-Za-z0-9_]{{8}}\.incomplete$")
    found = []
    for entry in os.scandir(parent) if os.path.isdir(parent) else ():
        if not (ours.match(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        if check is not None:
            if check(entry.path):
                found.append(entry.path)
            continue
        if all(
                _is_hf_output(name) or re.fullmatch(r"part-\d{5}\.safetensors", name)
                or ((temp := re.fullmatch(r"\.(.+)\.\w{8}\.tmp", name)) and _is_hf_output(temp.group(1)))
                for name in os.listdir(entry.path)):
            found.append(entry.path)
    return found


def remove_leftovers(args) -> list[str]:
    """Delete what an earlier conversion to the same --output left when it was killed: only our own
    temporary names (see ``_staging_dirs``, ``layout.recover``, ``<output>.incomplete``). One line each."""
    if args.consolidate:
        staged = args.output + ".incomplete"
        if os.path.isfile(staged) and not os.path.islink(staged):
            os.remove(staged)
            return [f"deleted {staged} (left by a killed conversion)"]
        return []
    if args.target == "native":
        return layout.recover(args.output)
    removed = _staging_dirs(args.output, _is_megatron_staging if args.target == "megatron" else None)
    for path in removed:
        shutil.rmtree(path)
    return [f"deleted {path} (left by a killed conversion)" for path in removed]


def check_output(args) -> None:
    """Refuse, before any work, an output that would destroy data: --output equal to, inside or around
    --input; an existing non-empty output without --overwrite (and, for a native output, any directory
    that already holds checkpoints, whose tracker converting would move)."""
    source, target = os.path.realpath(args.input), os.path.realpath(args.output)
    for inner, outer in ((target, source), (source, target)):
        if inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep):
            raise ConversionError(f"--output {args.output} and --input {args.input} overlap (one is inside the "
                                  "other): the conversion would overwrite its own input")
    if not os.path.lexists(args.output):
        return
    if not args.consolidate and not os.path.isdir(args.output):
        raise ConversionError(f"--output {args.output} exists and is not a directory")
    if args.target == "native" and not args.consolidate:
        if layout.read_tracker(args.output) is not None or layout.list_iterations(args.output):
            raise ConversionError(f"--output {args.output} already holds checkpoints: converting into it would "
                                  "move its tracker; choose a new directory")
        return
    empty_directory = os.path.isdir(args.output) and not os.listdir(args.output)
    if args.target == "megatron" and not empty_directory:
        raise ConversionError(f"--output {args.output} exists and is not empty; choose a new or empty directory")
    if not empty_directory and not args.overwrite:
        raise ConversionError(f"--output {args.output} exists and is not empty; pass --overwrite to replace "
                              "the files this tool writes there (nothing else is touched)")


def native_to_native(args, log) -> str:
    reader, saved = _newest(args.input, args.ckpt_step)
    config = config_from_dict(saved.training.config)
    names = [name for name in reader.names() if not keys.is_rng_key(name)]
    by_parameter: dict[str, list[str]] = {}
    for name in names:
        by_parameter.setdefault(keys.parameter_of(name), []).append(name)
    if args.consolidate:
        tensors = {keys.parameter_of(name): Deferred(reader.shape(name), reader.dtype(name),
                                                     lambda name=name: reader.read_global(name))
                   for name in names if keys.is_model_key(name)}  # read one at a time while writing
        staged = args.output + ".incomplete"
        try:
            write_safetensors(staged, tensors, {"config": json.dumps(saved.training.config),
                                                "iteration": str(saved.iteration)})
            os.replace(staged, args.output)
        except BaseException:
            if os.path.isfile(staged):
                os.remove(staged)
            raise
        log(f"wrote {args.output}: {len(tensors)} global tensors")
        return args.output
    writer = OfflineWriter(args.output, saved.iteration, config, args.target_tensor_parallel_size,
                           args.target_pipeline_parallel_size)
    layers: dict[str, list[str]] = {}
    for parameter, members in by_parameter.items():
        key = ".".join(parameter.split(".")[:2]) if parameter.startswith("layers.") else parameter
        layers.setdefault(key, []).extend(members)
    for key, members in layers.items():
        files = writer.write_group({name: reader.read_global(name) for name in members})
        log(f"{key}: {len(members)} tensors -> {len(files)} files")
    directory = writer.finish(saved.training)
    save_config(config, os.path.join(args.output, "model.yaml"))
    log(f"wrote {directory} for tensor {writer.tensor} x pipeline {len(writer.stage_layers)}")
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--from", dest="source", choices=["hf", "native", "megatron"], required=True)
    parser.add_argument("--to", dest="target", choices=["hf", "native", "megatron"], required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--ckpt-step", type=int, help="native or Megatron-LM input: this iteration instead of "
                        "the tracker's")
    parser.add_argument("--consolidate", action="store_true", help="native -> native: one safetensors file of "
                        "global model tensors")
    parser.add_argument("--allow-approximate", action="store_true", help="native -> hf: export plans without a "
                        "Hugging Face equivalent as Llama (full attention), listing what changes")
    parser.add_argument("--megatron-transformer-impl", choices=["local", "transformer_engine"], default="local",
                        help="--to megatron: the parameter names of this --transformer-impl (the norms are fused "
                        "into the next linear under transformer_engine)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    parser.add_argument("--overwrite", action="store_true", help="--to hf, --consolidate: replace the files this "
                        "tool writes in an existing output (nothing else there is touched)")
    return parser


def main(argv=None, log=print) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        pair = (args.source, args.target)
        if pair not in (("hf", "native"), ("native", "hf"), ("native", "native"), ("megatron", "native"),
                        ("native", "megatron")):
            raise ConversionError(f"--from {args.source} --to {args.target} is not supported (convert through native)")
        for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
            if getattr(args, flag) < 1:
                raise ConversionError(f"--{flag.replace('_', '-')} must be >= 1")
        if args.consolidate and (args.source, args.target) != ("native", "native"):
            raise ConversionError("--consolidate is for --from native --to native")
        convert = {("hf", "native"): hf_to_native, ("native", "hf"): native_to_hf,
                   ("native", "native"): native_to_native, ("megatron", "native"): megatron_to_native,
                   ("native", "megatron"): native_to_megatron}[pair]
        check_output(args)
        for done in remove_leftovers(args):
            log(done)
        convert(args, log)
    except (ConversionError, CheckpointError, ConfigError, ParallelLayoutError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
