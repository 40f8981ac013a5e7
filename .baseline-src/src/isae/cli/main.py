"""The ``isae`` console script: one subcommand per stage of the study.

Each subcommand module in ``isae.cli`` has ``add_parser(subparsers)`` that registers
its parser with ``func=run``; ``run(args)`` returns the one-line JSON summary as a dict.
A ``UserError`` becomes one line on stderr and exit code 2, and so do a full disk and a
command-line error. SIGTERM (what Slurm and ``kill`` send first) is handled like Ctrl-C:
the command unwinds, every writer removes its temporary files, and the exit code is 143.
Every ``--help`` shows each option's default (``Parser`` passes its formatter on to the
subcommands' parsers).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import math
import signal
import sys
import threading

import isae
from isae.errors import UserError

COMMANDS = ("extract", "train", "lr-sweep", "eval", "match", "ric", "measure", "chance", "fidelity",
            "export", "import", "browse", "split")
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
    """An ArgumentParser whose help shows defaults and whose errors are one line.
    ``add_subparsers`` builds the subcommands' parsers with the parent's class, so every
    level gets both."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line (no usage block) and exit 2, as for every bad input."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that the same clean-up as for Ctrl-C runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


#: Errors of a full disk or quota: the user's to fix, so one line, not a traceback.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


#: A read-only file system or a folder without write permission: one line too.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _disk_full(e: OSError) -> bool:
    # pyarrow's write errors carry the errno only in their message.
    return e.errno in _DISK_FULL or "No space left on device" in str(e)


def json_safe(obj):
    """The summary with NaN and infinities as null (they are not JSON) and NumPy scalars
    as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):  # NumPy and torch scalars
        return json_safe(obj.item())
    if hasattr(obj, "__float__"):
        return json_safe(float(obj))
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s isae %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from isae import progress

    progress.ENABLED = not args.quiet
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if args.threads is not None:
            from isae.limits import check_threads

            check_threads(args.threads)
            import torch

            torch.set_num_threads(args.threads)
        summary = args.func(args)
    except UserError as e:
        print(f"isae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        if _disk_full(e):
            print(f"isae {args.command}: error: disk full (no space left on device){where}; "
                  "temporary files were removed: free space and run again", file=sys.stderr)
        elif e.errno in _NOT_WRITABLE:
            what = "cannot write" if e.errno == errno.EROFS else "no permission for"
            target = e.filename or "a file"
            print(f"isae {args.command}: error: {what} {target} ({e.strerror}); temporary "
                  "files were removed", file=sys.stderr)
        else:
            raise
        return 2
    except Terminated:
        print(f"isae {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"isae {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps(json_safe(summary), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
