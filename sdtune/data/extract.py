"""Safe extraction of zip and tar archives.

Every member is checked before a single byte is written: names must stay inside the target,
links, devices and FIFOs are refused, and the total size and member count must fit the limits
(an archive bomb is refused before it fills the disk). Files are then written one by one from
the member streams, so nothing from the archive (modes, owners, link targets) reaches the disk
except names that passed the checks and file contents.
"""

import errno
import lzma
import re
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from sdtune.errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
JUNK_DIRS = {"__MACOSX"}
JUNK_FILES = {".DS_Store", "Thumbs.db"}
_DRIVE = re.compile(r"^[A-Za-z]:")


def archive_kind(path: Path, name: str | None = None) -> str | None:
    """'tar', 'zip' or None, by content (downloads often have no telling name)."""
    # tar first: its header checksum sits at the start, while zip's signature is searched near
    # the end and could be found inside a tar whose last member is a zip.
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except EOFError:  # a gzip stream cut within its first block
        raise UserError(f"{name or path}: corrupt or truncated archive (it ends within its first block)") from None
    if zipfile.is_zipfile(path):
        return "zip"
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{name or path}: named like an archive but is not a readable zip or tar file")
    return None


def safe_relpath(name: str, where: str, what: str = "member") -> str | None:
    """Normalise an archive member's (or bucket object's) name to a relative posix path, or refuse it.

    Backslashes count as separators (zips made on Windows use them). Returns None for the root
    itself ("./"). `where` names the archive or bucket in the message.
    """
    unified = name.replace("\\", "/")
    if "\x00" in name:
        problem = "has a NUL byte in its name"
    elif not is_utf8(name):
        problem = "has a name that is not valid UTF-8"
    elif unified.startswith("/") or _DRIVE.match(unified):
        problem = "has an absolute path"
    elif ".." in unified.split("/"):
        problem = "would land outside the target folder"
    else:
        return "/".join(p for p in unified.split("/") if p not in ("", ".")) or None
    raise UserError(f"{where}: {what} {name!r} {problem} (refused)")


def is_utf8(name: str) -> bool:
    try:  # undecodable bytes arrive as lone surrogates, which every later hash and JSON write rejects
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_junk(rel: str) -> bool:
    """macOS/Windows metadata: __MACOSX/, .DS_Store, AppleDouble ._files, Thumbs.db."""
    parts = rel.split("/")
    return bool(JUNK_DIRS.intersection(parts)) or parts[-1] in JUNK_FILES or parts[-1].startswith("._")


class _Member(NamedTuple):
    """What the checks need to know of a tar or zip member, format-free."""

    name: str
    kind: str  # "file", "dir", or what else it is, for the refusal message
    size: int
    ref: object  # the TarInfo or ZipInfo


def _tar_members(tf: tarfile.TarFile, where: str, max_files: int) -> list[_Member]:
    out = []
    for m in tf:  # read member by member: a tar has no index, and a bomb of tiny members would fill memory
        if len(out) == max_files:
            raise _too_many(where, max_files)
        if m.isdir():
            kind = "dir"
        elif m.isfile():
            kind = "file"
        elif m.issym() or m.islnk():
            kind = f"link to {m.linkname!r}"
        elif m.ischr() or m.isblk():
            kind = "device file"
        elif m.isfifo():
            kind = "FIFO"
        else:
            kind = f"unsupported type {m.type!r}"
        out.append(_Member(m.name, kind, m.size if kind == "file" else 0, m))
    return out


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16  # unix mode, when the zip was made on unix
        if _zip_is_dir(info):
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "link"
        elif stat.S_IFMT(mode) in (0, stat.S_IFREG):
            kind = "file"
        else:
            kind = "device file or FIFO"
        # zipfile stops reading at file_size and checks the CRC, so declared sizes cannot lie.
        out.append(_Member(info.filename, kind, info.file_size, info))
    return out


def _zip_is_dir(info: zipfile.ZipInfo) -> bool:
    """A folder entry. ZipInfo.is_dir() looks only for a trailing "/"; a zip made on Windows may end
    the name with "\\" instead, or mark the folder only by its MS-DOS attribute (0x10)."""
    dos_folder = info.create_system == 0 and info.external_attr & 0x10
    return info.filename.endswith(("/", "\\")) or stat.S_ISDIR(info.external_attr >> 16) or bool(dos_folder)


def _too_many(where: str, max_files: int) -> UserError:
    return UserError(f"{where}: more than max_archive_files={max_files} members; refusing the archive")


