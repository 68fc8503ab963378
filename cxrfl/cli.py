"""`cxrfl`: the one command-line entry point."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

from cxrfl import __version__
from cxrfl.commands import bench, central, data, demo, export, poc, predict, report, sim, study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrfl",
        description="Federated chest X-ray lung segmentation and pathology classification "
        "(NVFlare + PyTorch Lightning + MONAI). Run `cxrfl COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"cxrfl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data.add_parser(sub)
    central.add_parser(sub)
    sim.add_parser(sub)
    export.add_parser(sub)
    poc.add_parser(sub)
    demo.add_parser(sub)
    predict.add_parser(sub)
    report.add_parser(sub)
    study.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench/ sits above cxrfl (it measures it): run as its own program, options and all
        return subprocess.call([sys.executable, "-m", "bench", *argv[1:]])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
