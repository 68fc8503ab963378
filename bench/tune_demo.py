"""Choose the demo's federated settings on validation only: each candidate runs federated
(`cxrfl sim`) and centralized (`cxrfl central`, epochs = rounds x local epochs) on the demo data,
and is scored by its validation metric: the sites' mean validation of the run's selected global
model (cross-site evaluation) over the centralized run's best validation. Test metrics are
recorded beside them but never used to choose. Writes bench/results/tune_demo-<date>.json/.md.

    python -m bench.tune_demo --task segment                       # the segmentation grid
    python -m bench.tune_demo --task classify --seeds 0 1          # the classification grid, 2 seeds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from cxrfl.cli import main as cxrfl
from cxrfl.fl.evaluation import sites_mean

RESULTS = Path(__file__).resolve().parent / "results"
# (label, image size, rounds, local epochs, extra options shared by both sides, extra options of the sim only)
GRIDS = {
    "segment": [
        ("lr 1e-3, batch 16 (first release)", 128, 5, 1, ["--lr", "1e-3", "--batch-size", "16"], []),
        ("lr 3e-3, batch 16", 128, 5, 1, ["--lr", "3e-3", "--batch-size", "16"], []),
        ("lr 1e-3, batch 8", 128, 5, 1, ["--lr", "1e-3", "--batch-size", "8"], []),
        ("lr 3e-3, batch 8", 128, 5, 1, ["--lr", "3e-3", "--batch-size", "8"], []),
        ("lr 3e-3, batch 16, 8 rounds", 128, 8, 1, ["--lr", "3e-3", "--batch-size", "16"], []),
        ("lr 3e-3, batch 16, 5 rounds x 2 local epochs", 128, 5, 2, ["--lr", "3e-3", "--batch-size", "16"], []),
    ],
    "classify": [
        ("densenet121, lr 1e-3, batch 16 (first release)", 96, 5, 1,
         ["--model", "densenet121", "--batch-size", "16"], []),
        ("densenet121, lr 1e-3, batch 8", 96, 5, 1, ["--model", "densenet121", "--batch-size", "8"], []),
    ],
}
VAL_KEY = {"segment": "val_dice", "classify": "val_auroc"}
TEST_KEY = {"segment": "test_dice", "classify": "test_auroc"}


def fl_validation(run: Path, key: str) -> float | None:
    """The sites' mean validation of the run's selected global model (cross-site evaluation)."""
    metrics = json.loads((run / "metrics.json").read_text())
    matrix = json.loads((run / "cross_site.json").read_text())["matrix"]
    by_site = matrix.get(metrics["selected_model"], {})
    return sites_mean(by_site, key, [site for site in by_site if site != "test"])  # "test": the held-out test set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(GRIDS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", type=Path, default=None, help="data root (default: the synthetic default)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs (kept)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="grid rows to run (indices)")
    args = parser.parse_args(argv)
    data = ["--data", str(args.data)] if args.data else []
    rows = []
    for index, (label, size, rounds, local_epochs, shared, sim_only) in enumerate(GRIDS[args.task]):
        if args.only is not None and index not in args.only:
            continue
        for seed in args.seeds:
            common = ["--task", args.task, "--image-size", str(size), "--seed", str(seed), *data, *shared]
            fl_run, central_run = args.out / f"{args.task}-{index}-seed{seed}-fl", args.out / f"{args.task}-{index}-seed{seed}-central"
            walls = {}
            for name, run, argv_ in (
                ("fl", fl_run, ["sim", *common, "--rounds", str(rounds), "--local-epochs", str(local_epochs), *sim_only]),
                ("central", central_run, ["central", *common, "--epochs", str(rounds * local_epochs)]),
            ):
                if not (run / "metrics.json").is_file():
                    start = time.time()
                    if cxrfl(argv_ + ["--out", str(run)]) != 0:
                        print(f"tune_demo: {label} seed {seed} {name} failed; see {run}", file=sys.stderr)
                        return 1
                    walls[name] = round(time.time() - start, 1)
            fl_val = fl_validation(fl_run, VAL_KEY[args.task])
            central_val = json.loads((central_run / "metrics.json").read_text())["best_val"]
            fl_test = json.loads((fl_run / "metrics.json").read_text())["test"].get(TEST_KEY[args.task])
            central_test = json.loads((central_run / "metrics.json").read_text())["test"].get(TEST_KEY[args.task])
            rows.append({"index": index, "label": label, "seed": seed, "fl_val": fl_val, "central_val": central_val,
                         "val_ratio": fl_val / central_val if fl_val and central_val else None,
                         "fl_test": fl_test, "central_test": central_test, "wall_s": walls})
            print(json.dumps(rows[-1]), flush=True)
    stamp = dt.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"tune_demo-{args.task}-{stamp}.json"
    earlier = json.loads(out.read_text())["rows"] if out.is_file() else []
    keep = [r for r in earlier if (r["index"], r["seed"]) not in {(r2["index"], r2["seed"]) for r2 in rows}]
    rows = sorted(keep + rows, key=lambda r: (r["index"], r["seed"]))
    out.write_text(json.dumps({"task": args.task, "rows": rows}, indent=2))
    lines = [f"| {args.task} candidate | seed | FL val | central val | FL ÷ central (val) | FL test | central test |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['label']} | {r['seed']} | {fmt(r['fl_val'])} | {fmt(r['central_val'])} | "
                     f"{fmt(r['val_ratio'])} | {fmt(r['fl_test'])} | {fmt(r['central_test'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
