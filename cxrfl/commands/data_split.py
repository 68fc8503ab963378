"""`cxrfl data split`: partition one manifest into site folders plus a held-out test set (and,
optionally, a test split of each site's own)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_modules.data.manifest import ManifestError, class_names, read_manifest
from lightning_modules.data.split import MODES, SUMMARY_CSV, SUMMARY_MD, describe, format_summary, split_into_sites, write_data_root


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "split",
        help="partition a manifest into federated sites plus a held-out test set",
        description=(
            "Partition the images of one manifest into site folders (site-1..N, each with a train/val "
            "manifest.csv) and a held-out test/ folder, at patient level: all images of a patient end up "
            "in one site and one split. Records already marked split=test (e.g. an official test set) stay "
            "test and no further test patients are drawn. --site-test-fraction also holds out part of each "
            "site's patients as that site's own test split (split=test rows in its manifest). "
            "Writes dataset.json and split_summary.csv/.md "
            "into --out and prints the summary table."
        ),
    )
    parser.add_argument("--manifest", required=True, type=Path, metavar="FILE",
                        help="manifest.csv to split (columns image, mask, label, patient_id, split, site, ...); "
                        "its relative paths are resolved against its folder")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="data root to write (site-1..N/, test/, dataset.json, split summary)")
    parser.add_argument("--sites", type=int, default=None, metavar="N",
                        help="number of sites; required except in source mode, where 0 or omitted means one "
                        "site per distinct --source-column value")
    parser.add_argument("--mode", choices=MODES, default="iid",
                        help="iid: equal sizes and label mixes; dirichlet: label skew, per class the site "
                        "shares ~ Dirichlet(--alpha); quantity: unequal site sizes (lognormal, "
                        "--quantity-sigma), labels IID; source: one site per value of --source-column (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, metavar="A",
                        help="dirichlet mode: concentration > 0; smaller = stronger label skew (0.1 very skewed, "
                        "100 close to iid; default: %(default)s)")
    parser.add_argument("--quantity-sigma", type=float, default=1.0, metavar="S",
                        help="quantity mode: sigma >= 0 of the lognormal site-size weights; larger = more unequal sizes (default: %(default)s)")
    parser.add_argument("--source-column", default="site", metavar="COL",
                        help="source mode: manifest column whose distinct values become the sites (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                        help="fraction in [0, 1) of each site's patients used for validation (stratified by label; default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.15, metavar="F",
                        help="fraction in [0, 1) of patients held out as the test set (stratified by label); "
                        "ignored when the manifest already has split=test rows (default: %(default)s)")
    parser.add_argument("--site-test-fraction", type=float, default=0.0, metavar="F",
                        help="fraction in [0, 1) of each site's patients held out as that site's own test split "
                        "(rows with split=test in the site's manifest; stratified by label, at least one patient "
                        "of each class the site has two or more of); never trained or validated on, and "
                        "disjoint by patient from the shared test set (default: %(default)s, none)")
    parser.add_argument("--seed", type=int, default=0, metavar="K",
                        help="random seed; the same seed and inputs always give the same split (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    try:
        records = read_manifest(args.manifest)
        source_dir = args.manifest.parent
        classes = class_names(source_dir, records)
        if args.sites is None and args.mode != "source":
            raise ValueError(f"--sites N is required for --mode {args.mode} (the number of sites to create)")
        result = split_into_sites(
            records,
            args.sites,
            mode=args.mode,
            alpha=args.alpha,
            quantity_sigma=args.quantity_sigma,
            source_column=args.source_column,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            classes=classes or None,
            site_test_fraction=args.site_test_fraction,
        )
        rows = write_data_root(result, args.out, classes, source_dir)
    except (ValueError, OSError) as exc:  # ManifestError is a ValueError
        kind = "manifest error" if isinstance(exc, ManifestError) else "error"
        print(f"cxrfl data split: {kind}: {exc}", file=sys.stderr)
        return 2
    print(format_summary(rows, title=describe(result)), end="")
    print(f"\nwrote {len(result.sites)} site(s) and test/ to {args.out} (summary: {args.out / SUMMARY_CSV}, {args.out / SUMMARY_MD})")
    return 0
