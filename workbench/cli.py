"""The ``workbench`` command.

Each feature area registers its own subcommands from a module in ``workbench/commands/``
exposing ``register(subparsers)``; this file only lists those modules and dispatches. A
subcommand sets ``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from workbench.allocator import retain_freed_memory
from workbench.commands._args import check_args, check_argv, resource_error_message
from workbench.errors import WorkbenchError

#: Modules that add subcommands, in the order they appear in ``workbench --help``.
COMMAND_MODULES: list[str] = [
    "workbench.commands.models",
    "workbench.commands.store",
    "workbench.commands.sae",
    "workbench.commands.train",
    "workbench.commands.analysis",
    "workbench.commands.probe",
    "workbench.commands.transcoders",
    "workbench.commands.graph",
    "workbench.commands.circuit",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Interpretability workbench: models, analyses, activation stores and SAEs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    retain_freed_memory()  # repeated large passes reuse memory instead of page-faulting it in (see there)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_argv(argv)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_args(args)  # one validation layer for every subcommand's values (commands/_args.py)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's job is to turn errors into messages
        if isinstance(exc, WorkbenchError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        message = resource_error_message(exc)
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
