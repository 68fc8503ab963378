"""The benchmark cases: what federation, HE and the training loop cost over plain training.

Each case runs its comparison side by side in one process run (alternating repetitions, so
machine noise hits both sides) and returns rows of the results table. Sizes come from a
`Scale` (the full one the targets are meant for, or `--quick` for a smoke run).
"""

from __future__ import annotations

import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from bench.common import row, seeded_classifier, synthetic_sites, timed_cxrfl, wire_bytes
from bench.gpu import gpu
from bench.he_poc import round_times
from cxrfl import demo
from cxrfl.models import Classifier, Segmenter
from cxrfl.predict import predict
from lightning_modules.attribution_checks import (fit_classifier, planted_signal_check, planted_signal_data,
                                                  randomisation_check, randomised_copy)
from lightning_modules.classification import CXRClassifier
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.manifest import DATASET_JSON
from lightning_modules.segmentation import LungSegmentation


@dataclass(frozen=True)
class Scale:
    quick: bool = False  # toy models and sizes: checks the bench runs, the numbers mean nothing
    reps: int = 3
    loop_model: str = "densenet121"
    loop_size: int = 64
    loop_images: int = 320  # ~14 s per epoch: the Trainer's fixed set-up is a realistic share of it
    fed_model: str = "densenet121"
    fed_size: int = 128
    fed_train_per_site: int = 300
    fed_rounds: int = 5
    fed_reps: int = 3  # medians of 3 per side, like every case (each side trains ~5 min at full size on 2 CPU cores)
    scaling_sites: tuple = (3, 6, 10)
    scaling_total_train: int = 240
    scaling_rounds: int = 3
    he_size: int = 128
    he_per_site: int = 100
    he_rounds: int = 3
    predict_size: int = 224
    predict_images: int = 24
    attribution_model: str = "cnn5"
    attribution_size: int = 64
    attribution_train: int = 400
    attribution_epochs: int = 12
    attribution_test: int = 200  # ~90 positive images: intervals narrow enough to decide the checks
    quant_model: str = "cnn5"  # 9 simulator runs: CNN5 (the Kermany study's network) keeps them ~1 min each
    quant_size: int = 64
    quant_train_per_site: int = 100
    quant_rounds: int = 5
    quant_seeds: int = 3
    quality_preset: str = "full"  # `cxrfl demo`'s preset: FL vs central of every task, as the demo runs them
    quality_seeds: int = 3


FULL = Scale()
QUICK = Scale(quick=True, reps=2, loop_model="cnn5", loop_size=32, loop_images=32, fed_model="cnn5", fed_size=32,
              fed_train_per_site=16, fed_rounds=2, scaling_sites=(2, 3), scaling_total_train=16, scaling_rounds=2,
              he_size=32, he_per_site=12, he_rounds=2, predict_size=64, predict_images=4,
              attribution_size=32, attribution_train=32, attribution_epochs=1, attribution_test=12,
              quality_preset="quick", quality_seeds=2, quant_model="cnn5", quant_size=32, quant_train_per_site=16,
              quant_rounds=2, quant_seeds=2)


# ---- Lightning loop cost and data pipeline -------------------------------------------------------
def _train_loader(root: Path, size: int, batch: int):
    dm = CXRDataModule(root, task="classify", image_size=size, batch_size=batch, num_workers=0, seed=0)
    dm.setup("fit")
    return dm


