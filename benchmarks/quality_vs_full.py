"""Does the hybrid layer plan match full attention? Equal parameters, equal tokens, the same seeds.

Run ``python benchmarks/quality_vs_full.py`` (``--help`` for the flags). Four plans of the same
tiny model (same widths, so the same parameter count) train from the same seed on the same batches:

- ``hybrid``: the design's plan (sliding with global tokens, dilated, full) scaled to the depth;
- ``hybrid-no-global``: the same plan without global tokens (what the global tokens cost or add);
- ``full``: full causal attention in every layer;
- ``control``: sliding attention in every layer and no global tokens, whose receptive field ends
  ``n_layers * (window - 1)`` tokens back, so it cannot retrieve farther than that (the check that
  the task can fail).

The global tokens are spaced so that a query sees about a quarter as many global keys as window
keys (every ``seq_len / 4``: 4 global keys against a 16-key window), near the design's proportion
at 100K tokens (800 global keys against a 4096-key window).

Every training row packs documents of log-uniform lengths in [8, seq_len]. Each document is a
window of the built-in corpus (bytes) with one *needle* planted in it: a token drawn from
``--values`` reserved ids, at a random distance before the document's last position, which holds
a reserved QUERY token whose label is the needle. The short documents give retrieval a strong
gradient early (with one sample per row, the hybrid never learned a passkey in the runs of ADR
0014); the long ones train every distance. The loss is the mean language-model loss on the text plus the
mean loss at the QUERYs, so the run trains on a mix of the two. Reported:

(a) validation loss on held-out corpus text (the last tenth of the byte stream, no needles);
(b) retrieval accuracy (greedy answer at QUERY) by distance bucket, on held-out whole-row samples
    whose needle distances cover each bucket evenly; chance is 1 / ``--values``.

The table gives the median over ``--seeds`` of each cell, and every seed's row is printed as it
finishes, with the validation-loss ratio to full attention per seed (the plans share each
seed's batches and initial weights, so the pairs are comparable).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx_megatron.config.layer_plan import DEFAULT_LAYOUT, scale_layout
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.data.builtin_corpus import builtin_token_stream
from longctx_megatron.data.tokenizers import ByteTokenizer
from longctx_megatron.model.build import build_model
from longctx_megatron.packing import document_positions


@dataclass(frozen=True)
class Setup:
    """Everything that defines one comparison (the defaults are the benchmark's)."""

    seq_len: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    window: int = 16
    global_every: int = 64
    dilation: int = 2
    values: int = 16
    steps: int = 600
    batch: int = 16
    lr: float = 3e-3
    answer_weight: float = 1.0
    min_document: int = 8
    eval_samples: int = 256
    val_windows: int = 64

    def __post_init__(self):
        if self.reach + 2 >= self.seq_len:
            raise ValueError(f"the control's reach, layers x (window - 1) = {self.reach}, must end at least 2 tokens "
                             f"before --seq-len {self.seq_len}: nothing would lie beyond it (lower --window or "
                             "--layers, or raise --seq-len)")
        if self.n_layers < 4:
            raise ValueError(f"--layers {self.n_layers}: the hybrid needs 4 layers to hold every kind (sliding, "
                             "dilated, full)")

    @property
    def query_id(self) -> int:
        return ByteTokenizer.vocab_size + self.values

    @property
    def reach(self) -> int:
        """How far back the control (sliding only, no globals) can see at all."""
        return self.n_layers * (self.window - 1)

    def buckets(self) -> list[tuple[int, int]]:
        """Distance buckets [lo, hi): inside one window, inside the control's reach, beyond it."""
        edges = [1, self.window, self.reach + 1, (self.reach + self.seq_len) // 2, self.seq_len - 1]
        return list(zip(edges[:-1], edges[1:], strict=True))


def plans(setup: Setup) -> dict[str, ModelConfig]:
    """The four plans: same widths and depth, different attention in each layer."""
    common = dict(d_model=setup.d_model, n_layers=setup.n_layers, n_heads=setup.n_heads,
                  n_kv_heads=setup.n_kv_heads, d_ff=setup.d_model * 4, max_seq_len=setup.seq_len,
                  vocab_size=setup.query_id + 1, sliding_window=setup.window, dilated_window=setup.window,
                  dilation=setup.dilation)
    hybrid = ",".join(f"{kind}:{count}" for kind, count in scale_layout(DEFAULT_LAYOUT, setup.n_layers))
    return {
        "hybrid": ModelConfig(attention_layout=hybrid, global_every=setup.global_every, **common),
        "hybrid-no-global": ModelConfig(attention_layout=hybrid, global_every=0, **common),
        "full": ModelConfig(attention_layout=f"full:{setup.n_layers}", **common),
        "control": ModelConfig(attention_layout=f"sliding:{setup.n_layers}", global_every=0, **common),
    }


class NeedleTask:
    """Corpus windows with one planted needle; train and held-out parts of the byte stream."""

    def __init__(self, setup: Setup):
        self.setup = setup
        stream = builtin_token_stream(ByteTokenizer())
        cut = stream.numel() * 9 // 10
        self.train_text, self.val_text = stream[:cut], stream[cut:]

    def _windows(self, text: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, text.numel() - self.setup.seq_len - 1, (count,), generator=generator)
        return torch.stack([text[s:s + self.setup.seq_len + 1] for s in starts.tolist()])

    def _plant(self, ids, labels, answer, start: int, end: int, distance: int, generator) -> None:
        """Plant a needle ``distance`` tokens before position ``end`` of the document that begins at
        ``start``; ``end`` becomes the QUERY."""
        needle = ByteTokenizer.vocab_size + int(torch.randint(0, self.setup.values, (), generator=generator))
        where = end - distance
        ids[where] = needle
        if where > start:
            labels[where - 1] = -100  # the needle itself is unpredictable
        if end > start:
            labels[end - 1] = -100  # so is the QUERY
        ids[end] = self.setup.query_id
        labels[end] = needle
        answer[end] = True

    def rows(self, text: torch.Tensor, lengths: list[list[int]], generator: torch.Generator,
             distances: list[int] | None = None):
        """A batch: row i packs documents of ``lengths[i]`` (summing to seq_len), each a window of
        ``text`` with a needle before the QUERY that ends it, at a random distance (or, with one
        document per row, at ``distances[i]``).
        Returns ids, labels (-100: no loss), answer (bool, the QUERY positions), positions, documents."""
        windows = self._windows(text, len(lengths), generator)
        ids, labels = windows[:, :-1].clone(), windows[:, 1:].clone()
        answer = torch.zeros_like(ids, dtype=torch.bool)
        documents = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                                 for row in lengths])
        for row, row_lengths in enumerate(lengths):
            start = 0
            for length in row_lengths:
                distance = (int(torch.randint(1, length, (), generator=generator)) if distances is None
                            else distances[row])
                self._plant(ids[row], labels[row], answer[row], start, start + length - 1, distance, generator)
                start += length
        return ids, labels, answer, document_positions(documents), documents

    def train_batch(self, generator: torch.Generator):
        """Rows of packed documents with log-uniform lengths in [min_document, seq_len]: the short
        ones give retrieval a strong gradient early, the long ones train every distance."""
        s = self.setup
        lengths = []
        for _ in range(s.batch):
            row, left = [], s.seq_len
            while left:
                draw = math.exp(float(torch.empty(()).uniform_(math.log(s.min_document), math.log(s.seq_len),
                                                               generator=generator)))
                length = min(left, int(draw))
                if left - length < s.min_document:
                    length = left
                row.append(length)
                left -= length
            lengths.append(row)
        return self.rows(self.train_text, lengths, generator)

    def eval_batches(self):
        """Held-out samples, the same for every plan: (bucket, input_ids, needles) per bucket."""
        s = self.setup
        generator = torch.Generator().manual_seed(10_000)
        per_bucket = max(1, s.eval_samples // len(s.buckets()))
        for lo, hi in s.buckets():
            distances = torch.randint(lo, hi, (per_bucket,), generator=generator).tolist()
            ids, labels, *_ = self.rows(self.val_text, [[s.seq_len]] * per_bucket, generator, distances)
            yield (lo, hi), ids, labels[:, -1]

    def val_windows(self) -> torch.Tensor:
        return self._windows(self.val_text, self.setup.val_windows, torch.Generator().manual_seed(20_000))


def task_loss(model, ids, labels, answer, positions, documents, answer_weight: float) -> torch.Tensor:
    """Mean language-model loss on the text plus ``answer_weight`` x the mean loss at the QUERYs."""
    logits, _ = model(ids, position_ids=positions, document_ids=documents)
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    text = (labels != -100) & ~answer
    return per_token[text].mean() + answer_weight * per_token[answer].mean()


def train(config: ModelConfig, task: NeedleTask, seed: int):
    """Train one plan from ``seed`` (weights and batches); returns the model in eval mode."""
    s = task.setup
    model = build_model(config, "cpu", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, s.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, s.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(s.steps):
        loss = task_loss(model, *task.train_batch(generator), s.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, task: NeedleTask) -> dict:
    """Validation loss on held-out text and retrieval accuracy per distance bucket."""
    windows = task.val_windows()
    _, val_loss = model(windows[:, :-1], labels=windows[:, 1:])
    accuracy = {}
    for bucket, ids, needles in task.eval_batches():
        logits, _ = model(ids, logits_at=torch.full((ids.shape[0], 1), ids.shape[1] - 1))
        accuracy[bucket] = (logits[:, -1].argmax(-1) == needles).float().mean().item()
    return {"val_loss": val_loss.item(), "accuracy": accuracy}


def compare(setup: Setup, seeds: list[int], names: list[str] | None = None, log=print) -> dict:
    """{plan: [result per seed]} with each result as ``evaluate`` returns it plus ``seconds``."""
    task = NeedleTask(setup)
    configs = plans(setup)
    results = {name: [] for name in (names or configs)}
    for seed in seeds:
        for name in results:
            start = time.perf_counter()
            result = evaluate(train(configs[name], task, seed), task)
            result["seconds"] = time.perf_counter() - start
            results[name].append(result)
            log(f"  seed {seed} {name:16s} val loss {result['val_loss']:.4f}  accuracy by bucket "
                + " ".join(f"{a:.2f}" for a in result["accuracy"].values()) + f"  ({result['seconds']:.0f} s)")
    return results


def beyond(result: dict, setup: Setup) -> float:
    """Mean accuracy over the buckets that lie wholly beyond the control's reach."""
    values = [a for (lo, _), a in result["accuracy"].items() if lo > setup.reach]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seq-len", type=int, default=Setup.seq_len)
    parser.add_argument("--layers", type=int, default=Setup.n_layers, help="at least 4 (every layer kind)")
    parser.add_argument("--d-model", type=int, default=Setup.d_model)
    parser.add_argument("--window", type=int, default=Setup.window)
    parser.add_argument("--global-every", type=int, help="global token spacing (default: seq_len / 4)")
    parser.add_argument("--plans", nargs="+", choices=["hybrid", "hybrid-no-global", "full", "control"])
    args = parser.parse_args()
    try:
        setup = Setup(steps=args.steps, seq_len=args.seq_len, n_layers=args.layers, d_model=args.d_model,
                      window=args.window,
                      global_every=args.seq_len // 4 if args.global_every is None else args.global_every)
    except ValueError as error:
        parser.error(str(error))
    configs = plans(setup)
    print(f"T={setup.seq_len}, d_model {setup.d_model}, {setup.n_layers} layers, window {setup.window}, "
          f"global every {setup.global_every}, {setup.steps} steps x {setup.batch} samples, "
          f"{setup.values} needle values (chance {1 / setup.values:.2f}), control reach {setup.reach}; "
          f"hybrid plan {configs['hybrid'].attention_layout}; "
          f"{torch.get_num_threads()} threads")
    start = time.perf_counter()
    results = compare(setup, args.seeds, args.plans)
    buckets = setup.buckets()
    print()
    print(f"{'plan':16s} {'val loss':>9s} " + " ".join(f"{f'd {lo}-{hi - 1}':>9s}" for lo, hi in buckets)
          + f" {'beyond':>7s}   (medians over seeds {args.seeds})")
    medians = {}
    for name, runs in results.items():
        medians[name] = {"val_loss": statistics.median(r["val_loss"] for r in runs),
                         "beyond": statistics.median(beyond(r, setup) for r in runs)}
        cells = [statistics.median(r["accuracy"][b] for r in runs) for b in buckets]
        print(f"{name:16s} {medians[name]['val_loss']:9.4f} " + " ".join(f"{c:9.2f}" for c in cells)
              + f" {medians[name]['beyond']:7.2f}")
    if "full" in medians:
        for name in (name for name in medians if name != "full"):
            ratio = medians[name]["val_loss"] / medians["full"]["val_loss"]
            gap = 100 * (medians[name]["beyond"] - medians["full"]["beyond"])
            paired = " ".join(f"{r['val_loss'] / f['val_loss']:.4f}"
                              for r, f in zip(results[name], results["full"], strict=True))
            print(f"{name} vs full: val loss x{ratio:.4f} (per seed: {paired}), accuracy beyond reach "
                  f"{gap:+.0f} points")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
