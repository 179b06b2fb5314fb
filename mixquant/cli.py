"""`mixquant` command line: each subsystem registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import sys

# module path -> function that adds that module's subcommands to the parser
SUBCOMMAND_MODULES = [
    "mixquant.entrypoints.generate",
    "mixquant.quantization.cli",
    "mixquant.server.cli",
    "mixquant.eval.cli",
    "mixquant.bench.cli",
    "mixquant.fidelity.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixquant", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that subsystem is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mixquant import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
