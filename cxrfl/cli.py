"""`cxrfl`: the one command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys

from cxrfl import __version__

COMMANDS = ("data", "central", "sim", "export", "poc", "submit", "wait", "provision", "site", "demo", "predict", "report", "study", "stats", "audit", "bench")


def build_parser(commands: tuple[str, ...] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of `commands` (each cxrfl/commands/<name>.py). Imported by name, only the ones
    asked for: `cxrfl central ...` then loads no NVFlare module (and starts ~1 s sooner, measured)."""
    parser = argparse.ArgumentParser(
        prog="cxrfl",
        description="Federated chest X-ray lung segmentation and pathology classification "
        "(NVFlare + PyTorch Lightning + MONAI). Run `cxrfl COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"cxrfl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in commands:
        importlib.import_module(f"cxrfl.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench/ sits above cxrfl (it measures it): run as its own program, options and all
        return subprocess.call([sys.executable, "-m", "bench", *argv[1:]])
    asked = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser((asked,) if asked in COMMANDS else COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
