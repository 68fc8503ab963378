"""`cxrfl data synth`: write the synthetic multi-site phantom data set."""

from __future__ import annotations

import sys
import time

from lightning_modules.data.phantom import MAX_SITE_SHIFT, check_dials, check_site_test, generate_dataset


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic multi-site chest X-ray phantom data set",
        description="Write one folder per site (images/, masks/, opacity/, manifest.csv with train/val rows, "
        "and test rows with --site-test) "
        "plus a held-out test/ folder and dataset.json. Sites differ in exposure, contrast, noise, "
        "positioning, field of view and pneumonia prevalence (non-IID); --site-shift and --label-alpha "
        "dial the acquisition and the label heterogeneity separately (IID: --site-shift 0 --label-alpha 1000). "
        "Deterministic for a seed.",
    )
    p.add_argument("--out", required=True, help="output data root (created)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--per-site", type=int, default=200, help="images per site (default 200)")
    p.add_argument("--test-size", type=int, default=None, help="held-out test images (default: --per-site)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each site's patients kept for validation")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--site-shift", type=float, default=1.0, metavar="S",
                   help=f"how different the sites' acquisition is, 0..{MAX_SITE_SHIFT:g}: 0 gives every site one "
                   "shared profile (IID acquisition), 1 the default distinct profiles (exposure, contrast, gamma, "
                   "noise, blur, positioning, field of view, side-marker corner); between, each parameter is "
                   "interpolated from the shared profile to the site's own; above 1 the differences are exaggerated "
                   "(default 1)")
    p.add_argument("--label-alpha", type=float, default=None, metavar="A",
                   help="label skew: draw each site's pneumonia prevalence from a Dirichlet over the classes with "
                   "concentration A (0.1: most sites nearly one class; 100 or more: all nearly balanced); every "
                   "site keeps at least one image of each class (default: fixed prevalences 0.25-0.65 across sites)")
    p.add_argument("--site-test", default="0", metavar="N",
                   help="images per site held out as that site's own test split (rows with split=test in its "
                   "manifest: the site's acquisition profile and prevalence, new patients; never trained or "
                   "validated on), besides the shared test/ set (default 0: none)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.sites < 1 or args.per_site < 2 or args.size < 32 or not 0 <= args.val_fraction < 1:
        print("cxrfl data synth: need --sites >= 1, --per-site >= 2, --size >= 32 and 0 <= --val-fraction < 1",
              file=sys.stderr)
        return 2
    try:
        check_dials(args.site_shift, args.label_alpha, names=("--site-shift", "--label-alpha"))
        site_test = _whole_number(args.site_test)
        check_site_test(site_test, name="--site-test")
    except ValueError as exc:
        print(f"cxrfl data synth: {exc}", file=sys.stderr)
        return 2
    start = time.time()
    info = generate_dataset(args.out, sites=args.sites, per_site=args.per_site, test_size=args.test_size,
                            size=args.size, seed=args.seed, val_fraction=args.val_fraction,
                            site_shift=args.site_shift, label_alpha=args.label_alpha, site_test=site_test)
    print(f"wrote {args.out} in {time.time() - start:.1f}s")
    for site, counts in info["counts"].items():
        print(f"  {site:>8}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


def _whole_number(text: str) -> int | str:
    """int(text) when it spells a whole number, else text itself (check_site_test then refuses it
    in one line, where argparse's type=int would print its usage block too)."""
    try:
        return int(text)
    except ValueError:
        return text
