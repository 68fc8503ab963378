"""`cxrfl demo`: the main job on the synthetic default, federated vs centralized, end to end."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from cxrfl.commands.options import DEFAULT_DATA, DEFAULT_SYNTH, seed
from cxrfl.runs import RunDirError, new_run_dir
from cxrfl.simulate import SimulationError
from lightning_modules.data.manifest import DATASET_JSON, ManifestError, atomic_write_text, write_json
from lightning_modules.data.phantom import generate_dataset

# Sized to finish in about 15 minutes on 2 CPU cores (full) and about 3 minutes (--quick).
# Central training gets the same sample-epochs as FL: rounds x local epochs.
PRESETS = {
    "full": {"synth": DEFAULT_SYNTH, "seg_size": 128, "cls_size": 96, "model": "densenet121", "seg_lr": 1e-3,
             "rounds": 5, "local_epochs": 1, "batch_size": 16},
    "quick": {"synth": {"sites": 2, "per_site": 48, "test_size": 30, "size": 64, "seed": 0}, "seg_lr": 3e-3,
              "seg_size": 64, "cls_size": 64, "model": "cnn5", "rounds": 3, "local_epochs": 3, "batch_size": 8},
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job: federated vs centralized segmentation, classification and lung-ROI classification",
        description="On the synthetic multi-site phantom (generated if missing): federated lung segmentation in "
        "the NVFlare simulator, then federated full-image and lung-ROI classification (ROI masks from the "
        "federated segmentation model), a centralized baseline of each (and of two more lung-ROI variants: crop, "
        "and a 0.05 mask threshold), cross-site evaluation, a table of held-out test metrics and wall times, "
        "Grad-CAM heat-map shares inside lungs and opacities (summary.md / summary.json / interpretability.json) "
        "and an HTML report (report/report.html).",
    )
    p.add_argument("--quick", action="store_true", help="a ~2 minute version (2 small sites, 64 px, CNN5)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"data root to use instead of the synthetic default ({DEFAULT_DATA})")
    p.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                   help="run folder (default: a new timestamped folder under runs/)")
    p.add_argument("--seed", type=seed, default=0, help="random seed")
    p.set_defaults(func=run)


def _data_root(args, preset_name: str, run_dir: Path) -> Path:
    if args.data is not None:
        return args.data
    preset = PRESETS[preset_name]
    root = DEFAULT_DATA if preset_name == "full" else run_dir / "data"
    if not (root / DATASET_JSON).is_file():
        print(f"generating synthetic data in {root} ...", flush=True)
        generate_dataset(root, **preset["synth"])
    return root


def run(args) -> int:
    from cxrfl.cli import build_parser
    from cxrfl.commands import central, fl_options
    from cxrfl.interpretability import score_models, segmentation_overlays
    from cxrfl.report import write_report
    from cxrfl.simulate import run_simulation

    name = "quick" if args.quick else "full"
    preset = PRESETS[name]
    try:
        run_dir = new_run_dir(args.out, "demo")
        data = _data_root(args, name, run_dir)
    except (RunDirError, ManifestError) as exc:
        print(f"cxrfl demo: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    common = ["--data", str(data), "--seed", str(args.seed), "--batch-size", str(preset["batch_size"])]
    rows = []
    fl_segment = run_dir / "fl-segment"

    def fl(task: str, size: int, extra: list[str]):
        argv = ["sim", "--task", task, "--rounds", str(preset["rounds"]), "--local-epochs", str(preset["local_epochs"]),
                "--image-size", str(size),
                "--out", str(run_dir / f"fl-{task}")] + common + extra
        cfg = fl_options.config_from_args(parser.parse_args(argv))
        summary = run_simulation(cfg, run_dir / f"fl-{task}")
        return summary["test"], summary["wall_seconds"]

    def central_run(task: str, size: int, extra: list[str], folder: str):
        epochs = preset["rounds"] * preset["local_epochs"]
        argv = ["central", "--task", task, "--epochs", str(epochs), "--image-size", str(size),
                "--out", str(run_dir / folder)] + common + extra
        args_c = parser.parse_args(argv)
        start = time.time()
        metrics = central.train_central(args_c, data, new_run_dir(args_c.out, folder))
        return metrics["test"], time.time() - start

    cls_extra = ["--model", preset["model"]]
    seg_extra = ["--lr", str(preset["seg_lr"])]
    steps = [
        ("lung segmentation", "FL", "test_dice", lambda: fl("segment", preset["seg_size"], seg_extra)),
        ("lung segmentation", "central", "test_dice", lambda: central_run("segment", preset["seg_size"], seg_extra,
                                                                          "central-segment")),
        ("classification (full image)", "FL", "test_auroc", lambda: fl("classify", preset["cls_size"], cls_extra)),
        ("classification (full image)", "central", "test_auroc",
         lambda: central_run("classify", preset["cls_size"], cls_extra, "central-classify")),
        ("classification (lung ROI)", "FL", "test_auroc",
         lambda: fl("roi", preset["cls_size"], cls_extra + ["--segmenter", str(_segmenter(fl_segment))])),
        ("classification (lung ROI)", "central", "test_auroc",
         lambda: central_run("classify", preset["cls_size"],
                             cls_extra + ["--roi", "mask", "--segmenter", str(_segmenter(fl_segment))],
                             "central-roi")),
        # the ROI variants the report compares: crop to the lungs, and CXR-FL's loose 0.05 mask threshold
        ("classification (lung ROI, crop)", "central", "test_auroc",
         lambda: central_run("classify", preset["cls_size"],
                             cls_extra + ["--roi", "crop", "--segmenter", str(_segmenter(fl_segment))],
                             "central-roi-crop")),
        ("classification (lung ROI, mask at 0.05)", "central", "test_auroc",
         lambda: central_run("classify", preset["cls_size"],
                             cls_extra + ["--roi", "mask", "--roi-threshold", "0.05",
                                          "--segmenter", str(_segmenter(fl_segment))], "central-roi-t0.05")),
    ]
    total = time.time()
    try:
        for task, setting, metric, step in steps:
            print(f"\n=== {task}: {setting} ===", flush=True)
            test, seconds = step()
            rows.append({"task": task, "setting": setting, "metric": metric, "value": test.get(metric),
                         "wall_seconds": round(seconds, 1)})
    except (ValueError, ManifestError, SimulationError, RunDirError) as exc:
        print(f"cxrfl demo: {exc}", file=sys.stderr)
        return 2
    print("\n=== where the classifiers look: Grad-CAM on the test set ===", flush=True)
    classifiers = {folder: run_dir / folder for folder in CLASSIFIER_RUNS if (run_dir / folder).is_dir()}
    table = format_table(rows) + (f"\n\nOne training seed ({args.seed}): a single draw, and federated runs move "
                                  "between seeds; intervals over seeds: `cxrfl study --seeds 3` (README, Reproducibility).")
    try:
        table += "\n\n" + format_interpretability(score_models(classifiers, data, run_dir))
        segmentation_overlays(fl_segment, data, run_dir)
    except ValueError as exc:  # e.g. a real data set without test lung masks: no score, the rest stands
        print(f"cxrfl demo: no Grad-CAM scores: {exc}", file=sys.stderr)
    write_json(run_dir / "summary.json", {"preset": name, "data": str(data), "rows": rows,
                                          "total_seconds": round(time.time() - total, 1)})
    atomic_write_text(run_dir / "summary.md", table + "\n")
    print("\n" + table)
    print(f"report: {write_report(run_dir)}")
    print(f"\nrun folder: {run_dir}  (total {time.time() - total:.0f} s)")
    return 0


CLASSIFIER_RUNS = ("fl-classify", "central-classify", "fl-roi", "central-roi", "central-roi-crop",
                   "central-roi-t0.05")


def format_interpretability(results: dict) -> str:
    lines = ["| model | ROI | heat-map share in lungs | in opacities | lung area (uniform map) | test AUROC |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        roi = f"{r['roi']} @ {r['roi_threshold']:g}" if r["roi"] else "full image"
        cells = [r.get("in_lung_share"), r.get("in_opacity_share"), r.get("lung_area_share"), r.get("test_auroc")]
        lines.append(f"| {name} | {roi} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def _segmenter(fl_run: Path) -> Path:
    """The federated segmentation run's selected model (metrics.json), else its best, else its final."""
    from cxrfl.models import load_segmenter

    return Path(load_segmenter(fl_run).source)


def format_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    buf.write("| task | setting | held-out test metric | value | wall time (s) |\n|---|---|---|---|---|\n")
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        buf.write(f"| {r['task']} | {r['setting']} | {r['metric']} | {value} | {r['wall_seconds']:.0f} |\n")
    return buf.getvalue().rstrip("\n")
