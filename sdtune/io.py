"""Atomic writes and content hashing.

Every output is written to a temporary name next to its destination and renamed into
place last, so an interrupted stage never leaves something that looks finished.
"""

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from sdtune.errors import UserError

CHUNK = 1 << 20


def read_text(path, key: str | None = None) -> str:
    """A text file the user wrote (params, prompts), as UTF-8; other bytes are one clear line.
    `key` names the param that pointed at the file, when one did."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        where = f"{key}: {path}" if key else str(path)
        raise UserError(f"{where}: not valid UTF-8 (byte {err.start}); save it as UTF-8") from None


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def manifest(folder: Path) -> list[dict]:
    """{"file", "sha256", "size"} of every file under `folder` (links left out, as `find -type f`),
    sorted by path: fetch's manifest rows."""
    rows = []
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            rows.append({"file": path.relative_to(folder).as_posix(), "sha256": sha256_file(path),
                         "size": path.stat().st_size})
    return sorted(rows, key=lambda r: r["file"])


def tree_sha256(rows: list[dict]) -> str:
    """The sha256 of a folder's `sha256sum`-style sorted listing ("<sha256>  <file>\\n" per file, rows
    as fetch's manifest lists them): what `sha256sum` gives in the shell, see sdtune.data.sources."""
    return sha256_text("".join(f"{r['sha256']}  {r['file']}\n" for r in sorted(rows, key=lambda r: r["file"])))


def sha256_json(obj) -> str:
    """A content hash of `obj` that does not depend on key order (cache keys, fingerprints)."""
    return sha256_text(json.dumps(obj, sort_keys=True))


def library_version(dist: str) -> str | None:
    """What pip installed of the distribution `dist` (pillow, not PIL), None when it is absent; read
    from its metadata, as some (prodigyopt) have no __version__."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256_code(files, libraries) -> str:
    """A hash of source files (in the order given) and of the versions of the libraries (distribution
    names) they run on: the part of a cache key or checkpoint fingerprint that changes when the code
    that made it does."""
    return sha256_json({"files": [[Path(f).name, sha256_file(f)] for f in files],
                        "versions": {dist: library_version(dist) for dist in libraries}})


def remove_leftovers(dest, suffix: str = ".tmp", keep: Path | None = None) -> None:
    """Remove what a killed writer of `dest` left beside it: the temporaries atomic_path (suffix
    .tmp) or a download (.download) names .<name>.<8 random characters><suffix>. Nothing removes
    them when a SIGKILL stops the writer; each may be a whole dataset. `keep`: the caller's own."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    mine = re.compile(re.escape(f".{dest.name}.") + r"[a-z0-9_]{8}" + re.escape(suffix))
    for path in dest.parent.iterdir():
        if mine.fullmatch(path.name) and path != keep:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dest):
    """Yield a temporary path beside `dest`; on success rename it over `dest`.

    Works for files and folders. On error the temporary is removed and `dest` is untouched.
    A `dest` that is a link to a folder stays a link, to the new folder. A folder is replaced only
    by a folder: a file written over one is refused, since the folder may hold someone's work.
    """
    dest = Path(dest)
    if dest.is_symlink() and dest.is_dir():
        # A folder moved to a bigger disk and linked back (data/raw -> /mnt/disk/raw): no folder can be
        # renamed over a link, so replace the folder it points to, from a temporary on that disk.
        dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name(f".{dest.name}.old")
    if old.is_dir() and not dest.exists():  # a kill between the two renames below: the folder comes back
        os.replace(old, dest)
    shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.rmdir()  # the caller creates a file or a folder at this name
    try:
        yield tmp
        if dest.is_dir() and not tmp.is_dir():
            raise UserError(f"{dest}: a folder is there, where a file is to be written; "
                            f"move it away or choose another name (the folder is kept)")
        if tmp.is_dir():  # a folder's leftovers may be a whole dataset; a file's are small, and
            remove_leftovers(dest, keep=tmp)  # listing a folder of 10,000 cache items at each write is not
        if dest.is_dir() and not dest.is_symlink():
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:  # Ctrl-C or a full disk between the renames: the old folder goes back
                os.replace(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes(dest, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest, obj) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(dest, rows) -> None:
    write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def missing(path) -> UserError:
    """A stage's input that is not there: the stage before it has not run here."""
    return UserError(f"{path}: not found; run the stages before this one first (dvc repro runs them in order) "
                     f"or dvc pull their outputs")


def damaged(path, what: str) -> UserError:
    """A stage's input that is there but cannot be used: cut short, edited by hand."""
    return UserError(f"{path}: {what}; run the stage that writes it again (dvc repro -f <stage>)")


def read_json(path, required: tuple = ()):
    """`path`'s JSON, which must be an object with the keys `required` when any are named."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise missing(path) from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise damaged(path, f"not valid JSON ({str(err).splitlines()[0]})") from None
    if required and not (isinstance(value, dict) and all(k in value for k in required)):
        raise damaged(path, f"expected a JSON object with {', '.join(repr(k) for k in required)}")
    return value


def read_safetensors_header(path) -> tuple[list[str], dict]:
    """The tensor names and string metadata (a LoRA's lineage) of a .safetensors file, from its
    header alone; a missing, cut-short or foreign file is one line naming it."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise missing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except SafetensorError as err:  # cut short, or not a safetensors file at all
        raise UserError(f"{path}: not a readable .safetensors file ({err})") from None


def read_safetensors_metadata(path) -> dict:
    return read_safetensors_header(path)[1]


def read_jsonl(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except FileNotFoundError:
        raise missing(path) from None
    except ValueError as err:
        raise damaged(path, f"not valid UTF-8 ({err})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise damaged(path, f"line {number} is not valid JSON ({err})") from None
    return rows
