"""The main job on the synthetic default, federated vs centralized, end to end (`cxrfl demo`)."""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from cxrfl.central import train_central
from cxrfl.fl.config import FLConfig
from cxrfl.interpretability import score_models, segmentation_overlays
from cxrfl.models import load_segmenter
from cxrfl.options import DEFAULT_DATA, DEFAULT_SYNTH, ready, site_names
from cxrfl.runs import new_run_dir
from cxrfl.tables import mean_sd, mean_sd_cell
from cxrfl.fl.simulator import run_simulation
from lightning_modules.config import TrainConfig
from lightning_modules.data.atomic import atomic_write_text, write_json
from lightning_modules.data.manifest import DATASET_JSON
from lightning_modules.data.phantom import generate_dataset

# Sized to finish in about 14 minutes on 2 CPU cores (full) and about 2.5 minutes (--quick, measured 141 s).
# Central training gets the same sample-epochs as FL: rounds x local epochs. The segmentation's
# lr and batch size were chosen on the sites' validation (bench/tune_demo.py, docs/results.md).
PRESETS = {
    "full": {"synth": DEFAULT_SYNTH, "seg_size": 128, "cls_size": 96, "model": "densenet121", "seg_lr": 3e-3,
             "seg_batch_size": 8, "rounds": 5, "local_epochs": 1, "batch_size": 16},
    "quick": {"synth": {"sites": 2, "per_site": 48, "test_size": 30, "size": 64, "seed": 0}, "seg_lr": 3e-3,
              "seg_size": 64, "cls_size": 64, "model": "cnn5", "rounds": 3, "local_epochs": 3, "batch_size": 8},
}


def preset_data_root(preset_name: str, run_dir: Path) -> Path:
    """Where a preset's synthetic data lives: the shared default for the full demo, the run's own folder
    for --quick."""
    return DEFAULT_DATA if preset_name == "full" else run_dir / "data"


def demo_data_root(data: Path | None, preset_name: str, run_dir: Path) -> Path:
    """The given data root, else the preset's synthetic data (generated on first use)."""
    if data is not None:
        return data
    root = preset_data_root(preset_name, run_dir)
    if not (root / DATASET_JSON).is_file():
        print(f"generating synthetic data in {root} ...", flush=True)
        generate_dataset(root, **PRESETS[preset_name]["synth"])
    return root


def run_seeds(name: str, data: Path, seeds: list[int], run_dir: Path, roi_variants: bool = False
              ) -> tuple[str, list[dict]]:
    """The demo once per training seed in run_dir/seed-K/, then the seeded summary; returns its
    table and the per-seed summaries."""
    summaries = []
    for s in seeds:
        print(f"\n##### training seed {s} ({len(summaries) + 1} of {len(seeds)}) #####", flush=True)
        run_demo(name, data, s, run_dir / f"seed-{s}", roi_variants)
        summaries.append(json.loads((run_dir / f"seed-{s}" / "summary.json").read_text()))
    return write_seeded_summary(summaries, run_dir, name, data), summaries


