"""Command-line entry point: `edsd-hf <command> ...`.

Each feature area owns its sub-commands in its own module, which exposes
`add_subcommands(subparsers)`. A sub-command stores its handler as `func`.
"""

import argparse
import importlib
import sys

from transformers.utils import logging

# Modules that contribute sub-commands, in the order `--help` lists them.
SUBCOMMAND_MODULES = [
    "edsd_hf.demo",
    "edsd_hf.edsd.train_cli",
    "edsd_hf.recipes.cli",
    "edsd_hf.hookmoe.cli",
    "edsd_hf.bench_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edsd-hf",
        description="EDSD speculative-decoding drafts and HookMoE reduced-top-k models for Hugging Face transformers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level instead of WARNING.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subcommands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
