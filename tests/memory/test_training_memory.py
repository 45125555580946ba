"""The training memory model against measured peaks: within 10% on every cell of the grid, every rank."""

from __future__ import annotations

import pytest

from tests.memory.training_grid import CELLS, measure_cell


@pytest.mark.parametrize("name", list(CELLS))
def test_estimate_within_ten_percent_of_measured_peak(name):
    for pipeline_rank, measured, estimated, where in measure_cell(name):
        error = (estimated - measured) / measured
        assert abs(error) <= 0.10, (f"{name}, pipeline rank {pipeline_rank}: estimated {estimated:,} B ({where}), "
                                    f"measured {measured:,} B ({100 * error:+.1f}%)")
