"""megatron-core's own GPTModel on CPU in this process, and Megatron-LM checkpoints written the way it lays them out.

megatron-core 0.16.1 assumes CUDA in a few places even with ``use_cpu_initialization``: the RoPE
frequencies and the attention buffer go to ``torch.cuda.current_device()``, the default causal and
sliding-window masks are built on "cuda", the attention dropout forks a CUDA RNG tracker, and the
torch_dist saver calls ``torch.cuda.synchronize``, asks psutil for its memory and starts a spawned
manager process for a result queue. ``megatron_cpu`` patches exactly those for the duration (a
single-process gloo group, TP = PP = 1), and undoes them after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import tempfile
import warnings

import torch
import torch.distributed as dist

from longctx_megatron.checkpoint import megatron

VOCAB = 300  # the tokenizer's ids; Megatron pads to a multiple of 128 x TP
TOKENS = torch.arange(24) * 7 % VOCAB
SIZES = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)


@contextlib.contextmanager
def megatron_cpu(tensor_size: int = 1):
    """megatron-core runnable on CPU in this process (see the module docstring); yields nothing. Under
    tests.distributed.run_on_ranks (WORLD_SIZE set) the group spans those ranks, split into
    ``tensor_size`` ranks per model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.fusions import fused_softmax
    patches = [
        (torch.cuda, "current_device", lambda: "cpu"), (torch.cuda, "synchronize", lambda *_: None),
        (fused_softmax, "get_default_causal_mask", lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()),
        (fused_softmax, "get_sliding_window_causal_mask", lambda sq, sk, window: ~torch.tril(
            torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=sk - sq - window[0]),
            diagonal=sk - sq + window[1])),
        (filesystem_async, "_process_memory", lambda: 0), (filesystem_async, "_results_queue", queue.Queue()),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    with tempfile.TemporaryDirectory() as store:
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", init_method=f"file://{os.path.join(store, 'store')}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(tensor_size, 1)
            tracker = tensor_parallel.get_cuda_rng_tracker()
            tracker.fork = lambda *_, **__: contextlib.nullcontext()  # dropout is 0: no generator is drawn from
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
            for owner, name, value in saved:
                setattr(owner, name, value)


def args_namespace(tied: bool = True, tensor: int = 1, pipeline: int = 1, window=None, layernorm_1p=False,
                   **overrides) -> argparse.Namespace:
    """The args Megatron-LM stores with a checkpoint, for the tiny Llama-like model below."""
    return argparse.Namespace(**{**dict(
        **SIZES, group_query_attention=True, kv_channels=16, max_position_embeddings=128, seq_length=128,
        vocab_size=VOCAB, make_vocab_size_divisible_by=128,
        padded_vocab_size=megatron.megatron_padded_vocab(VOCAB, tensor), normalization="RMSNorm",
        norm_epsilon=1e-5, swiglu=True, add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        untie_embeddings_and_output_weights=not tied, apply_layernorm_1p=layernorm_1p, window_size=window,
        window_attn_skip_freq=None, num_experts=None, tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline, virtual_pipeline_model_parallel_size=None, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.02, params_dtype=torch.float32, bf16=False, fp16=False),
        **overrides})


def gpt_model(args: argparse.Namespace, seed: int = 0):
    """megatron-core's GPTModel (local spec) for ``args``, with random weights and random norms."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer import TransformerConfig
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size, kv_channels=args.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=args.norm_epsilon, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        window_size=args.window_size, tensor_model_parallel_size=args.tensor_model_parallel_size)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=args.rotary_base,
                     rope_scaling=args.use_rope_scaling, rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():  # replicated norms alike on every TP rank, every TP shard its own
        for index, (name, parameter) in enumerate(model.named_parameters()):
            norm = "norm" in name
            generator = torch.Generator().manual_seed(seed * 1000 + index * 10 + (0 if norm else tp_rank))
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.2 * noise if norm else 0.05 * noise)
    return model.eval()


def megatron_logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None], torch.arange(len(tokens))[None], None)[0]


def global_state(model) -> dict[str, torch.Tensor]:
    """The model's weights by mcore name (TP = 1: these are the global tensors), without _extra_state."""
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if isinstance(tensor, torch.Tensor)}


def rank_states(state: dict, args: argparse.Namespace, virtual: int = 1) -> dict[tuple[int, int], dict]:
    """Each (tensor, pipeline) rank's ``model``/``model0``.. entries as Megatron's legacy saver lays them out:
    TP shards (qkv by whole query groups, fc1 as [gate_r; up_r], embedding rows of the padded vocabulary),
    layers numbered from 0 in each pipeline stage and virtual chunk, the embedding on the first stage and
    the final norm and output layer (its tied copy included) on the last."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    chunks = pp * virtual
    per_chunk = args.num_layers // chunks
    out = {}
    for t in range(tp):
        for p in range(pp):
            models = {}
            for c in range(virtual):
                first, last = (c == 0 and p == 0), (c == virtual - 1 and p == pp - 1)
                start = (c * pp + p) * per_chunk
                model = {}
                for name, tensor in state.items():
                    layer = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
                    if layer:
                        index = int(layer.group(1))
                        if not start <= index < start + per_chunk:
                            continue
                        name = f"decoder.layers.{index - start}.{layer.group(2)}"
                    elif name.startswith("embedding.") and not first or not name.startswith("embedding.") and not last:
                        continue
                    model[name] = megatron.shard(name, tensor, t, tp)
                    if name.endswith(".weight") and "linear_" in name:
                        model[name.removesuffix("weight") + "_extra_state"] = None
                if last and "output_layer.weight" not in model and pp > 1:
                    model["output_layer.weight"] = megatron.shard("output_layer.weight",
                                                                  state["embedding.word_embeddings.weight"], t, tp)
                models["model" if virtual == 1 else f"model{c}"] = model
            out[(t, p)] = models
    return out


def save_legacy(root: str, state: dict, args: argparse.Namespace, iteration: int = 7, virtual: int = 1,
                release: bool = False) -> str:
    """A Megatron-LM ``--ckpt-format torch`` checkpoint of ``state`` (global tensors) under ``root``."""
    directory = os.path.join(root, "release" if release else f"iter_{iteration:07d}")
    pp = args.pipeline_model_parallel_size
    for (t, p), models in rank_states(state, args, virtual).items():
        rank_dir = os.path.join(directory, f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        os.makedirs(rank_dir)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, **models,
                    "rng_state": [{"random_rng_state": (3, (1, 2), None), "np_rng_state": __import__("numpy").random
                                   .RandomState(0).get_state(), "torch_rng_state": torch.get_rng_state()}],
                    "opt_param_scheduler": {"max_lr": 1e-4}}, os.path.join(rank_dir, megatron.LEGACY_FILE))
    with open(os.path.join(root, megatron.TRACKER), "w") as file:
        file.write("release" if release else str(iteration))
    return root


def save_torch_dist(root: str, model, args: argparse.Namespace, iteration: int = 5) -> str:
    """A ``--ckpt-format torch_dist`` checkpoint written by megatron-core's dist_checkpointing (under megatron_cpu)."""
    from megatron.core import dist_checkpointing

    directory = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": iteration,
                             "checkpoint_version": 3.0}, directory)
    if dist.get_rank() == 0:
        with open(os.path.join(root, megatron.TRACKER), "w") as file:
            file.write(str(iteration))
    return root
