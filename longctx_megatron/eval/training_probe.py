"""Retrieval during training (``--eval-longctx-interval N``): a small passkey/needle grid every N iterations.

Every N iterations the training chunks' current weights are assembled into a whole-stack model on
every rank (parallel/whole_model.py: this rank's TP shard, stages broadcast over the pipeline
group), so every tensor group then holds the whole model. The grid's cases are shared out over
those groups (data-parallel x pipeline ranks; each scores its cases with its tensor group), and
global rank 0 logs the accuracy and mean answer log-likelihood of each cell and writes them to
TensorBoard (``retrieval/<task>/accuracy`` and ``.../answer_logprob`` over the grid, and
``.../accuracy@<length>`` per length). The copy is freed before training resumes; its memory
counts in the logged peak (the job needs it), its time does not count in throughput. The cases
are built, and checked against the model's length, before training starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.data.tokenizers import Tokenizer
from longctx_megatron.eval.retrieval import TASKS, Case, Result, check_fits, grid, score, summary
from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.whole_model import whole_model


def probe_cases(tokenizer: Tokenizer, tasks, lengths, depths, samples: int, max_seq_len: int,
                lengths_flag: str = "--eval-longctx-lengths") -> list[Case]:
    """The grid's cases, checked: an unknown task, a depth outside [0, 1], or a length the model
    cannot take or too short for a task's fact and question is a ValueError naming the flag
    (``lengths_flag`` says where the lengths came from when they were not given)."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"--eval-longctx-tasks: unknown {unknown}; known: {', '.join(TASKS)}")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"--eval-longctx-depths: {depth} must be within [0, 1]")
    try:
        cases = list(grid(tokenizer, tasks, lengths, depths, samples))
    except ValueError as error:
        raise ValueError(f"{lengths_flag}: {error}") from None
    check_fits(cases, max_seq_len, lengths_flag)
    return cases


@dataclass
class RetrievalProbe:
    interval: int
    cases: list[Case]
    tokenizer: Tokenizer
    config: ModelConfig
    ctx: ParallelContext
    device: torch.device
    attention_backend: str = "auto"
    prefill_chunk: int = 512
    log: object = print
    writer: object = None  # a TensorBoard SummaryWriter on global rank 0, or None
    history: dict = field(default_factory=dict)  # iteration -> the cells scored then

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    def __call__(self, iteration: int, chunks: list) -> dict:
        """Score the grid with the chunks' weights after ``iteration`` iterations; every rank calls
        it. Returns (task, length, depth) -> (accuracy, mean answer log-likelihood) on every rank."""
        start = time.perf_counter()
        model = whole_model(chunks, self.config, self.ctx, self.device, self.attention_backend)
        engine = InferenceEngine(model, self.prefill_chunk, tp_group=self.ctx.tp_group if self.ctx.tp_size > 1
                                 else None)
        # Tensor groups, each now holding the whole model (CP ranks too: each scores cases of its own).
        groups = self.ctx.dp_size * self.ctx.pp_size * self.ctx.cp_size
        group = (self.ctx.pp_rank * self.ctx.dp_size + self.ctx.dp_rank) * self.ctx.cp_size + self.ctx.cp_rank
        mine = self.cases[group::groups]
        results = score(engine, self.tokenizer, mine) if mine else []
        del engine, model
        if groups > 1:  # every group's results, once (from its tensor rank 0), on every rank
            shared: list[list[Result]] = [[] for _ in range(self.ctx.world_size)]
            dist.all_gather_object(shared, results if self.ctx.tp_rank == 0 else [])
            results = [result for part in shared for result in part]
        cells = self.history[iteration] = summary(results)
        self._report(iteration, cells, time.perf_counter() - start)
        return cells

    def _report(self, iteration: int, cells: dict, seconds: float) -> None:
        tasks = sorted({task for task, _, _ in cells})
        for task in tasks:
            mine = {(length, depth): value for (t, length, depth), value in cells.items() if t == task}
            accuracy = sum(a for a, _ in mine.values()) / len(mine)
            logprob = sum(lp for _, lp in mine.values()) / len(mine)
            self.log(f"retrieval at iteration {iteration}: {task} accuracy {accuracy:.2f}, mean answer log-likelihood "
                     f"{logprob:.2f} | " + " ".join(f"L{length}@{depth:g} {a:.2f}"
                                                     for (length, depth), (a, _) in sorted(mine.items())))
            if self.writer:
                self.writer.add_scalar(f"retrieval/{task}/accuracy", accuracy, iteration)
                self.writer.add_scalar(f"retrieval/{task}/answer_logprob", logprob, iteration)
                for length in sorted({length for length, _ in mine}):
                    values = [a for (n, _), (a, _) in mine.items() if n == length]
                    self.writer.add_scalar(f"retrieval/{task}/accuracy@{length}", sum(values) / len(values),
                                           iteration)
        self.log(f"retrieval at iteration {iteration}: {len(self.cases)} cases in {seconds:.1f} s")
