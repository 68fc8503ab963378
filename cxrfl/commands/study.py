"""`cxrfl study`: the grid of federated runs vs a centralized baseline, as one table."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl import heterogeneity_study
from cxrfl.fl.results import SimulationError
from cxrfl.options import positive_int
from cxrfl.study import CONFIGS, StudyError, load_config, run_study


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="3 vs 10 sites, intermittent sites (both approaches) and centralized, in one table",
        description="Run a study grid in the NVFlare simulator (sites, rounds, local epochs, availability "
        "schedules, absent-site approach 1/2) and a centralized baseline on the same data; resumes where it "
        "stopped (finished runs are kept); writes study.csv and study.md: test loss, accuracy, AUROC, wall time, "
        "critical-path time (per round the slowest site + aggregation) and time reduction vs centralized. "
        "`cxrfl report` on the study folder draws the ROC curves of every run.")
    p.add_argument("--config", type=Path, default=None,
                   help="study configuration (default cxrfl/studies/default.yaml; cxrfl/studies/full.yaml for real "
                   "data; cxrfl/studies/heterogeneity.yaml: algorithms x IID / label skew / feature shift x seeds, "
                   "with pooled, local-only, ensemble and fine-tuned baselines)")
    p.add_argument("--full", action="store_true", help="use cxrfl/studies/full.yaml")
    p.add_argument("--out", type=Path, default=None, help="study folder (default runs/study-<name>)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="run the whole grid (and the central baseline) with this many training seeds, from the "
                   "configuration's seed up; the table gives each number's mean ± standard deviation (default 1; "
                   "a heterogeneity study: its `seeds`, 3 unless set, and 95 %% t-intervals)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = args.config or CONFIGS / ("full.yaml" if args.full else "default.yaml")
    try:
        if heterogeneity_study.is_heterogeneity_config(path):
            config = heterogeneity_study.load_config(path)
            out = args.out or Path("runs") / f"study-{config['name']}"
            heterogeneity_study.run_study(config, out, seeds=args.seeds)
        else:
            config = load_config(path)
            out = args.out or Path("runs") / f"study-{config['name']}"
            run_study(config, out, seeds=args.seeds or 1)
    except (StudyError, ValueError, SimulationError) as exc:
        print(f"cxrfl study: {exc}", file=sys.stderr)
        return 2
    print((Path(out) / "study.md").read_text())
    print(f"study folder: {out}")
    return 0
