"""Generate text from a checkpoint: a native --save directory (any layout) or a Hugging Face directory.

    python tools/generate.py --load runs/tiny-cpu/checkpoints --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model runs/tiny-cpu/tokenizer.model --prompt "The Python" --max-new-tokens 40
    torchrun --nproc-per-node 8 tools/generate.py --load ckpt --tensor-model-parallel-size 8 --bf16 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok-dir --prompt-file book.txt --top-p 0.9

Flags follow Megatron-LM's (``--load``, ``--tokenizer-type``, ``--tokenizer-model``,
``--tensor-model-parallel-size``; ``--out-seq-length`` and ``--num-tokens-to-generate`` are accepted
for ``--max-new-tokens``, ``--top_k``/``--top_p`` for ``--top-k``/``--top-p``). Every ``--prompt``
and every ``--prompt-file`` (the whole file is one prompt) is one sequence of the batch. With one
prompt the text is streamed as it is generated; rank 0 prints, and ``--output-file`` gets one JSON
line per prompt. Bad flags, files or checkpoints end with exit code 2 and a message naming them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.inference.generate import stream
from longctx_megatron.inference.launch import add_model_flags, open_session, tool_main
from longctx_megatron.inference.sampling import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_model_flags(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one prompt")
    parser.add_argument("--max-new-tokens", "--out-seq-length", "--num-tokens-to-generate", dest="max_new_tokens",
                        type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0, help="0 = no limit")
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    parser.add_argument("--output-file", help="one JSON line per prompt: prompt, text, tokens, finish_reason")
    return parser


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for path in args.prompt_file:
        try:
            with open(path, encoding="utf-8") as file:
                prompts.append(file.read())
        except UnicodeDecodeError as error:
            raise ValueError(f"--prompt-file {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-file")
    return prompts


def run(args, log=print) -> list:
    prompts = _prompts(args)
    params = SamplingParams(0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed)
    session = open_session(args, log)
    tokenizer, engine, speaks = session.tokenizer, session.engine, session.speaks
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    results: list = []
    start, first, printed = time.perf_counter(), None, ""
    for _ in stream(engine, encoded, args.max_new_tokens, params, None if args.ignore_eod else tokenizer.eod,
                    args.stop, tokenizer.decode, results):
        first = first or time.perf_counter()
        if speaks and len(prompts) == 1:  # stream the text as it grows
            text = results[0].text or ""
            if text.startswith(printed):
                print(text[len(printed):], end="", flush=True)
                printed = text
    end = time.perf_counter()
    if speaks:
        if len(prompts) == 1:
            print(results[0].text[len(printed):] if results[0].text.startswith(printed) else "", flush=True)
        else:
            for index, result in enumerate(results):
                print(f"--- prompt {index} ({result.finish_reason}):\n{result.text}", flush=True)
        steps = max(len(result.tokens) for result in results)
        decode_ms = (end - first) / max(1, steps - 1) * 1e3
        log(f"prompt tokens {[len(e) for e in encoded]}: prefill and first token {first - start:.2f} s, then "
            f"{decode_ms:.1f} ms per step; finished: {[result.finish_reason for result in results]}")
        if args.output_file:
            lines = [json.dumps({"prompt": prompt, "text": result.text, "tokens": result.tokens,
                                 "finish_reason": result.finish_reason}) for prompt, result in zip(prompts, results,
                                                                                                   strict=True)]
            with atomic_write(args.output_file) as file:
                file.write("\n".join(lines) + "\n")
    return results


def main(argv=None, log=print) -> int:
    return tool_main(build_parser().parse_args(argv), run, log)


if __name__ == "__main__":
    sys.exit(main())
