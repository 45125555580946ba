"""The oracle: a dense (T x T) boolean mask straight from the pattern's rule. O(T^2); tests only."""

from __future__ import annotations

from longctx_megatron.model.attention.backends.base import AttentionBackend
from longctx_megatron.model.attention.patterns import dense_mask
from longctx_megatron.model.attention.softmax import masked_attention


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def attend(self, q, k, v, pattern, dropout_p=0.0, documents=None):
        batch, n_heads, seq_len, head_dim = q.shape
        n_kv = k.shape[1]
        mask = dense_mask(pattern, seq_len, n_heads, q.device, documents)
        mask = mask.unflatten(-3, (n_kv, n_heads // n_kv))
        out, _ = masked_attention(
            q.unflatten(1, (n_kv, n_heads // n_kv)), k[:, :, None], v[:, :, None], mask, dropout_p
        )
        return out.flatten(1, 2)
