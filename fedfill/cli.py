"""The `fedfill` command.

Each subcommand is a module of commands/ (the operator's commands, which nothing else
imports), named here as a string and imported only when used, so that `fedfill plan` answers
in a fraction of a second without loading torch or Flower.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fedfill.errors import UsageError

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scenario": ("commands.scenario", "write a scenario file (system + device profiles)"),
    "plan": ("commands.plan", "solve the per-device allocation for a scenario"),
    "price": ("commands.price", "the leader's price of GenMEN's pricing game, and the devices' responses"),
    "fit-learning": ("commands.fit_learning", "measure and fit the learning model delta = alpha D^-beta - gamma"),
    "generator": ("commands.generator", "train, sample from or serve the class-conditional diffusion model"),
    "traces": ("commands.traces", "write device traces: a synthetic fleet, or FedScale's trace files converted"),
    "run": ("commands.run", "run the federated FIMI job on Flower and write its report"),
    "testbed": ("commands.testbed", "build, start, drive, break and remove the multi-container testbed"),
    "compare": ("commands.compare", "run several policies on the same split and tabulate FIMI's Table I"),
    "reproduce": ("commands.reproduce", "FIMI's whole evaluation: Table I, Fig. 4, the ablations and sweeps"),
    "board": ("commands.board", "read this board's profile; write a node bundle for a board"),
    "supernode": ("commands.supernode", "Flower's SuperNode with a warm ClientApp (flower-supernode's arguments)"),
    "superlink": ("commands.superlink", "Flower's SuperLink, its SQLite state waiting for its lock (its arguments)"),
}


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run_command(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
    except BrokenPipeError:
        # `fedfill plan ... | head`: the reader has what it wanted. Exit quietly, with the
        # status of a tool that SIGPIPE ended, and keep the interpreter's own flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _run_command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fedfill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    wanted = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # Import only the module of the subcommand being run; others just show their help line.
        if wanted and wanted[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            modules[name] = module
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(modules.get(args.command), "PASSES_UNKNOWN_ARGS", False):
        parser.parse_args(argv)  # argparse's own message and exit 2
    args.passed = unknown  # a command that wraps another's arguments gets them, in order
    try:
        return int(modules[args.command].run(args) or 0)
    except UsageError as err:
        print(f"fedfill {args.command}: {err}", file=sys.stderr)
        return 2

