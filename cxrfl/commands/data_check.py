"""`cxrfl data check`: decode every image and mask of a data set and report what is wrong."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_modules.data.check import check_data, format_report
from lightning_modules.data.imageio import DECODE_MEMORY_BUDGET


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="check a data set for bad files, unknown labels and leakage (patients or identical files)",
        description=(
            "Check a data root (site folders + test/), a folder with a manifest.csv, or a manifest.csv. "
            "Every image and mask is decoded. Prints one line per problem (ERROR: the set is unusable, "
            "e.g. leakage: one patient, or byte-identical image files, in two sites or splits or in a site "
            "and the test set; or a site without usable images; WARNING: a file the loader will skip) "
            "and a summary of usable images per site and split (a site's own test split, rows with "
            "split=test in its manifest, is counted as its 'test'). Exit status: 0 usable, 1 unusable "
            "(or, with --strict, any warning)."
        ),
    )
    parser.add_argument("path", type=Path, metavar="DIR",
                        help="data root, folder with a manifest.csv, or a manifest.csv file")
    parser.add_argument("--strict", action="store_true",
                        help="also exit 1 when there are only warnings (files the loader would skip)")
    parser.add_argument("--require-mask", action="store_true",
                        help="report rows without a lung mask (needed for the segmentation task)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="threads used to decode images (default: number of CPUs, at most 8); however "
                        f"many, the decodes running at once stay within {DECODE_MEMORY_BUDGET / 1e9:.1f} GB")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    if args.workers is not None and args.workers < 1:
        print("cxrfl data check: error: --workers must be >= 1", file=sys.stderr)
        return 2
    report = check_data(args.path, workers=args.workers, require_mask=getattr(args, "require_mask", False))
    print(format_report(report))
    if not report.usable:
        return 1
    if getattr(args, "strict", False) and report.warnings:
        return 1
    return 0
