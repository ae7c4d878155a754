"""Materialise a data source (local path, Google Drive, GCS, http(s), synthetic) into a folder.

Each scheme is one function `get(ref, work, opts) -> Path` in SOURCES. It returns either a
payload file (an archive or a single image, checked against the sha256 pin, then extracted or
placed) or a folder it filled itself inside `work` (pinned by its manifest, then renamed in).
`work` is a temporary folder beside dest: partial downloads live there and never reach dest.

The sha256 pin is the hash of the payload file. For a folder source (local folder, gs:// prefix,
Drive folder, synthetic) it is `tree_sha256(rows)`: the sha256 of the `sha256sum`-style listing
"<sha256>  <file>\\n" of every file, sorted by path, which the shell gives (for names without
backslashes or newlines, which sha256sum escapes) as
    cd DEST && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum

Skipped entries (symlinks leaving a local folder, links to folders, special files, macOS/Windows
junk) are appended to fetch's optional `skipped` list so the stage can report them.
Downloads: http(s) retries with exponential backoff and resumes with Range within one call;
gdown retries Drive downloads itself; google-cloud-storage applies its own retry policy.
"""

import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tqdm import tqdm

from sdtune.data import synthetic
from sdtune.data.extract import archive_kind, extract, is_junk, is_utf8, safe_relpath
from sdtune.data.links import link_problem
from sdtune.errors import UserError
from sdtune.io import atomic_path, manifest, remove_leftovers, sha256_file, tree_sha256
from sdtune.runtime import redacted

SUPPORTED = ("a local folder, archive (.zip .tar .tar.gz .tgz .tar.bz2 .tar.xz) or image; "
             "gdrive://<file id>; gdrive://folders/<folder id>; gs://<bucket>/<prefix>; "
             "https://... or http://...; synthetic://<n>")
BACKOFF_BASE = 1.0  # seconds before the first retry, doubling after; tests set it to 0
HTTP_TIMEOUT = (15, 60)  # connect, between bytes
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 16  # small: a dropped connection loses the chunk being read, the rest is resumed


@dataclass
class Options:
    retries: int
    skipped: list = field(default_factory=list)


def fetch(source: str, dest: Path, *, sha256: str | None = None, retries: int = 4,
          max_archive_bytes: int = 20 * 10**9, max_archive_files: int = 100_000,
          skipped: list | None = None, replace: bool = False) -> list[dict]:
    """Materialise `source` into the folder `dest` (absent or empty); see the module docstring.

    With `replace`, `dest` may be a folder holding an earlier fetch: the new one is swapped in
    only once it is complete, so a failed fetch leaves the old folder as it was.

    Returns manifest rows sorted by file: {"file": posix path inside dest, "sha256", "size"}.
    What was left out (symlinks leaving a local folder, special files, macOS junk) is appended
    to `skipped`, when given, as {"file": path in the source, "reason": ...}.
    Downloads are tried 1 + `retries` times.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (not replace and any(dest.iterdir()))):
        raise UserError(f"{dest}: already exists and is not an empty folder; remove it to fetch again")
    pin = _parse_pin(sha256)
    get, ref = _resolve(source)
    shown = redacted(source)  # a signed URL's signature stays out of messages and logs
    opts = Options(retries=retries)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest, ".download")  # a killed fetch's download: a whole archive, perhaps
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent) as work, \
            atomic_path(dest) as out:
        got = get(ref, Path(work), opts)
        if got.is_dir():
            shutil.move(got, out)  # a rename, or a copy when data/raw links to another disk
            rows = manifest(out)
            _check_pin(pin, tree_sha256(rows), shown, "sorted manifest")
        else:
            refuse_html(got, shown)  # first: a Drive error page may be named "data.zip", and fail the pin
            _check_pin(pin, sha256_file(got), shown, "downloaded file")
            if archive_kind(got, shown):
                opts.skipped += extract(got, out, max_bytes=max_archive_bytes, max_files=max_archive_files,
                                        name=shown)
            else:
                refuse_non_image(got, shown)
                out.mkdir()
                shutil.copyfile(got, out / got.name)
            rows = manifest(out)
        if not rows:
            raise UserError(f"{shown}: no files found")
    if skipped is not None:
        skipped.extend(opts.skipped)
    return rows


def _parse_pin(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    pin = sha256.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise UserError(f"data.sha256: expected 64 hex digits, got {sha256!r}")
    return pin


def _check_pin(pin: str | None, actual: str, source: str, what: str) -> None:
    if pin is not None and pin != actual:
        raise UserError(f"{source}: sha256 mismatch: pinned {pin}, got {actual} (sha256 of the {what})")


def _resolve(source: str):
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", source)
    if m is None:
        return _local, source
    scheme, ref = m.group(1).lower(), m.group(2)
    if scheme not in SOURCES:
        raise UserError(f"data.source: unknown scheme in {source!r}; supported: {SUPPORTED}")
    return SOURCES[scheme], (source if scheme in ("http", "https") else ref)


def refuse_html(path: Path, source: str) -> None:
    """An image set never holds HTML; Drive sends a page for quota, virus-scan or sharing problems."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    # XHTML opens with an XML declaration, and a page may open with a comment
    if head.startswith((b"<!doctype html", b"<html")) or (head.startswith((b"<?xml", b"<!--")) and b"<html" in head):
        raise UserError(f"{source}: got an HTML page, not an image or archive (a Drive quota-exceeded, "
                        "virus-scan or sign-in page, or a web page URL instead of a file)")


