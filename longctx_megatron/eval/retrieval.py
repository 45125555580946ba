"""Long-range retrieval by context length and depth: passkey and needle-in-a-haystack.

A fact (a 5-digit pass key, or a key -> 7-digit value "magic number") is planted at a relative
depth (0 = the start, 1 = just before the question) of filler text, the built-in corpus's English
prose (data/builtin_corpus.py: offline, the same on every machine). The prompt is cut to the
context length in tokens, the question closes it, and the model answers. Each case is scored
twice: exact match of the greedy answer (the first digits it generates equal the fact), and the
log-likelihood of the true answer given the prompt (so a model that is not yet right can be seen
getting closer). Every case is seeded: the same grid gives the same prompts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from longctx_megatron.data.builtin_corpus import builtin_documents
from longctx_megatron.data.tokenizers import Tokenizer
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.inference.generate import GREEDY, generate
from longctx_megatron.inference.scoring import continuation_logprob

TASKS = ("passkey", "needle")
EXTRA_TOKENS = 4  # generated beyond the answer's length, so that a longer wrong answer is seen as wrong
ANSWER_ROOM = 16  # positions a default length leaves after the prompt: the longest answer in bytes (8) + 4 + margin
_KEY_WORDS = ("apple", "river", "violet", "copper", "meadow", "falcon", "harbor", "lantern", "orchid", "summit")


@dataclass(frozen=True)
class Case:
    task: str
    length: int  # context tokens, question included
    depth: float  # where the fact sits in the filler, 0..1
    sample: int
    prompt: list[int]
    answer: str  # the text the model should continue with (digits)
    answer_tokens: list[int]


@dataclass(frozen=True)
class Result:
    task: str
    length: int
    depth: float
    sample: int
    exact: bool
    answer_logprob: float  # natural log, summed over the answer's tokens
    generated: str

    def to_json(self) -> dict:
        return asdict(self)


def _fact(task: str, rng: random.Random) -> tuple[str, str, str]:
    """(sentence planted in the filler, question that closes the prompt, answer)."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return (f" The pass key is {key}. Remember it. {key} is the pass key. ",
                " What is the pass key? The pass key is", f" {key}")
    word = rng.choice(_KEY_WORDS)
    value = str(rng.randint(1000000, 9999999))
    return (f" The special magic number for {word} is: {value}. ",
            f" What is the special magic number for {word}? The special magic number for {word} is:", f" {value}")


def filler_tokens(tokenizer: Tokenizer, count: int) -> list[int]:
    """``count`` tokens of the built-in corpus's prose, repeated as needed (no end-of-document tokens)."""
    tokens: list[int] = []
    text = " ".join(" ".join(doc.split()) for doc in builtin_documents())
    piece = tokenizer.encode(text)
    while len(tokens) < count:
        tokens.extend(piece[:count - len(tokens)])
    return tokens


def build_case(tokenizer: Tokenizer, task: str, length: int, depth: float, sample: int, seed: int = 0,
               filler: list[int] | None = None) -> Case:
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; known: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} must be within [0, 1]")
    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{sample}")
    fact, question, answer = _fact(task, rng)
    fact_tokens, question_tokens = tokenizer.encode(fact), tokenizer.encode(question)
    room = length - len(fact_tokens) - len(question_tokens)
    if room < 0:
        raise ValueError(f"context length {length} is shorter than the {task} fact and question "
                         f"({len(fact_tokens) + len(question_tokens)} tokens)")
    filler = filler if filler is not None and len(filler) >= room else filler_tokens(tokenizer, room)
    offset = rng.randrange(0, max(1, len(filler) - room + 1))  # samples read different filler
    haystack = filler[offset:offset + room]
    cut = round(depth * room)
    prompt = haystack[:cut] + fact_tokens + haystack[cut:] + question_tokens
    return Case(task, length, depth, sample, prompt, answer.strip(), tokenizer.encode(answer))


def grid(tokenizer: Tokenizer, tasks, lengths, depths, samples: int, seed: int = 0) -> Iterator[Case]:
    filler = filler_tokens(tokenizer, max(lengths) * 2)
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for sample in range(samples):
                    yield build_case(tokenizer, task, length, depth, sample, seed, filler)


def check_fits(cases: list[Case], max_seq_len: int, flag: str) -> None:
    """Every case's prompt and generated answer must fit the model's positions (ValueError naming ``flag``)."""
    for case in cases:
        need = len(case.prompt) + len(case.answer_tokens) + EXTRA_TOKENS
        if need > max_seq_len:
            raise ValueError(f"{flag}: a {case.task} case of length {case.length} needs {need} positions with its "
                             f"generated answer, more than the model's max_seq_len={max_seq_len}")


def answer_logprob(engine: InferenceEngine, case: Case) -> float:
    """log p(answer | prompt), summed over the answer's tokens."""
    return continuation_logprob(engine, case.prompt, case.answer_tokens)[0]


def score(engine: InferenceEngine, tokenizer: Tokenizer, cases: list[Case],
          progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """Each case: greedy generation of the answer's length plus a few tokens, and the answer's log-likelihood."""
    results = []
    for index, case in enumerate(cases):
        generation = generate(engine, [case.prompt], len(case.answer_tokens) + EXTRA_TOKENS, GREEDY)[0]
        text = tokenizer.decode(generation.tokens)
        digits = re.match(r"\s*(\d+)", text)
        exact = digits is not None and digits.group(1) == case.answer
        results.append(Result(case.task, case.length, case.depth, case.sample, exact,
                              answer_logprob(engine, case), text))
        if progress is not None:
            progress(index + 1, len(cases))
    return results


def summary(results: list[Result]) -> dict[tuple[str, int, float], tuple[float, float]]:
    """(task, length, depth) -> (exact-match accuracy, mean answer log-likelihood)."""
    cells: dict[tuple[str, int, float], list[Result]] = {}
    for result in results:
        cells.setdefault((result.task, result.length, result.depth), []).append(result)
    return {key: (sum(r.exact for r in rows) / len(rows), sum(r.answer_logprob for r in rows) / len(rows))
            for key, rows in cells.items()}
