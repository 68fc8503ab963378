"""`cxrfl demo`: the main job on the synthetic default, federated vs centralized, end to end."""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from pathlib import Path

from cxrfl.commands.options import DEFAULT_DATA, DEFAULT_SYNTH, positive_int, seed
from cxrfl.runs import RunDirError, new_run_dir
from cxrfl.simulate import SimulationError
from lightning_modules.data.manifest import DATASET_JSON, ManifestError, atomic_write_text, write_json
from lightning_modules.data.phantom import generate_dataset

# Sized to finish in about 15 minutes on 2 CPU cores (full) and about 3 minutes (--quick).
# Central training gets the same sample-epochs as FL: rounds x local epochs. The segmentation's
# lr and batch size were chosen on the sites' validation (bench/tune_demo.py, docs/results.md).
PRESETS = {
    "full": {"synth": DEFAULT_SYNTH, "seg_size": 128, "cls_size": 96, "model": "densenet121", "seg_lr": 3e-3,
             "seg_batch_size": 8, "rounds": 5, "local_epochs": 1, "batch_size": 16},
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
        "heat-map scores (gradient saliency, Grad-CAM, occlusion) inside lungs and opacities (summary.md / "
        "summary.json / interpretability.json) and an HTML report (report/report.html). --seeds N repeats it per "
        "training seed and reports mean ± standard deviation and FL ÷ central per task.",
    )
    p.add_argument("--quick", action="store_true", help="a ~2 minute version (2 small sites, 64 px, CNN5)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"data root to use instead of the synthetic default ({DEFAULT_DATA})")
    p.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                   help="run folder (default: a new timestamped folder under runs/)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (the first one with --seeds)")
    p.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                   help="run the whole demo N times with training seeds seed, seed+1, ... (in seed-K/ folders) and "
                        "report each number as mean ± standard deviation, FL ÷ central per task (default 1)")
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
    from cxrfl.report import write_report

    name = "quick" if args.quick else "full"
    try:
        run_dir = new_run_dir(args.out, "demo")
        data = _data_root(args, name, run_dir)
    except (RunDirError, ManifestError) as exc:
        print(f"cxrfl demo: {exc}", file=sys.stderr)
        return 2
    start = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    try:
        if len(seeds) == 1:
            table = run_demo(name, data, seeds[0], run_dir)
        else:
            table, _ = run_seeds(name, data, seeds, run_dir)
    except (ValueError, ManifestError, SimulationError, RunDirError) as exc:
        print(f"cxrfl demo: {exc}", file=sys.stderr)
        return 2
    print("\n" + table)
    print(f"report: {write_report(run_dir)}")
    print(f"\nrun folder: {run_dir}  (total {time.time() - start:.0f} s)")
    return 0


def run_seeds(name: str, data: Path, seeds: list[int], run_dir: Path) -> tuple[str, list[dict]]:
    """The demo once per training seed in run_dir/seed-K/, then the seeded summary; returns its
    table and the per-seed summaries."""
    summaries = []
    for s in seeds:
        print(f"\n##### training seed {s} ({len(summaries) + 1} of {len(seeds)}) #####", flush=True)
        run_demo(name, data, s, run_dir / f"seed-{s}")
        summaries.append(json.loads((run_dir / f"seed-{s}" / "summary.json").read_text()))
    return write_seeded_summary(summaries, run_dir, name, data), summaries


