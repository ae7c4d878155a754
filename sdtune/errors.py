"""User-facing errors: one clear line, no traceback, exit code 2."""

import errno
import functools
import os
import shutil
import sys


class UserError(Exception):
    """A mistake the user can fix (bad params, bad input file, missing credentials).

    The message must name the file or key and say what was expected.
    """


def describe(err: Exception) -> str:
    """An exception in one line for a report: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


# The machine's errors a user fixes (a full disk, a folder they cannot write): one line, as for
# a UserError. Outputs are written under temporary names, so the ones before are kept.
MACHINE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
           errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
           errno.EROFS: "the file system is read-only"}


def machine_error(err: OSError) -> str | None:
    """`err` in one line when it is one of MACHINE's, else None. shutil.Error (a copy of a folder)
    holds one (source, destination, reason) per file, its reasons as text."""
    if isinstance(err, shutil.Error):
        failed = err.args[0] if err.args and isinstance(err.args[0], list) else []
        found = [(f"{where}: ", code) for _, where, reason in failed for code in MACHINE
                 if os.strerror(code) in str(reason)]
    else:
        found = [(f"{err.filename}: " if err.filename else "", err.errno)] if err.errno in MACHINE else []
    if not found:
        return None
    where, code = found[0]  # a write() names no file
    return f"{where}{os.strerror(code)}; {MACHINE[code]} and run it again (the outputs before are kept)"


def main_guard(fn):
    """Wrap a stage's main(): a UserError, or a full disk or permission error, prints
    `error: <message>` and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:  # shutil.Error is one too
            line = machine_error(err)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