def run_demo(name: str, data: Path, seed: int, run_dir: Path, roi_variants: bool = False) -> str:
    """One demo at one training seed into run_dir: every step, heat-map scores, summary.md/.json;
    returns the summary table. roi_variants: also the two centralized lung-ROI variants (see demo_steps)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    total = time.time()
    for task, setting, metric, step in demo_steps(PRESETS[name], data, seed, run_dir, roi_variants):
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
        segmentation_overlays(run_dir / "fl-segment", data, run_dir)
    except ValueError as exc:  # e.g. a real data set without test lung masks: no score, the rest stands
        print(f"cxrfl demo: no heat-map scores: {exc}", file=sys.stderr)
    write_json(run_dir / "summary.json", {"preset": name, "data": str(data), "seed": seed, "roi_variants": roi_variants,
                                          "rows": rows,
                                          "fl_over_central": fl_ratios(rows), "interpretability": interpretability,
                                          "total_seconds": round(time.time() - total, 1)})
    atomic_write_text(run_dir / "summary.md", table + "\n")
    return table


def demo_steps(preset: dict, data: Path, seed: int, run_dir: Path, roi_variants: bool = False) -> list:
    """(task, setting, metric, step) per demo run, each step built from one config by dataclasses.replace:
    the federated runs and their centralized baselines with the same sample-epochs (rounds x local epochs);
    with roi_variants, the two centralized lung-ROI variants after them."""
    sites = site_names(Path(data), None)
    common = {"data_root": str(Path(data).absolute()), "seed": seed, "batch_size": preset["batch_size"]}
    fl_base = FLConfig(**common, sites=sites, rounds=preset["rounds"], epochs=preset["local_epochs"])
    central_base = TrainConfig(**common, epochs=preset["rounds"] * preset["local_epochs"])
    segment = {"task": "segment", "image_size": preset["seg_size"], "lr": preset["seg_lr"],
               "batch_size": preset.get("seg_batch_size", preset["batch_size"])}
    classify = {"task": "classify", "image_size": preset["cls_size"], "model": preset["model"]}

    def roi(mode: str = "mask", threshold: float = 0.5) -> dict:  # masks from the federated segmentation, once it ran
        return {**classify, "roi": mode, "roi_threshold": threshold,
                "segmenter": lambda: str(_segmenter(run_dir / "fl-segment"))}

    def now(changes: dict) -> dict:
        return {k: v() if callable(v) else v for k, v in changes.items()}

    def fl(folder: str, **changes):
        return lambda: _fl_step(replace(fl_base, **now(changes)), run_dir / folder)

    def central(folder: str, **changes):
        return lambda: _central_step(replace(central_base, **now(changes)), run_dir / folder)

    steps = [
        ("lung segmentation", "FL", "test_dice", fl("fl-segment", **segment)),
        ("lung segmentation", "central", "test_dice", central("central-segment", **segment)),
        ("classification (full image)", "FL", "test_auroc", fl("fl-classify", **classify)),
        ("classification (full image)", "central", "test_auroc", central("central-classify", **classify)),
        ("classification (lung ROI)", "FL", "test_auroc", fl("fl-roi", **roi())),
        ("classification (lung ROI)", "central", "test_auroc", central("central-roi", **roi())),
    ]
    if roi_variants:  # how the ROI is made: crop to the lungs, and CXR-FL's loose 0.05 mask threshold
        steps += [
            ("classification (lung ROI, crop)", "central", "test_auroc", central("central-roi-crop", **roi("crop"))),
            ("classification (lung ROI, mask at 0.05)", "central", "test_auroc",
             central("central-roi-t0.05", **roi("mask", 0.05))),
        ]
    return steps


def _fl_step(cfg: FLConfig, run_dir: Path) -> tuple[dict, float]:
    summary = run_simulation(ready(cfg), new_run_dir(run_dir, run_dir.name))
    return summary["test"], summary["wall_seconds"]


def _central_step(cfg: TrainConfig, run_dir: Path) -> tuple[dict, float]:
    start = time.time()
    metrics = train_central(ready(cfg), new_run_dir(run_dir, run_dir.name))
    return metrics["test"], time.time() - start


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
        lines.append(f"| {task} | {setting} | {metric} | {mean_sd_cell(values)} | {mean_sd_cell(walls, 0)} |")
    tasks = [t for t in dict.fromkeys(r["task"] for r in summaries[0]["rows"]) if t in summaries[0]["fl_over_central"]]
    ratios = {task: [s["fl_over_central"].get(task) for s in summaries] for task in tasks}  # in the demo's order
    lines += ["", f"| task | FL ÷ central (test), per seed | mean ± sd | target: mean ≥ {QUALITY_TARGET} |",
              "|---|---|---|---|"]
    for task, values in ratios.items():
        found = mean_sd(values)
        verdict = "n/a" if found is None else ("pass" if found[0] >= QUALITY_TARGET else "**below**")
        per_seed = ", ".join("n/a" if v is None else f"{v:.3f}" for v in values)
        lines.append(f"| {task} | {per_seed} | {mean_sd_cell(values)} | {verdict} |")
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
            lines.append(f"| {model} | " + " | ".join(mean_sd_cell(by_key.get(k, [])) for k in HEAT_MAP_SCORES) + " |")
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
    return Path(load_segmenter(fl_run).source)


def format_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    buf.write("| task | setting | held-out test metric | value | wall time (s) |\n|---|---|---|---|---|\n")
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        buf.write(f"| {r['task']} | {r['setting']} | {r['metric']} | {value} | {r['wall_seconds']:.0f} |\n")
    return buf.getvalue().rstrip("\n")
