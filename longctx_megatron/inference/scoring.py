"""Log-likelihood of a continuation given a context, through the engine's chunked prefill: the one
definition that retrieval scoring, the lm-eval adapter and perplexity use."""

from __future__ import annotations

import torch

from longctx_megatron.inference.engine import InferenceEngine


def continuation_logprob(engine: InferenceEngine, context: list[int], continuation: list[int],
                         max_length: int | None = None) -> tuple[float, bool]:
    """(sum of log p(continuation | context), natural log; whether greedy decoding gives it).
    ``context`` needs at least one token. With ``max_length`` the context is cut from the left so
    that at most that many tokens go in (the continuation must fit)."""
    if not context or not continuation:
        raise ValueError("a continuation is scored after a context: both need at least one token")
    if max_length is not None and len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={max_length}")
    tokens = (context + continuation)[:-1]  # the last token is only predicted
    if max_length is not None:
        tokens = tokens[-max_length:]
    logits = engine.logits([tokens], [len(tokens) - len(continuation)])[0]
    target = torch.tensor(continuation, device=logits.device)
    logprob = float(torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())
    return logprob, bool(torch.equal(logits.argmax(dim=-1), target))
