"""generate(): prompts in, new tokens out, streamed step by step.

``stream`` prefills the prompts once, then decodes one token per sequence per step and yields the
tokens of that step (None for a sequence that has finished). A sequence finishes on the end-of-
document token (``eod``, kept), on a stop string (``stop``, needs ``detokenize``: the text is cut
before it), or after ``max_new_tokens``. ``generate`` collects the stream into one result per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.sampling import SamplingParams, sample

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Generation:
    """One prompt's continuation: its new tokens, their text (with ``detokenize``; cut before a stop
    string) and why it ended: "eod", "stop" or "length"."""

    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None


def _check_lengths(engine: InferenceEngine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    limit = engine.model.config.max_seq_len
    for index, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"model's max_seq_len={limit}")
        bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
        if bad:
            raise ValueError(f"prompt {index}: token {bad[0]} is outside the vocabulary (size {engine.vocab_size})")


def stream(engine: InferenceEngine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           params: SamplingParams = GREEDY, eod: int | None = None, stop: Sequence[str] = (),
           detokenize: Callable[[list[int]], str] | None = None,
           results: list[Generation] | None = None) -> Iterator[list[int | None]]:
    """Yield each step's new token per prompt (None once it has finished). ``results``, if given,
    is filled with one Generation per prompt as the stream runs."""
    if stop and detokenize is None:
        raise ValueError("stop strings need a detokenize function (the tokenizer's)")
    _check_lengths(engine, prompts, max_new_tokens)
    results = results if results is not None else []
    results[:] = [Generation() for _ in prompts]
    generator = torch.Generator().manual_seed(params.seed)
    cache, logits = engine.prefill([list(p) for p in prompts], capacity=max(map(len, prompts)) + max_new_tokens)
    for step in range(max_new_tokens):
        tokens = sample(logits, params, generator)
        emitted: list[int | None] = []
        for row, result in enumerate(results):
            if result.finish_reason is not None:
                emitted.append(None)
                continue
            token = int(tokens[row])
            result.tokens.append(token)
            emitted.append(token)
            if detokenize is not None:
                result.text = detokenize(result.tokens)
                cut = min((result.text.find(s) for s in stop if s in result.text), default=-1)
                if cut >= 0:
                    result.text, result.finish_reason = result.text[:cut], "stop"
            if result.finish_reason is None and eod is not None and token == eod:
                result.finish_reason = "eod"
            if result.finish_reason is None and step == max_new_tokens - 1:
                result.finish_reason = "length"
        yield emitted
        if all(result.finish_reason is not None for result in results):
            return
        logits = engine.decode(cache, tokens)


def generate(engine: InferenceEngine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: SamplingParams = GREEDY, eod: int | None = None, stop: Sequence[str] = (),
             detokenize: Callable[[list[int]], str] | None = None) -> list[Generation]:
    results: list[Generation] = []
    for _ in stream(engine, prompts, max_new_tokens, params, eod, stop, detokenize, results):
        pass
    return results
