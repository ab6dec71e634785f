"""One way for every command-line tool to end: a message on stderr and a meaningful exit status.

    if __name__ == "__main__":
        sys.exit(run_cli(main))

``main(argv)`` raises on anything that goes wrong; ``run_cli`` turns the expected errors into one
line on stderr (no traceback) and an exit status a script can branch on:

- 0: done;
- 1: the run failed (``RunFailed``, ``RuntimeError``, an ``OSError`` such as a full disk);
- 2: bad usage or input (``UsageError``, ``ValueError`` and its subclasses such as a data set or
  checkpoint error, a missing file, argparse's own usage errors);
- 130: interrupted with Ctrl-C.

Anything else is a bug and keeps its traceback. Set ``DINO_CLI_TRACEBACK=1`` to see the traceback
of an expected error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """The command line or its input cannot work; the message says what to change."""


class RunFailed(RuntimeError):
    """The input was fine but the run did not succeed; the message says what happened."""


# Missing or wrong kind of path: the user named something that is not there.
_BAD_PATHS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _prog(main: Callable[..., Any]) -> str:
    module = getattr(main, "__module__", "") or ""
    if module in ("", "__main__"):
        return os.path.basename(sys.argv[0]) or "command"
    return f"python -m {module}"


def exit_status(exc: BaseException) -> int | None:
    """The exit status for an expected error, ``None`` for one that should keep its traceback."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (ValueError, *_BAD_PATHS)):
        return EXIT_USAGE
    if isinstance(exc, (RuntimeError, OSError)):
        return EXIT_FAILED
    return None


def run_cli(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
) -> int:
    """Call ``main(argv)`` and return its exit status (its own int result, else 0)."""
    try:
        result = main(argv)
    except SystemExit as exc:  # argparse (2 after printing usage) or a tool's own exit
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        print(f"{prog or _prog(main)}: error: {exc.code}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as exc:
        status = exit_status(exc)
        if status is None or os.environ.get("DINO_CLI_TRACEBACK"):
            raise
        what = "interrupted" if status == EXIT_INTERRUPTED else f"error: {exc}"
        print(f"{prog or _prog(main)}: {what}", file=sys.stderr, flush=True)
        return status
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help when it has a real default and the help does
    not already say it (argparse's own formatter also prints ``None`` and ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        if unset or "default" in text.lower():
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text
