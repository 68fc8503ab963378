"""`cxrfl bench`: the benchmark suite in bench/ (what federation, HE and the training loop cost)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    # listed for `cxrfl --help` only: cxrfl.cli.main runs `cxrfl bench ...` as `python -m bench ...`
    subparsers.add_parser(
        "bench", help="measure what federation, HE and the training loop cost (bench/results/<date>.md)",
        description="Runs bench/ (same as `python -m bench`): each comparison side by side in one run, medians "
        "of repetitions, a table of measured ratios against their targets. `cxrfl bench --help` lists its options.")