def _plain_epoch(dm, model: str, channels_last: bool = False) -> float:
    """One epoch of the module's own training step in a bare PyTorch loop; images/s. channels_last: weights
    and images in NHWC order, as the project's Trainers run them (lightning_modules/accelerate.py)."""
    module = seeded_classifier(dm, model)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    optimizer = module.configure_optimizers()
    module.train()
    seen = 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer warns and does nothing
        for index, batch in enumerate(dm.train_dataloader()):
            if channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            loss = module.training_step(batch, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(batch["label"])
        module.on_train_epoch_end()
    return seen / (time.perf_counter() - start)


def _lightning_epoch(dm, model: str) -> float:
    """The same epoch under a plain Lightning Trainer (set-up included: users pay it); images/s."""
    module = seeded_classifier(dm, model)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    loader = dm.train_dataloader()
    seen = len(loader.dataset) - (len(loader.dataset) % dm.batch_size if loader.drop_last else 0)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return seen / (time.perf_counter() - start)


def _loader_rate(dm) -> float:
    seen = 0
    start = time.perf_counter()
    for batch in dm.train_dataloader():
        seen += len(batch["label"])
    return seen / (time.perf_counter() - start)


def loop_and_pipeline(scale: Scale, work: Path) -> list[dict]:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    root = synthetic_sites(work / "loop-data", 1, scale.loop_images, max(scale.loop_size, 32))
    dm = _train_loader(root, scale.loop_size, 16)
    _plain_epoch(dm, scale.loop_model)  # warm-up: first-touch allocations, oneDNN kernel choice
    plain, lightning, loader, nhwc = [], [], [], []
    for _ in range(scale.reps):  # alternate, so drift hits every side
        plain.append(_plain_epoch(dm, scale.loop_model))
        lightning.append(_lightning_epoch(dm, scale.loop_model))
        loader.append(_loader_rate(dm))
        nhwc.append(_plain_epoch(dm, scale.loop_model, channels_last=True))
    p, lt, ld, cl = (statistics.median(v) for v in (plain, lightning, loader, nhwc))
    setup = f"{scale.loop_model}, {scale.loop_size} px, {dm.num_train_samples} images, batch 16, {torch.get_num_threads()} threads"
    return [
        row("Lightning loop cost: Trainer ÷ plain loop (images/s)", lt / p, "≥ 0.95", lt / p >= 0.95,
            lightning_img_s=round(lt, 1), plain_img_s=round(p, 1), setup=setup),
        row("Data pipeline: DataLoader ÷ model (images/s)", ld / lt, "≥ 3", ld / lt >= 3,
            loader_img_s=round(ld, 1), model_img_s=round(lt, 1), setup=setup + ", cached"),
        # this case trains on the CPU; the project's Trainers use channels-last where it measures faster
        row("Channels-last on CPU: plain loop images/s, NHWC ÷ usual order", cl / p, "> 1", cl / p > 1,
            channels_last_img_s=round(cl, 1), plain_img_s=round(p, 1), setup=setup),
    ]


# ---- Federation overhead -------------------------------------------------------------------------
def federation_overhead(scale: Scale, work: Path) -> list[dict]:
    """`cxrfl sim` (3 sites taking turns, each with all cores) ÷ `cxrfl central` on the union of
    the same training images for the same sample-epochs; both whole commands, test set included."""
    root = synthetic_sites(work / "fed-data", 3, scale.fed_train_per_site, scale.fed_size)
    common = ["--task", "classify", "--data", str(root), "--image-size", str(scale.fed_size),
              "--batch-size", "16", "--model", scale.fed_model, "--seed", "0"]
    central_s, fl_s = [], []
    for rep in range(min(scale.reps, scale.fed_reps)):
        central_s.append(timed_cxrfl(["central", *common, "--epochs", str(scale.fed_rounds),
                                 "--out", str(work / f"central-{rep}")], work / f"central-{rep}.log"))
        fl_s.append(timed_cxrfl(["sim", *common, "--rounds", str(scale.fed_rounds), "--local-epochs", "1",
                            "--no-cross-site-eval", "--take-turns", "--out", str(work / f"sim-{rep}")],
                           work / f"sim-{rep}.log"))
    c, f = statistics.median(central_s), statistics.median(fl_s)
    return [row("Federation overhead: simulator ÷ centralized (wall)", f / c, "≤ 1.05", f / c <= 1.05,
                sim_s=round(f, 1), central_s=round(c, 1),
                setup=f"{scale.fed_model}, {scale.fed_size} px, 3 sites × ~{scale.fed_train_per_site} train images, "
                      f"{scale.fed_rounds} rounds × 1 epoch vs {scale.fed_rounds} epochs, sites take turns, "
                      f"{len(fl_s)} run(s) each")]


# ---- Site scaling --------------------------------------------------------------------------------
class TreeRss(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants (sampled every 0.2 s)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.peak_pss_kib, self._halt = pid, 0, 0, threading.Event()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def run(self) -> None:
        while not self._halt.wait(0.2):
            total = pss = 0
            for pid in self._tree():
                total += self._field(f"/proc/{pid}/status", "VmRSS:")
                # PSS: shared pages (library code, the image cache) divided among the processes mapping them
                pss += self._field(f"/proc/{pid}/smaps_rollup", "Pss:")
            self.peak_kib = max(self.peak_kib, total)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)

    @staticmethod
    def _field(path: str, name: str) -> int:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(name):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _sim_round_seconds(run_dir: Path) -> list[float]:
    return round_times(run_dir / "simulator.log")


def _scaled_sim(work: Path, name: str, sites: int, total_train: int, scale: Scale, one_process: bool = False) -> dict:
    """One simulator run; one_process: `--threads 1` (a single site process at a time, restarted for
    every task) instead of every site's process staying up and taking turns."""
    root = synthetic_sites(work / f"{name}-data", sites, max(2, total_train // sites), 32)
    run_dir = work / name
    log = work / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cxrfl", "sim", "--task", "classify", "--data", str(root),
                                 "--model", "cnn5", "--image-size", "32", "--batch-size", "8",
                                 "--rounds", str(scale.scaling_rounds), "--no-cross-site-eval",
                                 *(["--threads", "1"] if one_process else ["--take-turns"]),
                                 "--out", str(run_dir)], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONWARNINGS="ignore"))
        monitor = TreeRss(proc.pid)
        monitor.start()
        code = proc.wait()
        monitor.stop()
    if code != 0:
        raise RuntimeError(f"cxrfl sim with {sites} sites failed ({code}); see {log}")
    rounds = _sim_round_seconds(run_dir)
    return {"sites": sites, "total_train": total_train, "peak_rss_mib": round(monitor.peak_kib / 1024),
            "peak_pss_mib": round(monitor.peak_pss_kib / 1024),
            "round_s": round(statistics.median(rounds[1:] or rounds), 2)}  # round 0 includes process start-up