def refuse_non_image(path: Path, source: str) -> None:
    """A single file that is not an archive must be an image: anything else (a .7z, a JSON file)
    would replace data/raw and fail only in the caption stage. A damaged image passes: the caption
    stage says what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    from sdtune.data.images import MAGIC

    with open(path, "rb") as f:
        if f.read(16).startswith(tuple(MAGIC)):
            return
    try:
        with Image.open(path):
            return
    except Image.DecompressionBombError:  # an image, and a big one: data.max_pixels decides later
        return
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{source}: {path.name} is neither a zip or tar archive nor an image Pillow can read; "
                        f"expected one of those") from None


def _one_line(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


# --- local ------------------------------------------------------------------------------------

def in_container() -> bool:
    """Whether this runs inside docker's or podman's container (docker/run's SDTUNE_RUNNER)."""
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def _local(ref: str, work: Path, opts: Options) -> Path:
    path = Path(ref).expanduser()
    if not path.exists():
        where = ("; in the container only the workspace is mounted (docker/run): put the data inside it"
                 if in_container() and path.is_absolute() else f" (remote sources: {SUPPORTED})")
        raise UserError(f"data.source: local path {ref!r} does not exist{where}")
    if not path.is_dir():
        return path  # an archive or a single image; read where it is
    root = path.resolve()
    if work.resolve().is_relative_to(root):
        raise UserError(f"data.source: the destination lies inside the source folder {ref!r}")
    tree = work / "tree"
    tree.mkdir()

    def unlistable(err: OSError):  # without this, os.walk leaves the folder out silently
        raise UserError(f"{err.filename}: cannot list this folder ({err.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            src = here / name
            rel = src.relative_to(root).as_posix()
            try:
                reason = _skip_reason(src, root, rel)
                if reason:  # the name, made printable: a non-UTF-8 one would break the JSON report
                    opts.skipped.append({"file": os.fsencode(rel).decode("utf-8", "replace"), "reason": reason})
                    if name in dirnames:
                        dirnames.remove(name)
                elif src.is_dir():
                    (tree / rel).mkdir()
                else:
                    shutil.copyfile(src, tree / rel)  # follows an inside symlink: its content is copied
            except OSError as err:
                # err.filename tells an unreadable source (permissions, I/O error) from a copy that
                # could not be written; sendfile's errors (disk full) name neither
                failed = Path(err.filename) if err.filename else None
                verb = "read" if failed and not failed.is_relative_to(tree) else "copy"
                raise UserError(f"{src}: cannot {verb} ({err.strerror})") from None
    return tree


def _skip_reason(src: Path, root: Path, rel: str) -> str | None:
    if not is_utf8(rel):
        return "name is not valid UTF-8"
    if is_junk(rel):
        return "macOS/Windows metadata"
    problem = link_problem(src, root)
    if problem == "outside":
        return f"symlink to {src.resolve()}, outside the source folder (not followed)"
    if problem == "symlink to a folder":
        return "symlink to a folder (not followed)"
    if problem == "not a regular file":
        return "not a regular file (device, FIFO or socket)"
    return problem  # "symlink loop", "broken symlink", or None


# --- http(s) ----------------------------------------------------------------------------------

class _Retry(Exception):
    """A failure worth another try: 5xx, 429, a dropped connection, a short body."""


def _http(url: str, work: Path, opts: Options) -> Path:
    name = _safe_name(urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]))
    part = work / "download.part"  # not the served name: with ".part" it could pass 255 bytes
    state = {}  # the validator (ETag / Last-Modified) a resumed range must match
    for attempt in range(opts.retries + 1):
        if attempt:
            time.sleep(BACKOFF_BASE * 2 ** (attempt - 1))
        try:
            name = _http_attempt(url, part, state) or name
            break
        except (_Retry, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as err:  # the last: a compressed transfer cut short
            last = err
            print(f"fetch: {redacted(url)}: try {attempt + 1}/{opts.retries + 1} failed: {_scrub(_one_line(err), url)}",
                  file=sys.stderr)
        except requests.RequestException as err:  # a malformed URL, too many redirects...: no retry helps
            raise UserError(f"{redacted(url)}: {_scrub(_one_line(err), url)}") from None
    else:
        raise UserError(f"{redacted(url)}: download failed after {opts.retries + 1} tries: "
                        f"{_scrub(_one_line(last), url)}")
    final = work / name
    os.replace(part, final)
    return final


def _scrub(text: str, url: str) -> str:
    """`text`, a requests error, which quotes the URL's path and query, without the URL's secrets."""
    parts = urllib.parse.urlsplit(url)
    for secret in (parts.query, parts.password, parts.username):
        if secret:
            text = text.replace(secret, "***")
    return text


def _http_attempt(url: str, part: Path, state: dict) -> str | None:
    """Download (or resume) into `part`; returns the server's file name if it gave one."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte offsets must count the bytes on disk
    if have:
        headers["Range"] = f"bytes={have}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]  # a changed file comes back whole, not spliced
    with requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT) as r:
        if r.status_code == 416 and have:
            part.unlink()
            raise _Retry("HTTP 416: the partial download no longer fits the file; starting over")
        if r.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            raise UserError(f"{redacted(url)}: HTTP {r.status_code} {r.reason}")
        etag = r.headers.get("ETag", "")
        state["validator"] = etag if etag and not etag.startswith("W/") else r.headers.get("Last-Modified")
        resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if r.status_code == 206 and not (have and resumed):
            part.unlink(missing_ok=True)
            raise _Retry(f"server sent a byte range we did not ask for ({r.headers.get('Content-Range')})")
        offset = have if resumed else 0
        length = r.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        # A server may compress on the fly though asked not to. Then Content-Length counts the bytes
        # on the wire, not those on disk, and a cut transfer cannot resume at an offset of the file.
        encoded = r.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        total = offset + length if length is not None and not encoded else None
        try:
            label = _safe_name(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])[:40]  # no query: a signature
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=None) as bar:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            if encoded and length is not None and r.raw.tell() != length:
                raise _Retry(f"connection closed after {r.raw.tell()} of {length} compressed bytes; starting over")
        except (_Retry, requests.RequestException):
            if encoded:  # what is on disk is decoded: no byte range of the server's continues it
                part.unlink()
            raise
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"connection closed after {size} of {total} bytes")
        m = re.search(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)', r.headers.get("Content-Disposition", ""), re.I)
        return _safe_name(urllib.parse.unquote(m.group(1))) if m else None


def _safe_name(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if len(name.encode()) > 255:  # most file systems' limit: keep the end, whose suffix says what it is
        name = name.encode()[-255:].decode(errors="ignore")
    return name if name not in ("", ".", "..") else "download"


# --- Google Drive (gdown) ---------------------------------------------------------------------

def _gdrive(ref: str, work: Path, opts: Options) -> Path:
    import gdown  # only this source needs it
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    folder = ref.startswith("folders/")
    drive_id = ref.removeprefix("folders/").strip("/")
    if not re.fullmatch(r"[-\w]+", drive_id):
        raise UserError(f"data.source: gdrive://{ref}: expected gdrive://<file id> or gdrive://folders/<folder id>")
    # use_cookies=False: no state read from or written to ~/.cache/gdown, so runs repeat. A timeout,
    # or a stalled connection would hang the stage for good (gdown's default waits forever).
    get = {"use_cookies": False, "retries": opts.retries, "timeout": HTTP_TIMEOUT}
    try:
        if not folder:
            return Path(gdown.download(id=drive_id, output=f"{work}{os.sep}", **get))
        tree = work / "tree"
        tree.mkdir()
        # List first, then download file by file: Drive lets two files in a folder share a name,
        # and gdown would write the second over the first.
        listing = gdown.download_folder(id=drive_id, output=str(tree), skip_download=True, quiet=True, **get)
        for rel, file_id in _drive_files(listing, f"gdrive://{ref}", opts):
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            gdown.download(id=file_id, output=str(tree / rel), **get)
    except FileURLRetrievalError as err:
        raise UserError(f"gdrive://{ref}: Google Drive sent an HTML page instead of the file; is it shared "
                        f"'Anyone with the link', or is its download quota exceeded? ({_one_line(err)})") from None
    except (DownloadError, requests.RequestException) as err:
        raise UserError(f"gdrive://{ref}: download failed: {_one_line(err)}") from None
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            refuse_html(path, f"gdrive://{ref} file {path.relative_to(tree).as_posix()!r}")
    return tree


def _drive_files(listing, where: str, opts: Options) -> list[tuple[str, str]]:
    """(path in the folder, file id) of a Drive folder's files to download, checked as an archive's
    members are: junk left out, two files at one path refused, a case-only repeat left out."""
    files, first = [], {}  # casefolded path -> (path, id) of the first file there
    for entry in listing:
        rel = safe_relpath(entry.path, where, "file")
        if rel is None:
            continue
        if is_junk(rel):
            opts.skipped.append({"file": rel, "reason": "macOS/Windows metadata"})
            continue
        seen_rel, seen_id = first.setdefault(rel.casefold(), (rel, entry.id))
        if seen_id == entry.id:
            files.append((rel, entry.id))
        elif seen_rel == rel:
            raise UserError(f"{where}: files {seen_id} and {entry.id} are both named {rel!r}; rename one "
                            "in Drive (one would overwrite the other)")
        else:
            opts.skipped.append({"file": rel, "reason": f"same name as {seen_rel!r} but for upper/lower case "
                                 "(one file on case-insensitive disks); kept the first"})
    return files


# --- Google Cloud Storage ---------------------------------------------------------------------

def _gcs_client():
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(credentials=AnonymousCredentials(), project=None)
    try:
        creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_only"])
    except DefaultCredentialsError:
        raise UserError("gs://: no Google Application Default Credentials; run `gcloud auth application-default "
                        "login` or set GOOGLE_APPLICATION_CREDENTIALS") from None
    return storage.Client(credentials=creds, project=project)  # project may be None: reads need none


def _gcs(ref: str, work: Path, opts: Options) -> Path:
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import GoogleAuthError

    bucket_name, _, prefix = ref.partition("/")
    if not bucket_name:
        raise UserError(f"data.source: gs://{ref}: expected gs://<bucket>/<prefix>")
    client = _gcs_client()
    try:
        if prefix and not prefix.endswith("/"):
            blob = client.bucket(bucket_name).get_blob(prefix)
            if blob is not None:  # one object: an archive or a single image
                path = work / _safe_name(prefix)
                blob.download_to_filename(path)
                return path
            prefix += "/"  # a folder: "raw/a" must not match "raw/ab/..."
        blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
        if not blobs:
            raise UserError(f"gs://{ref}: no objects under this prefix")
        tree = work / "tree"
        tree.mkdir()  # even if every object is junk: fetch then says it found no files
        got = {}  # path in tree -> object name, to name both objects of a clash
        for blob in tqdm(blobs, unit="file", desc=f"gs://{bucket_name}", disable=None):
            rel = safe_relpath(blob.name[len(prefix):], f"gs://{bucket_name}", "object")
            if rel is None or is_junk(rel):
                if rel:
                    opts.skipped.append({"file": rel, "reason": "macOS/Windows metadata"})
                continue
            if rel in got:  # "raw/a//b.png" and "raw/a/b.png": the second would overwrite the first
                raise UserError(f"gs://{bucket_name}: objects {got[rel]!r} and {blob.name!r} both land at {rel!r}")
            got[rel] = blob.name
            try:
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(tree / rel)  # the client retries and checks the object's hash
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
                # "raw/a" and "raw/a/b.png": a file and a folder cannot share the name a
                other = next((got[r] for r in got if rel.startswith(r + "/") or r.startswith(rel + "/")), "?")
                raise UserError(f"gs://{bucket_name}: object {blob.name!r} clashes with {other!r}: "
                                f"one would be a file and the other a folder ({err.strerror})") from None
        return tree
    except gexc.NotFound:  # a missing object gives None above, so this is the bucket
        raise UserError(f"gs://{ref}: bucket {bucket_name!r} not found") from None
    except gexc.Forbidden as err:
        raise UserError(f"gs://{ref}: permission denied; the credentials need storage.objects.get and "
                        f"storage.objects.list ({_one_line(err, 120)})") from None
    except GoogleAuthError as err:  # e.g. expired user credentials
        raise UserError(f"gs://{ref}: Google credentials could not be used ({_one_line(err, 120)}); run "
                        "`gcloud auth application-default login`") from None
    except (gexc.GoogleAPIError, requests.RequestException) as err:
        raise UserError(f"gs://{ref}: {_one_line(err)}") from None


# --- synthetic --------------------------------------------------------------------------------

def _synthetic(ref: str, work: Path, opts: Options) -> Path:
    if not ref.isdigit() or int(ref) < 1:
        raise UserError(f"data.source: synthetic://{ref}: expected synthetic://<number of images>")
    tree = work / "tree"
    synthetic.generate(tree, int(ref))
    return tree


SOURCES = {"gdrive": _gdrive, "gs": _gcs, "http": _http, "https": _http, "synthetic": _synthetic}
