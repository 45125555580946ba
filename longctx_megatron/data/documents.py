"""Document boundaries inside a packed sample: the one definition of the end-of-document (EOD) rule.

A sample joins several documents, each ended by the tokenizer's EOD token. The EOD belongs to the
document it ends; the next document starts on the token after it. The first token of a sample
starts document 0, even when the sample begins in the middle of a document. Every per-token
document option (Megatron-LM's ``--reset-position-ids``, ``--reset-attention-mask`` and
``--eod-mask-loss``) is derived here, so the options cannot disagree about where a document ends.
"""

from __future__ import annotations

import torch

from longctx_megatron.packing import document_positions


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """The index (int64, from 0) of the document each token of ``tokens`` belongs to, along the last dim.

    Token t belongs to document ``number of EOD tokens at positions < t``: the index increments on the
    token *after* each EOD, so an EOD is the last token of its own document, and consecutive EODs
    make documents that hold only their EOD. With no EOD the whole sample is document 0.
    """
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def gpt_sample(text: torch.Tensor, eod: int | None = None, *, reset_position_ids: bool = False,
               reset_attention_mask: bool = False, eod_mask_loss: bool = False) -> dict[str, torch.Tensor]:
    """The training sample of ``seq_length + 1`` int64 tokens ``text``: inputs ``tokens``, next-token
    ``labels``, ``loss_mask`` (float, 1 everywhere; 0 where the *input* token is EOD with
    ``eod_mask_loss``) and ``position_ids`` (0..T-1; restarting at each document with
    ``reset_position_ids``). With ``reset_attention_mask`` it also holds ``document_ids`` (int64,
    shape (T,), ``document_ids(tokens, eod)``): the model keeps attention within a document.
    The three options need ``eod``."""
    if eod is None and (reset_position_ids or reset_attention_mask or eod_mask_loss):
        raise ValueError("reset_position_ids, reset_attention_mask and eod_mask_loss need the tokenizer's eod id")
    tokens, labels = text[:-1], text[1:]
    sample = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(len(tokens))}
    if eod_mask_loss:
        sample["loss_mask"][tokens == eod] = 0.0
    ids = document_ids(tokens, eod) if reset_position_ids or reset_attention_mask else None
    sample["position_ids"] = document_positions(ids) if reset_position_ids else torch.arange(len(tokens))
    if reset_attention_mask:
        sample["document_ids"] = ids
    return sample
