"""The `fmodel` command line: `generate`, `inspect` and `convert`.

Run it as `fmodel ...` (the console script) or `python -m fmodel ...`:

    fmodel generate --chat --prompt "What is the capital of France?"
    fmodel inspect path/to/model.gguf --json
    fmodel convert model.Q4_1.gguf out/ --dtype bfloat16 --max-shard-size 500MB

Output goes to stdout; logging (quiet by default: warnings only; `-v` info, `-vv` debug) and
progress bars (tqdm, when installed and stderr is a terminal) go to stderr. An error prints one
line on stderr, `fmodel <command>: error: ...`, and never a traceback unless `--traceback` (or
`-vv`) is given.

Exit status:
    0    success.
    1    bad input: fmodel's errors (a checkpoint that cannot be read, a bad option value such
         as `--device banana`, `--dtype int8`, `--max-new-tokens -1`), missing files, an
         unreachable hub, out of memory.
    2    usage error: an unknown option, a missing required argument, a value of the wrong
         type (argparse's convention, as for most Unix commands).
    70   internal error: an exception fmodel did not expect, i.e. a bug in fmodel; the line
         names the exception type (`--traceback` shows where). (70 is EX_SOFTWARE of sysexits.h.)
    130  interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import torch

from ..errors import FModelError
from . import _convert, _generate, _inspect
from ._load import CLIError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2  # argparse's own status for usage errors
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): a bug in fmodel
EXIT_INTERRUPTED = 130

_EPILOG = """exit status:
  0    success
  1    bad input (a checkpoint that cannot be read, a bad option value, a missing file,
       an unreachable hub, out of memory): one line on stderr
  2    usage error (unknown option, missing argument, wrong value type)
  70   internal error: a bug in fmodel (the line names the exception; --traceback shows it)
  130  interrupted (Ctrl-C)
"""

logger = logging.getLogger("fmodel")

# Errors that are the user's input, not fmodel's bugs: one line, no traceback.
# (MemoryError and torch's OutOfMemoryError: the model or the request does not fit this machine.)
_USER_ERRORS = (FModelError, OSError, ValueError, ImportError, MemoryError, torch.OutOfMemoryError)
_LOGGERS = ("fmodel", "huggingface_hub")


def _common_options(default: object) -> argparse.ArgumentParser:
    """-v/-q/--traceback, accepted before and after the command name (`default` is
    argparse.SUPPRESS for the copy on each command, so it does not reset the top level's)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default if default is argparse.SUPPRESS else 0,
        help="more logging on stderr: -v info (timings), -vv debug (and tracebacks)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="errors only: no warnings, no progress bars",
    )
    p.add_argument(
        "--traceback",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="show the full traceback of an error",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `fmodel` command."""
    parser = argparse.ArgumentParser(
        prog="fmodel",
        description="fmodel: generate text with, inspect and convert Hugging Face and GGUF checkpoints.",
        parents=[_common_options(None)],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fmodel {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = [_common_options(argparse.SUPPRESS)]
    for module in (_generate, _inspect, _convert):
        module.add_parser(commands, parents)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and not isinstance(exc, FModelError) and exc.args:
        text = str(exc.args[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def _may_use_hub(args: argparse.Namespace) -> bool:
    """Whether the command's MODEL / SRC may be a hub repo id: given, and no local path."""
    where = getattr(args, "model", None) or getattr(args, "src", None)
    return isinstance(where, str) and not os.path.exists(where)


def _configure_logging(verbose: int, quiet: bool, hub: bool = True) -> tuple[logging.Handler, dict[str, int]]:
    level = logging.ERROR if quiet else logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fmodel: %(message)s"))
    previous = {name: logging.getLogger(name).level for name in _LOGGERS}
    logger.addHandler(handler)
    logger.setLevel(level)
    # huggingface_hub's retry chatter (offline, no network) only with -v. Imported first: its
    # logging module sets the level when it is imported. Only when the command may reach the
    # hub (or it is loaded already): importing huggingface_hub takes ~0.2 s, a tenth of the
    # demo's startup, and a local path or the packaged default model never touches it.
    if hub or "huggingface_hub" in sys.modules:
        import huggingface_hub.utils.logging  # noqa: F401

    logging.getLogger("huggingface_hub").setLevel(max(level, logging.ERROR) if verbose == 0 else level)
    return handler, previous


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fmodel` command with `argv` (default `sys.argv[1:]`); returns the exit status.

    Example:
        >>> main(["inspect", "path/to/checkpoint", "--json"])
        0
    """
    args = build_parser().parse_args(argv)  # usage errors: SystemExit(2), argparse's message
    handler, previous = _configure_logging(args.verbose, args.quiet, hub=_may_use_hub(args))
    show_traceback = args.traceback or args.verbose >= 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"fmodel {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
        return EXIT_OK
    except _USER_ERRORS as exc:
        if show_traceback:
            traceback.print_exc(file=sys.stderr)
        print(f"fmodel {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # anything else is fmodel's bug: say so, in one line
        if show_traceback:
            traceback.print_exc(file=sys.stderr)
        hint = "" if show_traceback else "; rerun with --traceback for the details"
        print(
            f"fmodel {args.command}: error: internal error ({type(exc).__module__}.{type(exc).__qualname__}: "
            f"{_one_line(exc)[:300]}); this is a bug in fmodel, please report it{hint}",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        logger.removeHandler(handler)
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
