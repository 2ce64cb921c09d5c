"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a wrong path, an unknown name, a bad image).
The command-line tools print its message on one line and exit with status 2 instead of showing a
traceback; library users catch it like any other exception. Messages name the problem *and* the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match the model being built."""


class DataError(UserError):
    """A data folder, image or annotation file is missing, empty or unreadable."""


def run_cli(main, argv=None) -> int:
    """Run a command-line ``main``; a UserError becomes one line on stderr and exit status 2."""
    import sys

    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a run says what it kept (protozoo.runfolder)
        print(exc.args[0] if exc.args else "interrupted: the last completed epoch is saved; "
              "continue with --resume RUN_DIR", file=sys.stderr)
        return 130