def _check(members: list[_Member], where: str, dest: Path, max_bytes: int, max_files: int, skipped: list):
    """All checks, before anything is written; returns (normalised name, member) pairs.

    Files that differ from an earlier one only in upper/lower case are appended to `skipped`.
    """
    if len(members) > max_files:
        raise _too_many(where, max_files)
    total = sum(m.size for m in members)
    if total > max_bytes:
        raise UserError(f"{where}: {total} bytes uncompressed exceed max_archive_bytes={max_bytes}; "
                        "refusing the archive")
    checked = []
    files = {}  # casefolded normalised name -> (normalised name, member) of the first file with it
    for m in members:
        rel = safe_relpath(m.name, where)
        if m.kind not in ("file", "dir"):
            raise UserError(f"{where}: member {m.name!r} is a {m.kind}; links and special files "
                            "are not extracted, so the archive is refused")
        if isinstance(m.ref, tarfile.TarInfo):
            try:  # the standard library's own verdict, as a second opinion
                tarfile.data_filter(m.ref, str(dest))
            except tarfile.FilterError as err:
                raise UserError(f"{where}: member {m.name!r} refused: {err}") from None
        if rel is None:
            continue
        if m.kind == "file" and not is_junk(rel):  # junk is never written, so its repeats do no harm
            # café.png composed (NFC) and decomposed (NFD, as macOS writes names) are one file there
            first_rel, first = files.setdefault(unicodedata.normalize("NFC", rel).casefold(), (rel, m))
            if first is not m and first_rel == rel:
                # Two members for one file: extracting would keep whichever came last, silently.
                raise UserError(f"{where}: members {first.name!r} and {m.name!r} both extract to {rel!r}; "
                                "refusing the archive")
            if first is not m:
                # A.jpg and a.jpg are two files on Linux but one on a macOS or Windows disk. Keeping
                # the first everywhere gives the same data set on every machine, and the rest of a
                # valid archive stays usable; the report says what was left out.
                skipped.append({"file": m.name, "reason": f"same name as {first.name!r} but for upper/lower "
                                "case or Unicode composition (one file on case-insensitive or macOS disks); "
                                "kept the first"})
                continue
        checked.append((rel, m))
    return checked


def extract(archive: Path, dest: Path, *, max_bytes: int, max_files: int, name: str | None = None) -> list[dict]:
    """Extract a zip or tar (any compression) into `dest`, or refuse it whole with a UserError.

    `dest` should be a temporary folder: a corrupt member found while writing leaves earlier
    members behind. `name` is how messages call the archive (default: its path).
    Returns the members left out (junk, case-only repeats) as {"file": member name, "reason": ...}.
    """
    archive, dest = Path(archive), Path(dest)
    where = name or str(archive)
    kind = archive_kind(archive, where)
    if kind is None:
        raise UserError(f"{where}: not a zip or tar archive")
    skipped = []
    try:
        if kind == "tar":
            with tarfile.open(archive, "r:*") as tf:
                checked = _check(_tar_members(tf, where, max_files), where, dest, max_bytes, max_files, skipped)
                _write(checked, dest, where, tf.extractfile, skipped)
                # tarfile stops at the end-of-archive marker, short of the gzip/xz trailer that
                # holds the checksum: read the rest of the stream so a flipped bit is caught.
                while tf.fileobj.read(1 << 20):
                    pass
                return skipped
        with zipfile.ZipFile(archive) as zf:  # zipfile checks each member's CRC itself
            checked = _check(_zip_members(zf), where, dest, max_bytes, max_files, skipped)
            _write(checked, dest, where, zf.open, skipped)
            return skipped
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError) as err:
        raise UserError(f"{where}: corrupt or truncated archive ({err})") from None
    except OSError as err:
        if err.errno is not None:  # a real file-system error (disk full...), not bad compressed data
            raise
        # gzip.BadGzipFile (a CRC mismatch) and bz2's "Invalid data stream" carry no errno
        raise UserError(f"{where}: corrupt or truncated archive ({err})") from None


def _write(checked, dest: Path, where: str, open_member, skipped: list) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for rel, m in checked:
        if is_junk(rel):
            if m.kind == "file":
                skipped.append({"file": m.name, "reason": "macOS/Windows metadata"})
            continue
        target = root / rel
        if not target.resolve().is_relative_to(root):  # belt and braces after safe_relpath
            raise UserError(f"{where}: member {m.name!r} would land outside the target folder")
        try:
            if m.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member(m.ref) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except RuntimeError as err:  # zipfile: encrypted member
            raise UserError(f"{where}: member {m.name!r} cannot be read ({err})") from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
            raise UserError(f"{where}: member {m.name!r} clashes with another member ({err.strerror})") from None
        except OSError as err:
            if err.errno != errno.ENAMETOOLONG:
                raise
            raise UserError(f"{where}: member {m.name!r}: a name part is too long for this file system "
                            f"(most allow 255 bytes); rename it in the archive") from None
