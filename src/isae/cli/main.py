"""The ``isae`` console script: one subcommand per stage of the study.

Each subcommand module in ``isae.cli`` has ``add_parser(subparsers)`` that registers
its parser with ``func=run``; ``run(args)`` returns the one-line JSON summary as a dict.
A ``UserError`` becomes one line on stderr and exit code 2. Every ``--help`` shows each
option's default (``Parser`` passes its formatter on to the subcommands' parsers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

import isae
from isae.errors import UserError

COMMANDS = ("extract", "train", "lr-sweep", "eval", "match", "ric", "measure", "chance", "fidelity",
            "export", "import", "browse")
#: Subcommands whose module is not named after them (``import`` is a Python keyword, a
#: module name has no hyphen).
MODULES = {"import": "import_ckpt", "lr-sweep": "lr_sweep"}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is nothing to show:
    no default (None: the help says what happens), or an on/off flag (off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(
            action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction)
        ):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults. ``add_subparsers`` builds the
    subcommands' parsers with the parent's class, so every level gets the formatter."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="isae", description="Identifiable sparse autoencoders: the study's command line."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {isae.__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch's operations (default: OMP_NUM_THREADS, else "
                             "all cores). A training run's numbers depend on it: fix it to "
                             "reproduce a result bit for bit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        modname = f"isae.cli.{MODULES.get(name, name)}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue  # a stage not installed in this build
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s isae %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UserError("--threads must be at least 1")
            import torch

            torch.set_num_threads(args.threads)
        summary = args.func(args)
    except UserError as e:
        print(f"isae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"isae {args.command}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