def run_demo(name: str, data: Path, seed: int, run_dir: Path) -> str:
    """One demo at one training seed into run_dir: every step, heat-map scores, summary.md/.json;
    returns the summary table."""
    from cxrfl.cli import build_parser
    from cxrfl.commands import central, fl_options
    from cxrfl.interpretability import score_models, segmentation_overlays
    from cxrfl.simulate import run_simulation

    preset = PRESETS[name]
    run_dir.mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    common = ["--data", str(data), "--seed", str(seed), "--batch-size", str(preset["batch_size"])]
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
    seg_extra = ["--lr", str(preset["seg_lr"]), "--batch-size", str(preset.get("seg_batch_size", preset["batch_size"]))]
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
    for task, setting, metric, step in steps:
        print(f"\n=== {task}: {setting} ===", flush=True)
        test, seconds = step()
        rows.append({"task": task, "setting": setting, "metric": metric, "value": test.get(metric),
                     "wall_seconds": round(seconds, 1)})
    print("\n=== where the classifiers look: gradient, Grad-CAM and occlusion on the test set ===", flush=True)
    classifiers = {folder: run_dir / folder for folder in CLASSIFIER_RUNS if (run_dir / folder).is_dir()}
    table = format_table(rows) + "\n\n" + format_ratios(fl_ratios(rows)) + (
        f"\n\nOne training seed ({seed}): a single draw, and federated runs move between seeds; mean ± spread "
        "over seeds: `cxrfl demo --seeds 3` (docs/results.md).")
    interpretability = {}
    try:
        interpretability = score_models(classifiers, data, run_dir)
        table += "\n\n" + format_interpretability(interpretability)
        segmentation_overlays(fl_segment, data, run_dir)
    except ValueError as exc:  # e.g. a real data set without test lung masks: no score, the rest stands
        print(f"cxrfl demo: no heat-map scores: {exc}", file=sys.stderr)
    write_json(run_dir / "summary.json", {"preset": name, "data": str(data), "seed": seed, "rows": rows,
                                          "fl_over_central": fl_ratios(rows), "interpretability": interpretability,
                                          "total_seconds": round(time.time() - total, 1)})
    atomic_write_text(run_dir / "summary.md", table + "\n")
    return table


QUALITY_TARGET = 0.97  # each federated model's test metric over its centralized counterpart's, mean over seeds


def fl_ratios(rows: list[dict]) -> dict[str, float | None]:
    """Per task with both settings: the FL test metric divided by the centralized one."""
    by_task: dict[str, dict[str, float | None]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[r["setting"]] = r["value"]
    return {task: (v["FL"] / v["central"] if v.get("FL") is not None and v.get("central") else None)
            for task, v in by_task.items() if "FL" in v and "central" in v}


def format_ratios(ratios: dict[str, float | None]) -> str:
    lines = [f"| task | FL ÷ central (test) | target ≥ {QUALITY_TARGET} |", "|---|---|---|"]
    for task, ratio in ratios.items():
        verdict = "n/a" if ratio is None else ("pass" if ratio >= QUALITY_TARGET else "**below**")
        lines.append(f"| {task} | {'n/a' if ratio is None else f'{ratio:.4f}'} | {verdict} |")
    return "\n".join(lines)


def mean_sd(values: list) -> tuple[float, float, int] | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    if not numbers:
        return None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else 0.0), len(numbers)


def _mean_sd_cell(values: list, digits: int = 4) -> str:
    found = mean_sd(values)
    return "n/a" if found is None else f"{found[0]:.{digits}f} ± {found[1]:.{digits}f} (n={found[2]})"


HEAT_MAP_SCORES = ("gradient_in_lung_ratio", "in_lung_ratio", "occlusion_in_lung_ratio", "gradient_in_opacity_share")


