"""tools/evaluate_longctx.py on a TP2 x PP2 checkpoint: one process and TP2 agree, files are written."""

from __future__ import annotations

import json

import evaluate_longctx
import pytest

from tests.distributed import run_on_ranks

GRID = ["--tokenizer-type", "ByteTokenizer", "--lengths", "160", "256", "--depths", "0", "1", "--samples", "2",
        "--tasks", "passkey", "--no-progress"]


def _tool(rank, world_size, argv):
    lines = []
    return evaluate_longctx.main(argv, log=lines.append), lines


@pytest.mark.slow
def test_one_process_and_tp2_score_the_same_grid(checkpoint, tmp_path):
    single, tp2 = str(tmp_path / "single.json"), str(tmp_path / "tp2.json")
    [(code, lines)] = run_on_ranks(_tool, 1, ["--load", checkpoint, *GRID, "--output-json", single,
                                              "--heatmap", str(tmp_path / "map.png")])
    assert code == 0 and any("exact-match accuracy" in line for line in lines)
    codes = run_on_ranks(_tool, 2, ["--load", checkpoint, *GRID, "--output-json", tp2,
                                    "--tensor-model-parallel-size", "2"])
    assert [code for code, _ in codes] == [0, 0] and not codes[1][1]  # only rank 0 prints
    one, two = json.load(open(single)), json.load(open(tp2))
    assert len(one["cases"]) == 8 and len(one["cells"]) == 4
    for a, b in zip(one["cases"], two["cases"], strict=True):
        assert a["exact"] == b["exact"] and a["generated"] == b["generated"]
        assert a["answer_logprob"] == pytest.approx(b["answer_logprob"], rel=1e-4)
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_int8_weights_through_the_tool(checkpoint, tmp_path):
    out = str(tmp_path / "int8.json")
    [(code, lines)] = run_on_ranks(_tool, 1, ["--load", checkpoint, *GRID, "--output-json", out, "--quantize", "int8"])
    assert code == 0 and any("quantized to int8" in line for line in lines)
    assert len(json.load(open(out))["cases"]) == 8


@pytest.mark.parametrize("bad,message", [(["--depths", "1.5"], "--depths"), (["--samples", "0"], "--samples"),
                                         (["--output-json", "/nonexistent/x.json"], "does not exist")])
def test_bad_grids_exit_2_before_loading(bad, message, capsys):
    assert evaluate_longctx.main(["--load", "/nowhere", *GRID, *bad]) == 2
    assert message in capsys.readouterr().err