def site_scaling(scale: Scale, work: Path) -> list[dict]:
    runs = [_scaled_sim(work, f"scale-{n}", n, scale.scaling_total_train, scale) for n in scale.scaling_sites]
    few, many = runs[0], runs[-1]
    per_site = (many["peak_rss_mib"] - few["peak_rss_mib"]) / (many["sites"] - few["sites"])
    per_site_pss = (many["peak_pss_mib"] - few["peak_pss_mib"]) / (many["sites"] - few["sites"])
    double = _scaled_sim(work, f"scale-{few['sites']}-2x", few["sites"], 2 * scale.scaling_total_train, scale)
    growth = double["round_s"] / few["round_s"]
    # the other way to run many sites on one machine: one site process at a time (NVFlare restarts it per task)
    serial = [_scaled_sim(work, f"scale-{n}-serial", n, scale.scaling_total_train, scale, one_process=True)
              for n in (few["sites"], many["sites"])]
    serial_per_site = (serial[1]["peak_rss_mib"] - serial[0]["peak_rss_mib"]) / (many["sites"] - few["sites"])
    def summary(found: list[dict]) -> str:
        return ("; ".join(f"{r['sites']} sites: {r['peak_rss_mib']} MiB, round {r['round_s']} s" for r in found)
                + f" (cnn5, 32 px, {scale.scaling_total_train} training images in all, {scale.scaling_rounds} rounds)")

    return [
        row("Site scaling: simulator peak RSS per added site", per_site, "≤ 300 MiB", per_site <= 300, "MiB",
            runs=runs, per_site_pss_mib=round(per_site_pss), setup="every site's process up, taking turns: " + summary(runs)),
        row("Site scaling: peak RSS per added site, one site process at a time (--threads 1)", serial_per_site,
            "≤ 300 MiB", serial_per_site <= 300, "MiB", runs=serial, setup="--threads 1: " + summary(serial)),
        row(f"Site scaling: round time, 2× total data ÷ 1× ({few['sites']} sites)", growth, "≤ 2 (linear)",
            growth <= 2.0, runs=[few, double], setup=f"round {few['round_s']} s vs {double['round_s']} s"),
    ]


