"""`cxrfl data synth`: write the synthetic multi-site phantom data set."""

from __future__ import annotations

import sys
import time

from lightning_modules.data.phantom import generate_dataset


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic multi-site chest X-ray phantom data set",
        description="Write one folder per site (images/, masks/, opacity/, manifest.csv with train/val rows) "
        "plus a held-out test/ folder and dataset.json. Sites differ in exposure, contrast, noise, "
        "positioning, field of view and pneumonia prevalence (non-IID). Deterministic for a seed.",
    )
    p.add_argument("--out", required=True, help="output data root (created)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--per-site", type=int, default=200, help="images per site (default 200)")
    p.add_argument("--test-size", type=int, default=None, help="held-out test images (default: --per-site)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each site's patients kept for validation")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.sites < 1 or args.per_site < 2 or args.size < 32 or not 0 <= args.val_fraction < 1:
        print("cxrfl data synth: need --sites >= 1, --per-site >= 2, --size >= 32 and 0 <= --val-fraction < 1",
              file=sys.stderr)
        return 2
    start = time.time()
    info = generate_dataset(args.out, sites=args.sites, per_site=args.per_site, test_size=args.test_size,
                            size=args.size, seed=args.seed, val_fraction=args.val_fraction)
    print(f"wrote {args.out} in {time.time() - start:.1f}s")
    for site, counts in info["counts"].items():
        print(f"  {site:>8}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0
