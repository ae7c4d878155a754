"""User-facing errors: one clear line, no traceback, exit code 2."""

import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad params, bad input file, missing credentials).

    The message must name the file or key and say what was expected.
    """


def describe(err: Exception) -> str:
    """An exception in one line for a report: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def main_guard(fn):
    """Wrap a stage's main(): a UserError prints `error: <message>` and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
