"""An lm-evaluation-harness model, ``longctx``, for native checkpoints (no conversion to Hugging Face).

    python -m longctx_megatron.eval.lm_eval_adapter run --model longctx \\
        --model_args load=runs/tiny-cpu/checkpoints,tokenizer_type=SentencePieceTokenizer,\\
tokenizer_model=runs/tiny-cpu/tokenizer.model --tasks my_task --include_path my_tasks/

lm-eval 0.4 finds models only among the modules it has imported, so this module registers
``longctx`` and then runs lm-eval's own command line (``lm_eval`` with the same arguments); in
Python, import it and pass ``model="longctx"`` to ``lm_eval.simple_evaluate``. ``model_args``:
``load``, ``tokenizer_type``, ``tokenizer_model``, ``vocab_size``, ``vocab_file``, ``merge_file``,
``tiktoken_pattern``, ``ckpt_step``, ``dtype``
(float32 / bfloat16 / float16), ``quantize`` (none / int8), ``prefill_chunk``, ``max_length``
(default: the model's max_seq_len) and ``max_gen_toks`` (256). One process, no tensor parallelism.

The three request kinds go through the inference engine's chunked prefill, so a 100K-token context
costs what the model's layer plan costs:
* loglikelihood: sum of log p(continuation | context) and whether greedy decoding gives it;
* loglikelihood_rolling: the whole text's log-likelihood, in non-overlapping windows of
  ``max_length`` tokens, each after an end-of-document token;
* generate_until: greedy or sampled generation that stops at any of ``until``.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (lm-eval's own models: registered before ours, so they stay found)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from longctx_megatron.data.tokenizers import build_tokenizer
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.generate import GREEDY, generate
from longctx_megatron.inference.loading import load_model
from longctx_megatron.inference.quantize import quantize_weights
from longctx_megatron.inference.sampling import SamplingParams
from longctx_megatron.inference.scoring import continuation_logprob
from longctx_megatron.parallel.state import initialize_parallel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _optional_int(value) -> int | None:
    return None if value in (None, "", "None") else int(value)


@register_model("longctx")
class LongctxLM(LM):
    def __init__(self, load: str, tokenizer_type: str, tokenizer_model: str | None = None, vocab_size=None,
                 vocab_file: str | None = None, merge_file: str | None = None, tiktoken_pattern: str | None = None,
                 ckpt_step=None, dtype: str | None = None, quantize: str = "none", prefill_chunk=512,
                 max_length=None, max_gen_toks=256, batch_size=None, device=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"longctx model_args: unknown {', '.join(sorted(unknown))}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"longctx model_args: dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
        del batch_size, device  # lm-eval passes these to every model; requests run one at a time on the CPU/GPU here
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, _optional_int(vocab_size),
                                         vocab_file=vocab_file, merge_file=merge_file,
                                         tiktoken_pattern=tiktoken_pattern)
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(load, initialize_parallel(), target, _DTYPES.get(dtype), step=_optional_int(ckpt_step),
                            log=lambda *_: None)
        quantize_weights(loaded.model, quantize)
        self.engine = InferenceEngine(loaded.model, int(prefill_chunk))
        self.max_length = _optional_int(max_length) or loaded.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        # An empty context is the start of a document.
        return continuation_logprob(self.engine, context or [self.tokenizer.eod], continuation, self.max_length)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._continuation_logprob(self._encode(context), self._encode(continuation))
                for context, continuation in (request.args for request in requests)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for (text,) in (request.args[:1] for request in requests):
            tokens = self._encode(text)
            total = 0.0
            for start in range(0, len(tokens), self.max_length):
                total += self._continuation_logprob([self.tokenizer.eod], tokens[start:start + self.max_length])[0]
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for context, options in (request.args for request in requests):
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", self.max_gen_toks))
            if options.pop("do_sample", False):
                params = SamplingParams(float(options.pop("temperature", 1.0)), int(options.pop("top_k", 0) or 0),
                                        float(options.pop("top_p", 1.0) or 1.0), int(options.pop("seed", 1234)))
            else:
                params = GREEDY
            prompt = self._encode(context)[-(self.max_length - max_new):] or [self.tokenizer.eod]
            result = generate(self.engine, [prompt], max_new, params, self.tokenizer.eod, until,
                              self.tokenizer.decode)[0]
            results.append(result.text)
        return results


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
