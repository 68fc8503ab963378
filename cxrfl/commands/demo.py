"""`cxrfl demo`: the main job on the synthetic default, federated vs centralized, end to end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cxrfl.demo import demo_data_root, run_demo, run_seeds
from cxrfl.options import DEFAULT_DATA, positive_int, seed
from cxrfl.report import write_report
from cxrfl.run_folder import RunFolder
from cxrfl.runs import RunDirError, new_run_dir
from cxrfl.fl.results import SimulationError
from lightning_modules.data.manifest import ManifestError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job: federated vs centralized segmentation, classification and lung-ROI classification",
        description="On the synthetic multi-site phantom (generated if missing): federated lung segmentation in "
        "the NVFlare simulator, then federated full-image and lung-ROI classification (ROI masks from the "
        "federated segmentation model), a centralized baseline of each (with --roi-variants also two more "
        "lung-ROI variants: crop, and a 0.05 mask threshold), cross-site evaluation, a table of held-out test "
        "metrics and wall times, "
        "heat-map scores (gradient saliency, Grad-CAM, occlusion) inside lungs and opacities (summary.md / "
        "summary.json / interpretability.json) and an HTML report (report/report.html). --seeds N repeats it per "
        "training seed and reports mean ± standard deviation and FL ÷ central per task.",
    )
    p.add_argument("--quick", action="store_true", help="a ~2.5 minute version (2 small sites, 64 px, CNN5)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"data root to use instead of the synthetic default ({DEFAULT_DATA})")
    p.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                   help="run folder (default: a new timestamped folder under runs/)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (the first one with --seeds)")
    p.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                   help="run the whole demo N times with training seeds seed, seed+1, ... (in seed-K/ folders) and "
                        "report each number as mean ± standard deviation, FL ÷ central per task (default 1)")
    p.add_argument("--roi-variants", action="store_true",
                   help="also train two centralized lung-ROI variants (crop to the lungs; CXR-FL's 0.05 mask "
                        "threshold) and score where they look: two more runs, about a quarter more time")
    p.set_defaults(func=run)


def run(args) -> int:
    name = "quick" if args.quick else "full"
    try:
        run_dir = new_run_dir(args.out, "demo")
        data = demo_data_root(args.data, name, run_dir)
    except (RunDirError, ManifestError) as exc:
        print(f"cxrfl demo: {exc}", file=sys.stderr)
        return 2
    start = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    RunFolder.create(run_dir, "demo", settings={"preset": name, "data": str(data), "seeds": seeds,
                                                "roi_variants": args.roi_variants})
    try:
        if len(seeds) == 1:
            table = run_demo(name, data, seeds[0], run_dir, args.roi_variants)
        else:
            table, _ = run_seeds(name, data, seeds, run_dir, args.roi_variants)
    except (ValueError, ManifestError, SimulationError, RunDirError) as exc:
        print(f"cxrfl demo: {exc}", file=sys.stderr)
        return 2
    print("\n" + table)
    print(f"report: {write_report(run_dir)}")
    print(f"\nrun folder: {run_dir}  (total {time.time() - start:.0f} s)")
    return 0
