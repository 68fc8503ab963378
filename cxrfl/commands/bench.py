"""`cxrfl bench`: the benchmark suite in bench/ (what federation, HE and the training loop cost)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure what federation, HE and the training loop cost (bench/results/<date>.md)",
        description="Runs bench/ (same as `python -m bench`): each comparison side by side in one run, medians "
        "of repetitions, a table of measured ratios against their targets. `cxrfl bench --help` lists its options.")
    p.set_defaults(func=run)


def run(args) -> int:  # reached only through build_parser(); cxrfl.cli.main hands `bench ...` to bench/ itself
    from bench.__main__ import main

    return main([])
