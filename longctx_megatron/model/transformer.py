"""The decoder: embedding, the heterogeneous block stack of the layer plan, final norm, tied output.

A GPTModel may hold only part of the stack (a pipeline stage): ``layers`` names the global layer
indices it owns, ``pre_process`` whether it embeds tokens (first stage) and ``post_process``
whether it ends with the final norm, head and loss (last stage), as Megatron-LM's GPTModel.
Parameters keep their global names (``layers.17.mlp.down.weight``) on every stage.
"""

from __future__ import annotations

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.attention.patterns import Documents
from longctx_megatron.model.block import TransformerBlock
from longctx_megatron.model.dropout import Dropout
from longctx_megatron.model.head import LanguageModelHead
from longctx_megatron.model.norm import RMSNorm


class LayerStack(torch.nn.ModuleDict):
    """Transformer blocks keyed by global layer index (``stack[17]``); iterating yields the blocks."""

    def __getitem__(self, index: int | str) -> TransformerBlock:
        return super().__getitem__(str(index))

    def __iter__(self):
        return iter(self.values())


class GPTModel(torch.nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attention_backend: str = "auto",
        layers: range | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        plan = config.layer_plan()
        layers = range(config.n_layers) if layers is None else layers
        # The last stage needs the tied embedding for its head: it keeps a copy (same global name,
        # same initial value; pipeline parallelism sums the two copies' gradients).
        has_embedding = pre_process or (post_process and config.tie_embeddings)
        self.embedding = torch.nn.Embedding(config.vocab_size, config.d_model) if has_embedding else None
        self.embedding_dropout = Dropout(config.hidden_dropout) if pre_process else None
        self.layers = LayerStack({str(i): TransformerBlock(config, plan[i], attention_backend) for i in layers})
        self.final_norm = (RMSNorm(config.d_model, config.norm_eps, config.norm_zero_centered_gamma) if post_process
                           else None)
        untied = post_process and not config.tie_embeddings
        self.output = torch.nn.Linear(config.d_model, config.vocab_size, bias=False) if untied else None
        self.head = LanguageModelHead() if post_process else None

    def is_embedding_copy(self, name: str) -> bool:
        """Whether parameter ``name`` is the last stage's copy of the tied embedding (the first
        stage's is the original: only it counts in the gradient norm and goes into checkpoints)."""
        return name == "embedding.weight" and not self.pre_process

    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.output is None else self.output.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        document_ids: torch.Tensor | None = None,
        kv_cache=None,
        logits_at: torch.Tensor | None = None,
    ):
        """input_ids (B, T) -> (logits (B, T, V), loss over loss_mask or None without labels): the
        mean over the tokens that count, or with ``loss_reduction="sum"`` their sum.

        Under tensor parallelism the logits are this rank's vocabulary shard. A stage without
        ``pre_process`` takes ``hidden`` (the previous stage's output) and ``position_ids``
        instead of ``input_ids``; one without ``post_process`` returns its hidden states.

        ``labels`` are the next tokens (already shifted, as the datasets return them);
        ``position_ids`` (B, T) default to 0..T-1 and may restart at document boundaries.
        ``document_ids`` (B, T) int64, the document of every token (``--reset-attention-mask``),
        keep attention inside each document; None is one document per sample.

        Inference: ``kv_cache`` (inference.cache.KVCache, its positions set by ``begin``) makes the
        tokens the next chunk of the cached sequences; ``logits_at`` (B, K) picks the positions
        whose logits are computed (a prefill chunk needs only its last), instead of all T.
        """
        if self.pre_process:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            hidden = self.embedding_dropout(self.embedding(input_ids))
        elif hidden is None or position_ids is None:
            raise ValueError("a stage without pre_process needs the previous stage's hidden and position_ids")
        documents = None if document_ids is None else Documents(document_ids)  # shared by every layer
        rope_tables = {}  # layers sharing a RoPE config share one cos/sin table
        for index, layer in self.layers.items():
            rotary = layer.attention.rotary
            if rotary.cfg not in rope_tables:
                rope_tables[rotary.cfg] = rotary(position_ids)
            cache = None if kv_cache is None else kv_cache.layer(int(index))
            hidden = layer(hidden, *rope_tables[rotary.cfg], documents, cache)
        if not self.post_process:
            return hidden
        if logits_at is not None:
            hidden = hidden.gather(1, logits_at[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head(self.final_norm(hidden), self.output_weight(), labels, loss_mask, loss_reduction)