# ---- Homomorphic encryption (provisioned POC) ---------------------------------------------------
def homomorphic_encryption(scale: Scale, work: Path) -> list[dict]:
    out = work / "he_poc.json"
    args = ["--sites", "3", "--rounds", str(scale.he_rounds), "--image-size", str(scale.he_size),
            "--per-site", str(scale.he_per_site), "--out", str(out)]
    if scale.quick:
        args += ["--model", "cnn5"]
    code = subprocess.call([sys.executable, "-m", "bench.he_poc", *args], stdout=open(work / "he_poc.log", "w"),
                           stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"bench.he_poc failed ({code}); see {work / 'he_poc.log'}")
    result = json.loads(out.read_text())
    plain, he = result["jobs"]
    time_ratio = result["ratios"]["round_time_he_over_plain"]
    bytes_ratio = result["ratios"]["bytes_he_over_plain"]
    server_gib = he["peak_rss_mib"].get("server_job", 0) / 1024
    model = "cnn5" if scale.quick else "densenet121"
    setup = f"{model}, 3 sites, {scale.he_size} px, POC"
    critical = _he_critical_path(scale, work)
    return [
        row("HE time: round with HE ÷ without", time_ratio, "≤ 1.5", time_ratio <= 1.5,
            he_round_s=he["round_s_median"], plain_round_s=plain["round_s_median"], setup=setup),
        row("HE memory: server job peak RSS", server_gib, "≤ 4 GiB", server_gib <= 4, "GiB",
            plain_gib=round(plain["peak_rss_mib"].get("server_job", 0) / 1024, 2), setup=setup),
        row("HE bytes: sent per site per round, HE ÷ without", bytes_ratio, "≤ 8", bytes_ratio <= 8,
            he_mb=round(he["sent_bytes_per_site_per_round"] / 1e6, 1),
            plain_mb=round(plain["sent_bytes_per_site_per_round"] / 1e6, 1), setup=setup),
        critical,
    ]


