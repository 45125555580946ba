"""A small benchmarks/quality_vs_full.py: the hybrid plan retrieves beyond the control's reach, the control cannot.

T=128, window 8 (the control sees at most 28 tokens back), 300 steps of d_model 64, seed 1: the
hybrid's full layer learns the needle beyond the control's reach, while the all-sliding control
stays near chance (1/16) there, though it retrieves inside one window; so the task can fail.
The needle task's batches are checked on their own first: the labels of each packed document are
its next tokens, its QUERY's label is its needle, and no document leaks into another.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality_vs_full import NeedleTask, Setup, beyond, compare
from longctx_megatron.data.tokenizers import ByteTokenizer

SMALL = Setup(seq_len=128, d_model=64, window=8, global_every=32, steps=300, eval_samples=128, val_windows=16)


def test_packed_needle_rows_hold_one_answer_per_document():
    setup = Setup(seq_len=128, window=8, global_every=32)
    task = NeedleTask(setup)
    ids, labels, answer, positions, documents = task.train_batch(torch.Generator().manual_seed(0))
    values = range(ByteTokenizer.vocab_size, setup.query_id)
    for row in range(setup.batch):
        for document in documents[row].unique().tolist():
            where = (documents[row] == document).nonzero().flatten()
            first, last = int(where[0]), int(where[-1])
            assert positions[row, first:last + 1].tolist() == list(range(last - first + 1))
            assert ids[row, last] == setup.query_id and answer[row, last]
            needles = [i for i in range(first, last) if int(ids[row, i]) in values]
            assert len(needles) == 1 and labels[row, last] == ids[row, needles[0]]
            assert answer[row, first:last].sum() == 0
            text = [i for i in range(first, last) if labels[row, i] != -100]
            assert all(labels[row, i] == ids[row, i + 1] for i in text)  # next token, inside the document
            assert labels[row, needles[0] - 1] == -100 or needles[0] == first  # neither the needle nor the QUERY
            assert labels[row, last - 1] == -100 or last == first  # is a next-token target


@pytest.mark.slow
def test_the_hybrid_retrieves_beyond_the_controls_reach_and_the_control_cannot():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one trajectory whatever the machine's core count
    try:
        results = compare(SMALL, [1], ["hybrid", "control"], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    [hybrid], [control] = results["hybrid"], results["control"]
    assert SMALL.reach == 28 and all(lo > SMALL.reach for lo, _ in list(hybrid["accuracy"])[2:])
    assert beyond(hybrid, SMALL) >= 0.9, hybrid
    assert beyond(control, SMALL) <= 0.3, control
    assert list(control["accuracy"].values())[0] >= 0.9  # inside one window the control does retrieve
