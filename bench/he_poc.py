"""HE vs plain on a provisioned POC: the same classification job with and without homomorphic
encryption, one after the other on one POC (server + N hospitals on this machine).

Measures per job: time per round (from the server's "Round N started/finished" log lines), bytes
each site sends per round (the FOBS-serialised update, exactly as NVFlare puts it on the wire
before TLS: the model's weights, plain or packed and encrypted with the kit's context), and the
peak RSS (VmHWM) of the server's job process and of the sites' job processes. A watchdog stops the POC if the POC's processes together
pass --memory-limit-gb, so a regression cannot take the machine down.

    python -m bench.he_poc --sites 3 --rounds 3 --image-size 64 --per-site 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import tenseal as ts
import torch
from nvflare.app_opt.he import decomposers

from app_custom.ckks_packing import pack_and_encrypt
from app_custom.global_model import GlobalModel
from bench.common import wire_bytes
from cxrfl.fl.config import FLConfig
from cxrfl.fl.poc import _kill, poc_down, poc_submit, poc_up, poc_wait, workspace_processes
from lightning_modules.data.phantom import generate_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _role(cmdline: str) -> str | None:
    """server / server_job / site / site_job from a POC process command line (None: not NVFlare's)."""
    if "server_train" in cmdline:
        return "server"
    if "runner_process" in cmdline or "server.runner" in cmdline:
        return "server_job"
    if "client_train" in cmdline:
        return "site"
    if "worker_process" in cmdline or "client.worker" in cmdline:
        return "site_job"
    return None


class PocMonitor(threading.Thread):
    """Polls the POC's processes: peak RSS per role (kernel VmHWM), and a memory watchdog."""

    def __init__(self, workspace: Path, limit_gb: float, interval: float = 0.5):
        super().__init__(daemon=True)
        self.workspace = Path(workspace)
        self.limit_kib = int(limit_gb * 2 ** 20)
        self.interval = interval
        self.peaks: dict[str, int] = {}  # role -> KiB
        self.tripped = False
        self._stop = threading.Event()

    def reset(self) -> None:
        self.peaks = {}

    def run(self) -> None:
        while not self._stop.is_set():
            total = 0
            seen = workspace_processes(self.workspace)  # the POC's own processes, never a bystander's
            for pid in seen:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                role = _role(cmd.replace(b"\0", b" ").decode(errors="replace"))
                total += _status_kib(pid, "VmRSS")
                if role:
                    self.peaks[role] = max(self.peaks.get(role, 0), _status_kib(pid, "VmHWM"))
            if total > self.limit_kib:
                self.tripped = True
                _kill(seen, grace=2)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


def round_times(log: Path) -> list[float]:
    """Seconds per round from ScatterAndGather's log lines."""
    started, times = {}, []
    pattern = re.compile(r"^(\S+ \S+) .*Round (\d+) (started|finished)\.")
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if not m:
            continue
        when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m.group(3) == "started":
            started[m.group(2)] = when
        elif m.group(2) in started:
            times.append(when - started[m.group(2)])
    return times


def update_wire_bytes(model: str, he_context_file: Path | None) -> int:
    """Bytes of one site's update on the wire, plain or packed and encrypted."""
    state = GlobalModel(task="classify", model=model).state_dict()
    if he_context_file is None:
        return wire_bytes(dict(state))
    decomposers.register()
    context = ts.context_from(he_context_file.read_bytes())
    packed, _ = pack_and_encrypt({k: v.numpy() for k, v in state.items()}, context, weight=100.0)
    return wire_bytes(packed)


def ckks_seconds(model: str, sites: int, context_dir: Path, reps: int = 3) -> dict:
    """The CKKS work of one round, each step alone on this machine (medians of `reps`): a site's
    weighting + packing + encryption + serialisation of its update, the server's parsing and adding
    of `sites` updates and serialising the sum, a site's decryption of the sum."""
    from app_custom.ckks_packing import CiphertextSum, decrypt_and_unpack

    client = ts.context_from((context_dir / "client_context.tenseal").read_bytes())
    server = ts.context_from((context_dir / "server_context.tenseal").read_bytes())
    state = {k: v.numpy() for k, v in GlobalModel(task="classify", model=model).state_dict().items()}
    times = {"encrypt_s": [], "server_sum_s": [], "decrypt_s": []}
    for _ in range(reps):
        start = time.perf_counter()
        packed, _ = pack_and_encrypt(state, client, weight=100.0)
        times["encrypt_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        total = CiphertextSum(server)
        for _ in range(sites):
            total.add(packed, 100.0)
        summed = total.serialized()
        times["server_sum_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        decrypt_and_unpack(summed, client, 100.0 * sites)
        times["decrypt_s"].append(time.perf_counter() - start)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def run_job(state: dict, cfg, monitor: PocMonitor, run_dir: Path) -> dict:
    monitor.reset()
    start = time.time()
    job_id = poc_submit(state, cfg)
    summary = poc_wait(state, job_id, run_dir, timeout=3600)
    wall = time.time() - start
    times = round_times(next(run_dir.joinpath("download").rglob("log.txt")))
    kit = Path(state["kits"]) / state["sites"][0] / "startup" / "client_context.tenseal"
    return {"he": cfg.he, "job_id": job_id, "wall_s": round(wall, 1), "round_s": [round(t, 1) for t in times],
            "round_s_median": round(statistics.median(times), 1) if times else None,
            "sent_bytes_per_site_per_round": update_wire_bytes(cfg.model, kit if cfg.he else None),
            "peak_rss_mib": {k: round(v / 1024) for k, v in monitor.peaks.items()},
            "test": {k: v for k, v in summary.get("test", {}).items() if k in ("test_auroc", "test_loss")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-site", type=int, default=60, help="synthetic images per site")
    parser.add_argument("--memory-limit-gb", type=float, default=18.0)
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/he_poc-<date>.json)")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"he_poc-{dt.date.today().isoformat()}.json"
    with tempfile.TemporaryDirectory(prefix="cxrfl-bench-he-") as tmp:
        tmp = Path(tmp)
        os.environ["HOME"] = str(tmp / "home")  # nvflare registers the POC's admin kits under ~/.nvflare
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        data = tmp / "data"
        generate_dataset(data, sites=args.sites, per_site=args.per_site, test_size=20, size=args.image_size, seed=0)
        workspace = tmp / "ws"
        monitor = PocMonitor(workspace, args.memory_limit_gb)
        monitor.start()
        results = {"machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available()},
                   "config": vars(args) | {"out": str(out)}, "jobs": []}
        try:
            state = poc_up(workspace, args.sites, data, he=True)  # HE kits; the plain job ignores the contexts
            for he in (False, True):
                cfg = FLConfig(task="classify", data_root=None, sites=state["sites"], rounds=args.rounds,
                               image_size=args.image_size, model=args.model, batch_size=16,
                               classes=["normal", "pneumonia"], cross_site_eval=False, he=he)
                job = run_job(state, cfg, monitor, tmp / f"run-{'he' if he else 'plain'}")
                results["jobs"].append(job)
                print(json.dumps(job), flush=True)
        finally:
            monitor.stop()
            poc_down(workspace, clean=True)
        if monitor.tripped:
            print(f"the POC passed {args.memory_limit_gb} GB and was stopped", file=sys.stderr)
            return 1
    plain, he = results["jobs"]
    results["ratios"] = {
        "round_time_he_over_plain": round(he["round_s_median"] / plain["round_s_median"], 2),
        "bytes_he_over_plain": round(he["sent_bytes_per_site_per_round"] / plain["sent_bytes_per_site_per_round"], 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["ratios"]), f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
