"""What privacy costs in test metrics: the same federated job on the demo data (the synthetic
default, 3 sites) without `--dp`, with `--dp percentile` and `--dp svt` (NVFlare's filters at their
default parameters) and with DP-SGD at epsilon 8 per site, one after another; prints a Markdown table
and writes bench/results/dp_cost-<date>.json. Leakage under each: `cxrfl audit` (docs/privacy.md).

    python -m bench.dp_cost [--rounds 8] [--model densenet121] [--image-size 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

from cxrfl.cli import main as cxrfl

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"none": [], "percentile": ["--dp", "percentile"], "svt": ["--dp", "svt"],
            "dpsgd-eps8": ["--dp", "dpsgd", "--target-epsilon", "8"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=None, help="data root (default: the synthetic default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxrfl-dp-") as tmp:
        for name, extra in VARIANTS.items():
            run = Path(tmp) / name
            argv_ = ["sim", "--task", "classify", "--rounds", str(args.rounds), "--model", args.model,
                     "--image-size", str(args.image_size), "--no-cross-site-eval", "--take-turns",
                     "--out", str(run), *extra] + (["--data", str(args.data)] if args.data else [])
            if cxrfl(argv_) != 0:
                print(f"dp_cost: the {name} run failed; see {run}", file=sys.stderr)
                return 1
            test = json.loads((run / "metrics.json").read_text())["test"]
            rows.append({"dp": name, **{k: round(test[k], 4) for k in ("test_auroc", "test_acc", "test_loss")}})
    out = args.out or RESULTS / f"dp_cost-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print("| --dp | test AUROC | test accuracy | test loss |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dp']} | {r['test_auroc']} | {r['test_acc']} | {r['test_loss']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