def write_seeded_summary(summaries: list[dict], run_dir: Path, name: str, data: Path) -> str:
    """summary.md/.json over the seeds: each test metric and wall time as mean ± sample standard
    deviation, FL ÷ central per task (mean ± sd of the per-seed ratios) against the target, and the
    heat-map shares; returns the table."""
    seeds = [s["seed"] for s in summaries]
    keys = [(r["task"], r["setting"], r["metric"]) for r in summaries[0]["rows"]]
    lines = [f"Mean ± sample standard deviation over {len(seeds)} training seeds ({', '.join(map(str, seeds))}); "
             "each seed's own folder (seed-K/) holds its runs and summary.", "",
             "| task | setting | held-out test metric | value | wall time (s) |", "|---|---|---|---|---|"]
    rows = []
    for task, setting, metric in keys:
        found = [r for s in summaries for r in s["rows"] if (r["task"], r["setting"]) == (task, setting)]
        values, walls = [r["value"] for r in found], [r["wall_seconds"] for r in found]
        rows.append({"task": task, "setting": setting, "metric": metric, "values": values, "wall_seconds": walls})
        lines.append(f"| {task} | {setting} | {metric} | {_mean_sd_cell(values)} | {_mean_sd_cell(walls, 0)} |")
    tasks = [t for t in dict.fromkeys(r["task"] for r in summaries[0]["rows"]) if t in summaries[0]["fl_over_central"]]
    ratios = {task: [s["fl_over_central"].get(task) for s in summaries] for task in tasks}  # in the demo's order
    lines += ["", f"| task | FL ÷ central (test), per seed | mean ± sd | target: mean ≥ {QUALITY_TARGET} |",
              "|---|---|---|---|"]
    for task, values in ratios.items():
        found = mean_sd(values)
        verdict = "n/a" if found is None else ("pass" if found[0] >= QUALITY_TARGET else "**below**")
        per_seed = ", ".join("n/a" if v is None else f"{v:.3f}" for v in values)
        lines.append(f"| {task} | {per_seed} | {_mean_sd_cell(values)} | {verdict} |")
    shares = {}
    for s in summaries:
        for model, r in (s.get("interpretability") or {}).items():
            for key in HEAT_MAP_SCORES:
                value = r.get(key)
                shares.setdefault(model, {}).setdefault(key, []).append(
                    value.get("ratio") if isinstance(value, dict) else value)
    if shares:
        lines += ["", "| model | in-lung share ÷ uniform: gradient | Grad-CAM | occlusion | gradient share in opacities |",
                  "|---|---|---|---|---|"]
        for model, by_key in shares.items():
            lines.append(f"| {model} | " + " | ".join(_mean_sd_cell(by_key.get(k, [])) for k in HEAT_MAP_SCORES) + " |")
    table = "\n".join(lines)
    write_json(run_dir / "summary.json", {"preset": name, "data": str(data), "seeds": seeds, "rows": [
        {"task": r["task"], "setting": r["setting"], "metric": r["metric"],
         "value": (mean_sd(r["values"]) or (None,))[0], "wall_seconds": (mean_sd(r["wall_seconds"]) or (0.0,))[0],
         "values": r["values"]} for r in rows],
        "fl_over_central": {task: {"per_seed": v, "mean": (mean_sd(v) or (None,))[0],
                                   "sd": (mean_sd(v) or (None, None))[1]} for task, v in ratios.items()},
        "interpretability": shares})
    atomic_write_text(run_dir / "summary.md", table + "\n")
    return table


CLASSIFIER_RUNS = ("fl-classify", "central-classify", "fl-roi", "central-roi", "central-roi-crop",
                   "central-roi-t0.05")


def format_interpretability(results: dict) -> str:
    lines = ["| model | ROI | in-lung share ÷ uniform [95 % CI over images]: gradient | Grad-CAM | occlusion "
             "| gradient share in opacities | test AUROC |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        roi = f"{r['roi']} @ {r['roi_threshold']:g}" if r["roi"] else "full image"
        cells = [_ratio_cell(r.get("gradient_in_lung_ratio")), _ratio_cell(r.get("in_lung_ratio")),
                 _ratio_cell(r.get("occlusion_in_lung_ratio")), _number(r.get("gradient_in_opacity_share")),
                 _number(r.get("test_auroc"))]
        lines.append(f"| {name} | {roi} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nA uniform map scores 1. Only gradient saliency passes the attribution sanity "
                                "checks (docs/results.md); Grad-CAM and occlusion are shown for comparison.")


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio_cell(score: dict | None) -> str:
    if not score or score.get("ratio") is None:
        return "n/a"
    low, high = score.get("ci95") or [None, None]
    return f"{score['ratio']:.2f} [{_number(low)}, {_number(high)}]"


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
