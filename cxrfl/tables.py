"""Numbers over training seeds as the demo's and the study's tables print them."""

from __future__ import annotations

import statistics


def mean_sd(values: list) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one number) and count of the numbers among `values`;
    None when there are none."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    if not numbers:
        return None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else 0.0), len(numbers)


def mean_sd_cell(values: list, digits: int | None = 4, count_missing: bool = False) -> str:
    """`mean ± sd (n=N)` of the numbers among `values`, "n/a" without any. digits None: 4 below 10,
    1 from 10 up; count_missing: also say how many values were not numbers (`, K n/a`)."""
    found = mean_sd(values)
    if found is None:
        return "n/a"
    mean, spread, n = found
    if digits is None:
        digits = 4 if abs(mean) < 10 else 1
    missing = f", {len(values) - n} n/a" if count_missing and n < len(values) else ""
    return f"{mean:.{digits}f} ± {spread:.{digits}f} (n={n}{missing})"
