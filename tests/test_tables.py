"""The one mean ± sd cell of the demo's and the study's seed tables (cxrfl/tables.py)."""

from __future__ import annotations

import statistics

from cxrfl.tables import mean_sd, mean_sd_cell


def test_mean_sd_counts_numbers_only_and_says_none_without_any():
    assert mean_sd([0.5, None, 0.7, "n/a"]) == (statistics.fmean([0.5, 0.7]), statistics.stdev([0.5, 0.7]), 2)
    assert mean_sd([0.25]) == (0.25, 0.0, 1)
    assert mean_sd([None, ""]) is None


def test_the_demo_style_cell_has_fixed_digits():
    assert mean_sd_cell([0.5, 0.7]) == "0.6000 ± 0.1414 (n=2)"
    assert mean_sd_cell([118.0, 130.0], 0) == "124 ± 8 (n=2)"
    assert mean_sd_cell([0.5, None]) == "0.5000 ± 0.0000 (n=1)"  # a missing value is left out, unsaid
    assert mean_sd_cell([None, None]) == "n/a"


def test_the_study_style_cell_picks_digits_by_size_and_counts_what_is_missing():
    assert mean_sd_cell([0.5, 0.7], digits=None, count_missing=True) == "0.6000 ± 0.1414 (n=2)"
    assert mean_sd_cell([118.0, 130.0], digits=None, count_missing=True) == "124.0 ± 8.5 (n=2)"
    assert mean_sd_cell([0.5, None, 0.7], digits=None, count_missing=True) == "0.6000 ± 0.1414 (n=2, 1 n/a)"
    assert mean_sd_cell([None, ""], digits=None, count_missing=True) == "n/a"
