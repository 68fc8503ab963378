"""`cxrfl data import FORMAT SRC --out DIR`: a public data set's native layout -> one manifest."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections import Counter

from lightning_modules.data.importers import IMPORTERS, LAYOUTS, import_dataset
from lightning_modules.data.manifest import DATASET_JSON, MANIFEST_NAME, ManifestError

_EPILOG = "formats and their expected native layout (SRC is read in place, never modified):\n" + "\n".join(
    textwrap.fill(LAYOUTS[name], width=100, initial_indent=f"  {name:<11} ", subsequent_indent=" " * 14,
                  break_on_hyphens=False, break_long_words=False)
    for name in IMPORTERS
) + (
    "\n\nwrites OUT/manifest.csv (absolute paths), OUT/dataset.json (classes, source, task_hint) and, where\n"
    "masks must be combined or rasterised, OUT/masks/*.png. Every image and mask is decoded as\n"
    "`cxrfl data check` decodes it: an unusable item (missing, truncated, too large, undecodable, a mask\n"
    "of another size or all zero) is skipped with one line giving the reason `data check` would give;\n"
    "a broken source (missing folder, CSV column, bad JSON) stops with exit code 2.\n\n"
    "examples:\n"
    "  cxrfl data import kermany ~/chest_xray --out imports/kermany\n"
    "  cxrfl data import rsna ~/rsna --out imports/rsna --classes three\n"
    "  cxrfl data import csv ~/my/list.csv --out imports/mine --image-col path --label-col finding"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import",
        help="turn a public data set's native layout into a manifest",
        description="Import a chest X-ray data set from its native folder layout into OUT/manifest.csv "
        "and OUT/dataset.json, ready for `cxrfl data split`.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", metavar="FORMAT", choices=list(IMPORTERS),
                        help=f"data set format, one of: {', '.join(IMPORTERS)} (layouts below)")
    parser.add_argument("src", metavar="SRC",
                        help="the data set's folder as downloaded (for 'csv': the CSV file)")
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="output folder for manifest.csv, dataset.json and created masks "
                        "(must not be inside SRC)")
    parser.add_argument("--classes", metavar="SPEC", default=None,
                        help="rsna: 'three' (default; Normal / No Lung Opacity / Not Normal / Lung Opacity, "
                        "the CXR-FL setting) or 'binary' (normal / pneumonia from Target); "
                        "csv: comma-separated class names fixing their order (default: sorted labels seen)")
    parser.add_argument("--image-col", metavar="NAME", default=None,
                        help="csv: column with image paths (default: image)")
    parser.add_argument("--label-col", metavar="NAME", default=None,
                        help="csv: column with class labels (default: label, if present)")
    parser.add_argument("--mask-col", metavar="NAME", default=None,
                        help="csv: column with lung-mask paths (default: mask, if present)")
    parser.add_argument("--patient-col", metavar="NAME", default=None,
                        help="csv: column grouping images of one patient (default: patient_id if present, "
                        "else the image file name without suffix)")
    parser.add_argument("--split-col", metavar="NAME", default=None,
                        help="csv: column with train/val/test assignments to keep (default: none, all unassigned)")
    parser.add_argument("--root", metavar="DIR", default=None,
                        help="csv: folder that relative paths in the CSV are relative to (default: the CSV's folder)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    options = {
        "image_col": args.image_col,
        "label_col": args.label_col,
        "mask_col": args.mask_col,
        "patient_col": args.patient_col,
        "split_col": args.split_col,
        "root": args.root,
        "classes": args.classes,
    }
    try:
        records = import_dataset(args.format, args.src, args.out, **options)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    skipped = getattr(records, "skipped", [])
    manifest = f"{args.out.rstrip('/') or '/'}/{MANIFEST_NAME}"
    print(f"imported {len(records)} image(s) from {args.format} {args.src} -> {manifest} (+ {DATASET_JSON})")
    counts = Counter(r.label or "(unlabelled)" for r in records)
    for label, n in sorted(counts.items()):
        print(f"  {label}: {n}")
    print(f"  patients: {len({r.patient_id for r in records})}")
    print(f"  masks: {sum(1 for r in records if r.mask)} of {len(records)}")
    test = sum(1 for r in records if r.split == "test")
    if test:
        print(f"  official test split: {test}")
    print(f"  skipped: {len(skipped)}" + (" (reasons logged above)" if skipped else ""))
    print(f"next: cxrfl data split --manifest {manifest} --out DATA --sites N")
    return 0