def _he_critical_path(scale: Scale, work: Path) -> dict:
    """HE round ÷ plain round when each site has its own machine (the study's critical path): the
    slowest site's own round time from `cxrfl sim --take-turns` (each site alone on the machine in
    its turn, plain), plus the round's CKKS work measured alone: one site's encryption, the server's
    sum of every site's update, one site's decryption (sites encrypt and decrypt in parallel)."""
    from bench.he_poc import ckks_seconds
    from cxrfl.fl.he_keys import write_he_contexts

    model = "cnn5" if scale.quick else "densenet121"
    root = synthetic_sites(work / "he-sim-data", 3, round(scale.he_per_site * 0.8), scale.he_size)
    run = work / "he-sim-plain"
    timed_cxrfl(["sim", "--task", "classify", "--data", str(root), "--image-size", str(scale.he_size), "--batch-size", "16",
            "--model", model, "--rounds", str(scale.he_rounds), "--no-cross-site-eval", "--take-turns", "--seed", "0",
            "--out", str(run)], work / "he-sim-plain.log")
    by_round: dict[int, list[float]] = {}
    for line in (run / "models" / "rounds" / "round_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("local_seconds") is not None:
            by_round.setdefault(entry["round"], []).append(entry["local_seconds"])
    # round 0 holds each site's first-batch start-up (oneDNN kernel choice, caching): the later rounds
    site_s = statistics.median(max(v) for r, v in sorted(by_round.items()) if r > 0 or len(by_round) == 1)
    contexts = work / "he-contexts"
    contexts.mkdir(exist_ok=True)
    write_he_contexts(contexts)
    ckks = ckks_seconds(model, 3, contexts, reps=scale.reps)
    ratio = (site_s + sum(ckks.values())) / site_s
    return row("HE time, per-site work uncontended (critical path): round with HE ÷ without", ratio, "≤ 1.3",
               ratio <= 1.3, slowest_site_round_s=round(site_s, 2), **ckks,
               setup=f"{model}, 3 sites × ~{round(scale.he_per_site * 0.8)} train images, {scale.he_size} px: the slowest "
                     "site's own round (simulator, sites take turns) + one site's encryption + the server's sum of 3 "
                     "updates + one site's decryption, each measured alone")


# ---- Compressed updates --------------------------------------------------------------------------
def update_bytes(update: dict, quantization: str | None) -> int:
    """Bytes of one site's update on the wire, through the site's quantizer filter when `quantization` is given."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext

    shareable = DXO(DataKind.WEIGHT_DIFF, {k: v.clone() for k, v in update.items()}).to_shareable()
    if quantization:
        from app_custom.quantization import UpdateQuantizer

        shareable = UpdateQuantizer(quantization).process(shareable, FLContext())
    return wire_bytes(shareable)


def compressed_updates(scale: Scale, work: Path) -> list[dict]:
    """`cxrfl sim --quantize fp16 | 8bit` vs fp32, the same job over the same seeds: bytes of a site's
    round update on the wire and the test AUROC of the final global model."""
    # 100 test images: AUROC steps of 0.0004 instead of 0.01 on 20
    root = synthetic_sites(work / "quant-data", 3, scale.quant_train_per_site, scale.quant_size, test_size=100)
    common = ["--task", "classify", "--data", str(root), "--image-size", str(scale.quant_size), "--batch-size", "16",
              "--model", scale.quant_model, "--rounds", str(scale.quant_rounds), "--no-cross-site-eval", "--take-turns"]
    modes = ("fp32", "fp16", "8bit")
    auroc = {mode: [] for mode in modes}
    for seed in range(scale.quant_seeds):
        for mode in modes:  # alternate within a seed, so machine drift hits every mode
            out = work / f"{mode}-{seed}"
            extra = [] if mode == "fp32" else ["--quantize", mode]
            timed_cxrfl(["sim", *common, "--seed", str(seed), *extra, "--out", str(out)], work / f"{mode}-{seed}.log")
            auroc[mode].append(json.loads((out / "metrics.json").read_text())["test"]["test_auroc"])
    # bytes on the wire do not depend on the values (no compression): one DenseNet121-shaped update,
    # the default classifier's, stands for every round's
    from app_custom.global_model import GlobalModel

    start, moved = (GlobalModel(task="classify", model="densenet121", seed=seed).state_dict() for seed in (0, 1))
    change = {k: v - start[k] if v.is_floating_point() else v for k, v in moved.items()}
    fp32_bytes = update_bytes(change, None)
    spread = max(auroc["fp32"]) - min(auroc["fp32"])
    base = statistics.mean(auroc["fp32"])
    setup = (f"{scale.quant_model}, {scale.quant_size} px, 3 sites × ~{scale.quant_train_per_site} train images, "
             f"{scale.quant_rounds} rounds, seeds 0-{scale.quant_seeds - 1}; fp32 AUROC per seed "
             f"{', '.join(f'{a:.3f}' for a in auroc['fp32'])}")
    rows = []
    for mode, target in (("fp16", 0.5), ("8bit", 0.27)):
        ratio = update_bytes(change, mode) / fp32_bytes
        mean = statistics.mean(auroc[mode])
        rows += [
            row(f"Compressed updates: bytes per site per round, {mode} ÷ fp32", ratio, f"≤ {target}", ratio <= target,
                bytes=update_bytes(change, mode), fp32_bytes=fp32_bytes,
                setup="a DenseNet121 update (7.0 M values, 727 tensors) as NVFlare serialises it (FOBS)"),
            row(f"Compressed updates: test AUROC, {mode} − fp32 (mean over seeds)", mean - base,
                "within the fp32 seeds' range", abs(mean - base) <= spread, fp32_range=round(spread, 4),
                **{f"seed_{i}": round(a, 4) for i, a in enumerate(auroc[mode])}, setup=setup),
        ]
    return rows


# ---- Inference ---------------------------------------------------------------------------------------
def inference(scale: Scale, work: Path) -> list[dict]:
    """`cxrfl predict`'s work (lung mask, lung-ROI DenseNet121, Grad-CAM, PNGs) on synthetic PNGs.
    Weights are untrained: the time does not depend on them."""
    root = synthetic_sites(work / "predict-data", 1, scale.predict_images, 256, test_size=scale.predict_images)
    images = sorted((root / "test").rglob("*.png"))[: scale.predict_images]
    model = "cnn5" if scale.quick else "densenet121"
    torch.manual_seed(0)
    segmenter = Segmenter(LungSegmentation(arch="unet").eval(), scale.predict_size, "untrained")
    clf = Classifier(CXRClassifier(model=model, num_classes=2, class_names=["normal", "pneumonia"]).eval(),
                     ["normal", "pneumonia"], scale.predict_size, roi="mask", segmenter=segmenter)
    rates = []
    for rep in range(scale.reps):
        with redirect_stderr(io.StringIO()):
            summary = predict(clf, images, work / f"predict-{rep}")
        rates.append(summary["images_per_second"])
    rate = statistics.median(rates)
    return [row(f"Inference: cxrfl predict at {scale.predict_size} px (mask + Grad-CAM)", rate, "≥ 2", rate >= 2,
                "images/s", setup=f"{model} lung-ROI + U-Net, {len(images)} images, {torch.get_num_threads()} threads")]


# ---- Attribution sanity checks -----------------------------------------------------------------------
def attribution(scale: Scale, work: Path) -> list[dict]:
    """The heat-map methods through both sanity checks (lightning_modules/attribution_checks.py)
    for a classifier trained on the opacity-only phantom; passing is what publishing a map needs."""
    images, labels, _ = planted_signal_data(scale.attribution_train, scale.attribution_size, seed=0)
    net = fit_classifier(scale.attribution_model, images, labels, epochs=scale.attribution_epochs)
    test, test_labels, opacity = planted_signal_data(scale.attribution_test, scale.attribution_size, seed=1)
    positive = test_labels == 1
    with torch.no_grad():
        accuracy = float((net(test).argmax(1) == test_labels).float().mean())
    setup = (f"{scale.attribution_model} at {scale.attribution_size} px, {scale.attribution_train} training images x "
             f"{scale.attribution_epochs} epochs, {int(positive.sum())} positive test images")
    rows = []
    for method in ("gradcam", "gradient", "occlusion"):
        random = randomisation_check(net, randomised_copy(net), scale.attribution_model, test[positive], method)
        planted = planted_signal_check(net, scale.attribution_model, test[positive], opacity[positive], method)
        rows += [row(f"Attribution {method}: Spearman trained vs randomised maps", random["spearman"],
                     f"< {random['threshold']}", random["pass"], setup=setup, ci_low=random["ci95"][0],
                     ci_high=random["ci95"][1], test_accuracy=round(accuracy, 3)),
                 row(f"Attribution {method}: opacity mass ÷ uniform (planted signal)", planted["ratio_to_uniform"],
                     f"95 % CI low > {planted['threshold']}", planted["pass"], setup=setup, ci_low=planted["ci95"][0],
                     ci_high=planted["ci95"][1], opacity_area_share=planted["opacity_area_share"])]
    return rows


# ---- The demo's wall time -------------------------------------------------------------------------------
DEMO_TARGET_SECONDS = 8 * 60


def demo_wall(scale: Scale, work: Path) -> list[dict]:
    """`cxrfl demo` (its preset, seed 0) as a user runs it, in its own process, the data already generated
    (generating it is timed on its own): the whole command's wall time and each step's."""
    generated = not (demo.preset_data_root(scale.quality_preset, work) / DATASET_JSON).is_file()
    start = time.perf_counter()
    data = demo.demo_data_root(None, scale.quality_preset, work)  # the demo's own data, generated on first use
    generation = round(time.perf_counter() - start, 1) if generated else None
    preset = [] if scale.quality_preset == "full" else ["--quick"]
    wall = timed_cxrfl(["demo", *preset, "--data", str(data.absolute()), "--out", str(work / "demo")], work / "demo.log")
    summary = json.loads((work / "demo" / "summary.json").read_text())
    steps = {f"{r['task']}, {r['setting']}": r["wall_seconds"] for r in summary["rows"]}
    return [row(f"`cxrfl demo` wall (preset {scale.quality_preset}, seed 0, data already generated)", wall,
                f"≤ {DEMO_TARGET_SECONDS} s", wall <= DEMO_TARGET_SECONDS, unit="s", steps_s=steps,
                steps_total_s=round(sum(steps.values()), 1), data_generation_s=generation,
                fl_over_central=summary["fl_over_central"])]


# ---- Federated quality --------------------------------------------------------------------------------
def quality(scale: Scale, work: Path) -> list[dict]:
    """`cxrfl demo --seeds N --roi-variants` (its preset, data and settings): per task, the federated model's
    test metric over its centralized counterpart's, mean over the training seeds, against the target; the
    ROI variants' heat-map scores are docs/results.md's."""
    data = demo.demo_data_root(None, scale.quality_preset, work)
    table, summaries = demo.run_seeds(scale.quality_preset, data, list(range(scale.quality_seeds)), work,
                                      roi_variants=True)
    stored = json.loads((work / "summary.json").read_text())["fl_over_central"]
    ratios = {task: stored[task] for task in dict.fromkeys(r["task"] for r in summaries[0]["rows"]) if task in stored}
    setup = f"`cxrfl demo --roi-variants` preset {scale.quality_preset}, {scale.quality_seeds} training seeds"
    rows = [row(f"Quality: FL ÷ central test metric, {task}", r["mean"], f">= {demo.QUALITY_TARGET} (mean over seeds)",
                None if r["mean"] is None else r["mean"] >= demo.QUALITY_TARGET, setup=setup,
                sd=None if r["sd"] is None else round(r["sd"], 4),
                **{f"seed_{i}": None if v is None else round(v, 4) for i, v in enumerate(r["per_seed"])})
            for task, r in ratios.items()]
    rows[0]["detail"]["summary_md"] = table  # the bench writes it beside its table
    return rows


CASES = {
    "loop": loop_and_pipeline,
    "federation": federation_overhead,
    "scaling": site_scaling,
    "he": homomorphic_encryption,
    "quantize": compressed_updates,
    "inference": inference,
    "attribution": attribution,
    "quality": quality,
    "demo": demo_wall,
    "gpu": gpu,
}


def run_case(name: str, scale: Scale, work: Path) -> list[dict]:
    """A case's rows; a case that fails gives one row saying so (the other cases still run)."""
    case_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    try:
        return CASES[name](scale, case_dir)
    except Exception as exc:  # noqa: BLE001 - a broken case is a result to report, not a crash
        return [row(f"{name}: failed", None, "", False, error=f"{type(exc).__name__}: {exc}")]
