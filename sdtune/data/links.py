"""Which entries of a folder may be read as files: the symlink and special-file check shared by
fetch (copying a local folder) and the image checks (reading data/raw).

Its own module so that the stages reading images depend on this check, not on the archive code.
"""

import errno
import stat
from pathlib import Path


def link_problem(path: Path, root: Path) -> str | None:
    """Why the entry `path` inside the folder `root` must not be read as a file, or None.

    One of "symlink loop", "outside" (a symlink leaving root), "broken symlink",
    "symlink to a folder", "not a regular file" (device, FIFO, socket); a symlink that stays
    inside root and reaches a regular file is fine, and so is a plain folder. Callers word
    the message. OSErrors other than these (permissions) propagate.
    """
    path = Path(path)
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            target = None  # broken; but where it points decides which report
        except RuntimeError:  # Python < 3.13: a loop
            return "symlink loop"
        except OSError as err:
            if err.errno == errno.ELOOP:  # Python >= 3.13
                return "symlink loop"
            raise
        if not (target or path.resolve()).is_relative_to(Path(root).resolve()):
            return "outside"
        if target is None:
            return "broken symlink"
        if target.is_dir():
            return "symlink to a folder"
    mode = path.stat().st_mode  # the target's, for a symlink that stays inside
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not a regular file"
    return None
