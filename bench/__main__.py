"""`python -m bench [--quick]` (also `cxrfl bench`): what federation, HE and the training loop cost
over plain training, as ratios measured side by side in one run; writes
bench/results/<date>.json and .md (case, measured, target, pass/fail).

    python -m bench                 # the sizes the targets are meant for (~2¼ h on 2 CPU cores)
    python -m bench --quick         # a smoke run at toy sizes (the numbers mean nothing)
    python -m bench --cases loop,he # some cases only
    python -m bench --cases attribution  # the heat-map sanity checks alone (~1.5 min)
    python -m bench --cases quality # FL ÷ central per task over 3 seeds of `cxrfl demo` (~55 min)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.cases import CASES, FULL, QUICK, run_case

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": memory_gib, "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# cxr-fl benchmark, {results['date']}{' (quick: toy sizes)' if results['quick'] else ''}", "",
             f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}, "
             f"torch {m['torch']}. Medians of {results['reps']} repetitions per side.", "",
             "| case | measured | target | pass | setup / detail |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        measured = "—" if r["measured"] is None else f"{r['measured']:g}{(' ' + r['unit']) if r['unit'] else ''}"
        verdict = {True: "pass", False: "FAIL", None: "reported"}[r["pass"]]
        detail = r["detail"].get("error") or r["detail"].get("setup") or ""
        numbers = ", ".join(f"{k} {v}" for k, v in r["detail"].items() if isinstance(v, (int, float)))
        lines.append(f"| {r['case']} | {measured} | {r['target']} | {verdict} | {'; '.join(filter(None, [detail, numbers]))} |")
    return "\n".join(lines) + "\n"


def _earlier_rows(path: Path, cases: list[str]) -> list[dict]:
    """Rows of an earlier run of the same day for the cases not run now (so `--cases loop`
    updates the day's table instead of replacing it)."""
    if not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if earlier.get("machine", {}).get("cpus") != os.cpu_count():
        return []  # another machine's numbers do not belong in this table
    return [r for r in earlier.get("rows", []) if r.get("group") in CASES and r.get("group") not in cases]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxrfl bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 repetitions: checks the bench runs")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per comparison (default 3; quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <date>.json and <date>.md")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep every case's runs and logs in a new folder under this one (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--attribution-model", default=None, help="attribution case: the classifier (default cnn5)")
    parser.add_argument("--attribution-size", type=int, default=None, help="attribution case: image side (default 64)")
    parser.add_argument("--attribution-epochs", type=int, default=None, help="attribution case: training epochs")
    parser.add_argument("--attribution-test", type=int, default=None, help="attribution case: test images")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"--cases: unknown {unknown or 'none given'}; choose from {', '.join(CASES)}")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be >= 1")
    scale = QUICK if args.quick else FULL
    if args.reps:
        scale = replace(scale, reps=args.reps)
    for field in ("attribution_model", "attribution_size", "attribution_epochs", "attribution_test"):
        if getattr(args, field) is not None:
            scale = replace(scale, **{field: getattr(args, field)})
    start = time.time()
    rows = []
    if args.work:  # kept: the runs' logs are what explains a number
        args.work.mkdir(parents=True, exist_ok=True)
        scratch = contextlib.nullcontext(tempfile.mkdtemp(prefix="cxrfl-bench-", dir=args.work))
    else:
        scratch = tempfile.TemporaryDirectory(prefix="cxrfl-bench-")
    with scratch as work:
        if args.work:
            print(f"[bench] runs and logs kept in {work}", flush=True)
        for name in cases:
            print(f"[bench] {name} ...", flush=True)
            case_rows = [dict(r, group=name) for r in run_case(name, scale, Path(work))]
            for r in case_rows:
                print(f"[bench]   {r['case']}: {r['measured']} {r['unit']} (target {r['target']}) "
                      f"{r['detail'].get('error', '')}", flush=True)
            rows += case_rows
    date = dt.date.today().isoformat()
    stem = f"{date}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = round(time.time() - start, 1)
    for r in rows:  # a case's own table (the quality case's seeded demo summary) goes beside the bench's
        if "summary_md" in r["detail"]:
            _atomic_write(args.out / f"{stem}-{r['group']}.md", r["detail"]["summary_md"] + "\n")
            r["detail"]["summary_md"] = f"{stem}-{r['group']}.md"
    earlier = _earlier_rows(args.out / f"{stem}.json", cases)  # the same day's other cases are kept
    order = list(CASES)
    results = {"date": date, "quick": args.quick, "reps": scale.reps, "machine": machine(), "seconds": seconds,
               "rows": sorted(earlier + rows, key=lambda r: order.index(r["group"]))}
    _atomic_write(args.out / f"{stem}.json", json.dumps(results, indent=2))
    _atomic_write(args.out / f"{stem}.md", markdown(results))
    print(markdown(results))
    print(f"-> {args.out / stem}.json / .md")
    return 1 if any("error" in r["detail"] for r in rows) else 0  # a missed target is a result, not an error


if __name__ == "__main__":
    sys.exit(main())
