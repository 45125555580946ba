"""Activation bytes of one micro-batch, per layer and for the head: what autograd keeps, and the
working set on top of it while a layer's backward pass runs.

Each term mirrors what the code in ``model/`` and ``parallel/`` keeps for backward, tensor by
tensor (ADR 0017 lists them); the CPU terms are checked against measured peaks in
tests/memory/test_training_memory.py. Sizes are per rank: ``heads``, ``kv_heads`` and ``ffn`` are
this tensor-parallel rank's, ``tokens`` the micro-batch's tokens this rank attends for (the whole
sequence under sequence parallelism, this context-parallel rank's part under CP), ``norm_tokens``
the tokens the norms and residual stream hold (divided by TP under sequence parallelism).

On CPU the attention backend is ``chunked`` (SDPA on query blocks against the key spans they reach);
on CUDA ``auto`` picks flash-attn or FlexAttention, which keep q, k, v, the output and its LSE
(their terms are written from the kernels' interfaces and were not measured here: no GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.model.mlp import BACKWARD_ROWS_ELEMENTS

F32 = 4
BOOL = 1


@dataclass(frozen=True)
class LayerShape:
    """The sizes one layer's activations depend on, on one rank, for one micro-batch."""

    batch: int  # samples in the micro-batch
    seq: int  # positions per sample this rank attends for (s / CP)
    d_model: int
    heads: int  # this TP rank's query heads
    kv_heads: int  # this TP rank's KV heads
    head_dim: int
    ffn: int  # this TP rank's SwiGLU width
    element: int  # bytes per activation element (the training dtype)
    sequence_parallel_ranks: int = 1  # TP size when sequence parallelism splits norms and residuals
    hidden_dropout: float = 0.0
    cuda: bool = False
    context: int = 1  # context-parallel ranks sharing the sequence
    cp_allgather: bool = False  # --cp-comm-type allgather: every layer gathers every rank's keys

    def context_keys(self, spec: LayerSpec) -> int:
        """Keys and values of other CP ranks this rank attends over (parallel/context.py): a full layer's
        causal prefix (the last zigzag rank's is nearly the whole rest of the sequence), a local layer's
        halo of its reach, plus the global tokens; 0 without context parallelism."""
        if self.context == 1:
            return 0
        total = self.seq * self.context
        if spec.kind == "full" or self.cp_allgather:
            positions = total - self.seq
        else:
            reach = spec.window * (spec.dilation if spec.kind == "dilated" else 1)
            positions = min(reach, total) + (-(-total // spec.global_every) if spec.global_every else 0)
        return 2 * self.batch * positions * self.kv_heads * self.head_dim * self.element

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def norm_tokens(self) -> int:
        return self.tokens // self.sequence_parallel_ranks


@dataclass(frozen=True)
class LayerBytes:
    """Kept for backward (``saved``, by part) and the backward pass in ``phases`` (in the order they run):
    (working set on top of what is still kept, bytes of ``saved`` freed when the phase ends)."""

    saved: dict[str, int]
    phases: tuple[tuple[int, int], ...]

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def _norm(shape: LayerShape) -> int:
    """RMSNorm keeps its input (on CPU, where F.rms_norm upcasts, an fp32 copy of 16-bit input), on CPU
    the fp32 normalised input, and the fp32 inverse RMS; the projection after it keeps the output (under
    sequence parallelism this rank's shard: parallel/layers.py gathers it again in backward). On CUDA
    the fused kernel (apex or torch) keeps only the input and the inverse RMS."""
    e, t = shape.element, shape.norm_tokens
    kept = t * shape.d_model * e if shape.cuda else t * shape.d_model * (2 * F32)
    return kept + t * F32 + t * shape.d_model * e


def _regathered(shape: LayerShape) -> int:
    """Under sequence parallelism a projection's backward gathers its input again: the whole sequence."""
    return shape.tokens * shape.d_model * shape.element if shape.sequence_parallel_ranks > 1 else 0


def _dropout(shape: LayerShape) -> int:
    """A hidden dropout with p > 0 keeps its mask: on CUDA the fused kernel's booleans, on CPU the scaled
    noise tensor in the activation dtype (F.dropout with p = 0 returns its input and keeps nothing)."""
    if shape.hidden_dropout == 0:
        return 0
    return shape.norm_tokens * shape.d_model * (BOOL if shape.cuda else shape.element)


def _blocks(window: int, seq: int) -> tuple[int, int, int]:
    """(block C, span S, blocks n) of backends/chunked.sdpa_window_attention for ``window`` over ``seq``."""
    window = min(window, seq)
    block = min(max(64, window // 4), seq)
    return block, window - 1 + block, -(-seq // block)


def _window_sdpa(shape: LayerShape, batch: int, seq: int, heads: int, kv_heads: int, window: int,
                 masked: bool, extra_keys: int = 0) -> tuple[int, int]:
    """(kept, backward extra) of chunked's blocked SDPA over ``batch`` sequences of ``seq`` positions.

    Kept: the query blocks (a copy), the key and value spans (a view of the padded keys when
    ``batch`` is 1 and nothing is appended, else a copy per block), SDPA's output and fp32 LSE, and
    the mask SDPA turns into an additive one in the activation dtype (the leading blocks' own mask
    and one shared band, or one per block with documents, offsets or extra keys). Backward: the
    gradients of the query blocks and of both spans, and the padded key gradients they fold into.
    """
    e, dim = shape.element, shape.head_dim
    block, span, n = _blocks(window, seq)
    rows = n * batch
    q_blocks = rows * heads * block * dim * e
    keys = span + extra_keys
    if batch == 1 and not extra_keys:
        spans = 2 * (n * block + min(window, seq) - 1) * kv_heads * dim * e
    else:
        spans = 2 * rows * kv_heads * keys * dim * e
    if masked or extra_keys:
        mask = rows * block * keys * e
    else:
        head_blocks = min(n, -(-(min(window, seq) - 1) // block))
        mask = (head_blocks * batch + 1) * block * span * e
    out = rows * heads * block * dim * e + rows * heads * block * F32
    kept = q_blocks + spans + mask + out
    backward = q_blocks + spans + 2 * batch * (n * block + min(window, seq)) * kv_heads * dim * e
    return kept, backward


def _attention_core(spec: LayerSpec, shape: LayerShape) -> tuple[dict[str, int], int]:
    """What core attention keeps for one layer of ``spec``'s kind, and its backward working set."""
    if shape.cuda:
        return _attention_core_cuda(spec, shape)
    e, b, s, h, hkv, dim = shape.element, shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim
    q = b * s * h * dim * e
    k = b * s * hkv * dim * e
    lse = b * s * h * F32
    if spec.kind == "full":  # SDPA's causal kernel keeps the rotated q and k (v: a view), output and LSE
        return {"attention": q + k + q + lse}, q + 2 * k
    if spec.kind == "sliding" and not spec.global_every:
        kept, backward = _window_sdpa(shape, b, s, h, hkv, spec.window, masked=False)
        return {"attention": kept}, backward
    if spec.kind == "sliding":
        globals_ = -(-s // spec.global_every)
        kept, backward = _window_sdpa(shape, b, s, h, hkv, spec.window, masked=True, extra_keys=globals_)
        # Global queries over every earlier key: gathered q, the rotated keys, a (K, s) mask, output, LSE.
        global_rows = b * globals_ * h * dim * e
        queries = 2 * global_rows + k + globals_ * s * e + b * globals_ * h * F32
        return {"attention": kept + queries}, backward + k
    # dilated: heads grouped by their offset; each group runs in (b * r) residue-class sequences.
    r = spec.dilation
    groups = min(hkv, r)
    kept = backward = 0
    for group in range(groups):
        group_kv = len(range(group, hkv, groups))
        group_kept, group_backward = _window_sdpa(shape, b * r, -(-s // r), group_kv * (h // hkv), group_kv,
                                                  spec.window, masked=group > 0 or hkv > r)
        kept, backward = kept + group_kept, max(backward, group_backward)
    return {"attention": kept}, backward + q + 2 * k


def _attention_core_cuda(spec: LayerSpec, shape: LayerShape) -> tuple[dict[str, int], int]:
    """flash-attn / FlexAttention keep q, k, v (v: the QKV output's view), the output and the fp32 LSE;
    dilated heads run on residue-class copies; global tokens add the merge of their keys by LSE and
    the global queries' recomputed blocks (fp32 outputs). Backward: dq, dk, dv."""
    e, b, s, h, hkv, dim = shape.element, shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim
    q, k, lse = b * s * h * dim * e, b * s * hkv * dim * e, b * s * h * F32
    kept = q + k + q + lse
    if spec.kind == "dilated":
        kept += q + 2 * k  # the residue-class copies the kernel reads
    if spec.kind == "sliding" and spec.global_every:
        globals_ = -(-s // spec.global_every)
        rows = b * h * -(-s // 64) * 64
        kept += rows * dim * (e + F32) + rows * F32 + 2 * b * hkv * globals_ * dim * e  # global keys' blocks
        kept += q + b * s * h * F32  # the LSE merge's inputs and weights
        kept += 2 * b * hkv * s * dim * e + b * globals_ * h * dim * (e + F32) + globals_ * s * BOOL
    return {"attention": kept}, q + 2 * k


def layer_bytes(spec: LayerSpec, shape: LayerShape, recompute: str = "none") -> LayerBytes:
    """One block (norm, attention, residual, norm, SwiGLU, residual) under ``recompute``: "none",
    "selective" (the attention module keeps its input and runs again in backward) or "full" (the
    block keeps its input and runs again in backward). Its backward runs the MLP's part, which frees
    the MLP's activations, then the attention's."""
    e, t, d = shape.element, shape.tokens, shape.d_model
    core, core_backward = _attention_core(spec, shape)
    core_backward += _regathered(shape)
    if shape.context > 1:
        core = {**core, "context-parallel keys": shape.context_keys(spec)}
        core_backward += shape.context_keys(spec)
    # The QKV output stays alive where attention keeps v, a view of it: SDPA's causal kernel, global
    # queries, the CUDA kernels. Windows on CPU copy v into key spans, so it is freed.
    keeps_v = shape.cuda or spec.kind == "full" or (spec.kind == "sliding" and spec.global_every)
    qkv = t * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * e if keeps_v else 0
    # The heads' (b, s, h * D) copy the output projection keeps. SDPA's causal kernel on CPU, and flash-attn
    # on CUDA (16-bit; full layers and windows without global tokens), already return their output in
    # that layout: there it is a view of the output kept above.
    flash = shape.cuda and e < F32 and (spec.kind == "full" or (spec.kind == "sliding" and not spec.global_every))
    heads_out = 0 if (spec.kind == "full" and not shape.cuda) or flash else t * shape.heads * shape.head_dim * e
    attention = {"attention norm": _norm(shape) + _dropout(shape), "qkv": qkv, **core, "attention output": heads_out}
    # SwiGLU keeps [gate; up] and the product (model/mlp.py). Its backward holds the product's gradient
    # and the [gate; up] gradient it returns, plus two temporaries for one slice of tokens.
    mlp = {"mlp norm": _norm(shape) + _dropout(shape), "swiglu": t * shape.ffn * e * 3}
    temporaries = min(t * shape.ffn, BACKWARD_ROWS_ELEMENTS) * 2 * e
    mlp_backward = t * shape.ffn * 3 * e + temporaries + _regathered(shape)
    attention_total, mlp_total = sum(attention.values()), sum(mlp.values())
    if recompute == "full":
        block_input = shape.norm_tokens * d * e
        return LayerBytes({"block input": block_input},
                          ((attention_total + mlp_total + mlp_backward, 0),
                           (attention_total + core_backward, block_input)))
    if recompute == "selective":
        inner = qkv + sum(core.values()) + heads_out
        return LayerBytes({"attention norm": attention["attention norm"], **mlp},
                          ((mlp_backward, mlp_total), (inner + core_backward, attention["attention norm"])))
    return LayerBytes({**attention, **mlp}, ((mlp_backward, mlp_total), (core_backward, attention_total)))


def head_bytes(shape: LayerShape, vocab: int, tensor_parallel: int) -> LayerBytes:
    """Final norm, logits and cross entropy of one micro-batch (``vocab`` this rank's padded slice).

    Plain head: log_softmax keeps fp32 log-probabilities; its backward holds them, their incoming
    gradient and its result at once (3 fp32 copies of the logits). Vocab-parallel head (TP > 1):
    the fp32 softmax is kept and the backward works in place, then casts to the activation dtype."""
    t, e = shape.tokens, shape.element
    logits = t * vocab
    if tensor_parallel == 1:
        backward = 2 * logits * F32
    else:
        backward = logits * e + _regathered(shape)
    saved = {"final norm": _norm(shape), "logits": logits * F32}
    return LayerBytes(saved, ((backward, sum(saved.values())),))


def head_forward_extra(shape: LayerShape, vocab: int, tensor_parallel: int) -> int:
    """The logits' working set during the forward pass on top of what the head keeps: the logits in the
    activation dtype (returned, so alive until the micro-batch's forward ends) and, in the plain head,
    their fp32 copy for 16-bit logits (the vocab-parallel loss turns its one fp32 copy into the softmax
    it keeps)."""
    logits = shape.tokens * vocab
    copy = logits * F32 if shape.element < F32 and tensor_parallel == 1 else 0
    return logits * shape.element + copy


def embedding_bytes(shape: LayerShape) -> int:
    """The embedding keeps its token ids; its dropout (p > 0) a mask."""
    return shape.tokens * 8 + _dropout(shape)
