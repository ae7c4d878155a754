"""Every data source, exercised for real: files on disk, a local HTTP server, a Drive stand-in
reached through gdown, and a GCS emulator."""

import hashlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

import sdtune.data.sources
from sdtune.data.sources import fetch, tree_sha256
from sdtune.errors import UserError
from fixtures_data import Route

SET = {"a painting.png": b"\x89PNG\r\n\x1a\n one", "ünï/été 2.jpg": b"\xff\xd8\xff two", "a painting.txt": b"cap\n"}


def zip_bytes(members=SET) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def rows_of(members):
    return [{"file": f, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for f, d in sorted(members.items())]


def write_tree(root, members):
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def leftovers(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}"))


# --- local ------------------------------------------------------------------------------------

def test_local_folder_copies_files_and_reports_what_it_skips(tmp_path):
    src = write_tree(tmp_path / "src", SET)
    (tmp_path / "secret.png").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.png", src / "escape.png")
    os.symlink("a painting.png", src / "alias.png")  # stays inside: its content is copied
    os.symlink(tmp_path, src / "up")
    os.symlink(src / "missing.png", src / "broken.png")
    os.mkfifo(src / "pipe")
    (src / ".DS_Store").write_bytes(b"finder")
    (src / b"caf\xe9.png".decode("utf-8", "surrogateescape")).write_bytes(b"latin-1 name")
    skipped = []
    rows = fetch(str(src), tmp_path / "data" / "raw", skipped=skipped)
    assert rows == rows_of({**SET, "alias.png": SET["a painting.png"]})
    reasons = {s["file"]: s["reason"] for s in skipped}
    assert set(reasons) == {"escape.png", "up", "broken.png", "pipe", ".DS_Store", "caf\ufffd.png"}
    assert "outside the source folder" in reasons["escape.png"] and "outside" in reasons["up"]
    assert leftovers(tmp_path / "data" / "raw") == []


FETCH_CHILD = """import sys
from sdtune.data.sources import fetch
from sdtune.errors import UserError
try:
    fetch(sys.argv[1], sys.argv[2])
except UserError as err:
    sys.exit(f"UserError: {err}")
"""


def fetch_in_child(source, dest):
    """fetch() in a child process that file modes apply to: root reads any file (its capability
    CAP_DAC_OVERRIDE), so as root the child starts without that capability, by setpriv."""
    cmd = [sys.executable, "-c", FETCH_CHILD, str(source), str(dest)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads files whatever their mode, and setpriv is missing to drop that")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    if done.stderr.startswith("setpriv:"):
        pytest.skip(f"cannot drop root's capabilities here: {done.stderr.strip()}")
    return done


@pytest.mark.parametrize("locked,problem", [("a painting.png", "cannot read (Permission denied)"),
                                            ("ünï", "cannot list this folder (Permission denied)")])
def test_local_unreadable_file_or_folder_is_a_user_error(tmp_path, locked, problem):
    src = write_tree(tmp_path / "src", SET)
    (src / locked).chmod(0)
    try:
        done = fetch_in_child(src, tmp_path / "raw")
    finally:
        (src / locked).chmod(0o755)  # so that pytest can clean up
    assert (done.returncode, done.stderr) == (1, f"UserError: {src / locked}: {problem}\n")
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path / "raw") == []

def test_local_archive_single_image_and_pin(tmp_path):
    archive = tmp_path / "set.zip"
    archive.write_bytes(zip_bytes())
    pin = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert fetch(str(archive), tmp_path / "a", sha256=pin) == rows_of(SET)
    image = tmp_path / "one.png"
    image.write_bytes(SET["a painting.png"])
    assert fetch(str(image), tmp_path / "b") == rows_of({"one.png": SET["a painting.png"]})
    with pytest.raises(UserError, match=f"sha256 mismatch: pinned {'0' * 64}, got {pin}"):
        fetch(str(archive), tmp_path / "c", sha256="0" * 64)
    assert not (tmp_path / "c").exists() and leftovers(tmp_path / "c") == []


def test_folder_pin_is_the_documented_sha256sum_listing(tmp_path):
    src = write_tree(tmp_path / "src", SET)
    rows = fetch(str(src), tmp_path / "raw")
    shell = subprocess.run("find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum",
                           shell=True, cwd=tmp_path / "raw", capture_output=True, text=True, check=True)
    assert shell.stdout.split()[0] == tree_sha256(rows)
    fetch(str(src), tmp_path / "again", sha256=tree_sha256(rows))
    with pytest.raises(UserError, match="sorted manifest"):
        fetch(str(src), tmp_path / "bad", sha256="f" * 64)


@pytest.mark.parametrize("source,message", [
    ("no/such/folder", "local path 'no/such/folder' does not exist"),
    ("ftp://host/x.zip", "unknown scheme in 'ftp://host/x.zip'; supported: a local folder"),
    ("synthetic://many", "expected synthetic://<number of images>"),
    ("gdrive://folders/", "expected gdrive://<file id>"),
])
def test_bad_sources_are_user_errors(tmp_path, source, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")):
        fetch(source, tmp_path / "raw")


def test_a_missing_absolute_path_in_the_container_says_only_the_workspace_is_mounted(tmp_path, monkeypatch):
    missing = str(tmp_path / "mnt/paintings")
    monkeypatch.setattr(sdtune.data.sources, "in_container", lambda: True)
    with pytest.raises(UserError, match="in the container only the workspace is mounted"):
        fetch(missing, tmp_path / "raw")
    monkeypatch.setattr(sdtune.data.sources, "in_container", lambda: False)
    with pytest.raises(UserError, match=r"does not exist \(remote sources"):
        fetch(missing, tmp_path / "raw")


def test_dest_must_be_empty_and_outside_the_source(tmp_path):
    src = write_tree(tmp_path / "src", SET)
    with pytest.raises(UserError, match="inside the source folder"):
        fetch(str(src), src / "raw")
    with pytest.raises(UserError, match="not an empty folder"):
        fetch(str(src), src)


def test_replace_swaps_a_finished_fetch_over_an_earlier_one(tmp_path, http_server):
    dest = tmp_path / "raw"
    fetch("synthetic://1", dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    http_server.routes["/down.zip"] = Route(b"x", fail_first=99)
    with pytest.raises(UserError, match="download failed"):
        fetch(http_server.url("/down.zip"), dest, retries=0, replace=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # a failed fetch keeps the old one
    src = write_tree(tmp_path / "src", SET)
    assert fetch(str(src), dest, replace=True) == rows_of(SET)
    assert sorted(p.name for p in dest.iterdir()) == ["a painting.png", "a painting.txt", "ünï"]
    assert leftovers(dest) == []
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UserError, match="not an empty folder"):
        fetch(str(src), tmp_path / "file", replace=True)


def test_a_linked_folder_stays_a_link_to_the_new_fetch(tmp_path):
    """data/raw moved to a bigger disk and linked back: the fetch lands in the linked folder."""
    disk = tmp_path / "disk" / "raw"
    disk.mkdir(parents=True)
    (tmp_path / "raw").symlink_to(disk)
    first = fetch("synthetic://1", tmp_path / "raw")
    assert (tmp_path / "raw").is_symlink() and sorted(p.name for p in disk.iterdir()) == [r["file"] for r in first]
    src = write_tree(tmp_path / "src", SET)
    assert fetch(str(src), tmp_path / "raw", replace=True) == rows_of(SET)
    assert (tmp_path / "raw").is_symlink() and (tmp_path / "raw").resolve() == disk.resolve()
    assert sorted(p.name for p in disk.iterdir()) == ["a painting.png", "a painting.txt", "ünï"]
    assert leftovers(disk) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["disk", "raw", "src"]


def test_a_folder_fetch_lands_in_a_linked_folder_on_another_file_system(tmp_path):
    """data/raw linked to another disk: a folder source was moved there with a rename, which no
    file system does across devices (an OSError traceback: invalid cross-device link)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system at /dev/shm here")
    disk = Path(tempfile.mkdtemp(dir=shm)) / "raw"
    try:
        disk.mkdir()
        (tmp_path / "raw").symlink_to(disk)
        src = write_tree(tmp_path / "src", SET)
        assert fetch(str(src), tmp_path / "raw", replace=True) == rows_of(SET)
        assert sorted(p.name for p in disk.iterdir()) == ["a painting.png", "a painting.txt", "ünï"]
        assert (tmp_path / "raw").resolve() == disk.resolve() and leftovers(disk) == []
    finally:
        shutil.rmtree(disk.parent)


@pytest.mark.parametrize("name, body", [
    ("data.7z", b"7z\xbc\xaf\x27\x1c" + b"\0" * 64),
    ("set.json", b'{"images": []}'),
    ("page", b'<?xml version="1.0"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0//EN">\n<html><body>Sign in'),
])
def test_a_single_file_that_is_neither_archive_nor_image_is_refused_and_the_old_fetch_kept(tmp_path, name, body):
    """It replaced data/raw, and failed only in the caption stage ('no usable image among 1 files')."""
    dest = tmp_path / "raw"
    first = fetch("synthetic://1", dest)
    (tmp_path / name).write_bytes(body)
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / name))}: "):
        fetch(str(tmp_path / name), dest, replace=True)
    assert sorted(p.name for p in dest.iterdir()) == [r["file"] for r in first]


def test_archive_member_names_too_long_for_the_disk_and_a_gzip_cut_in_its_first_block_are_one_line(tmp_path):
    dest = tmp_path / "raw"
    long = tmp_path / "long.zip"
    with zipfile.ZipFile(long, "w") as zf:
        zf.writestr("photos/" + "é" * 140 + ".png", b"x")  # 284 bytes in UTF-8; macOS allows it
    with pytest.raises(UserError, match="a name part is too long for this file system"):
        fetch(str(long), dest)
    whole = tmp_path / "whole.tgz"
    with tarfile.open(whole, "w:gz") as tf:
        info = tarfile.TarInfo("a.png")
        info.size = 4096
        tf.addfile(info, io.BytesIO(os.urandom(4096)))
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole.read_bytes()[:60])  # EOFError from tarfile.is_tarfile, a traceback
    with pytest.raises(UserError, match="corrupt or truncated archive"):
        fetch(str(cut), dest)


def test_corrupt_archive_keeps_the_earlier_fetch(tmp_path):
    dest = tmp_path / "raw"
    fetch("synthetic://1", dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    archive = tmp_path / "set.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        data = random.Random(0).randbytes(100_000)  # incompressible: the flipped bit lands in the image
        info = tarfile.TarInfo("a.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 1
    archive.write_bytes(raw)
    with pytest.raises(UserError, match="set.tgz: corrupt or truncated archive"):
        fetch(str(archive), dest, replace=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert leftovers(dest) == []

def test_synthetic(tmp_path):
    rows = fetch("synthetic://4", tmp_path / "raw")
    assert [r["file"] for r in rows] == ["synthetic_000.png", "synthetic_000.txt", "synthetic_001.png",
                                         "synthetic_001.txt", "synthetic_002.png", "synthetic_003.png",
                                         "synthetic_003.txt"]


# --- http(s) ----------------------------------------------------------------------------------

def test_http_archive_with_retry_after_a_failing_first_response(tmp_path, http_server):
    body = zip_bytes()
    http_server.routes["/files/set.zip"] = Route(body, fail_first=1)
    rows = fetch(http_server.url("/files/set.zip"), tmp_path / "raw",
                 sha256=hashlib.sha256(body).hexdigest())
    assert rows == rows_of(SET)
    assert [k for k, _ in http_server.log] == ["/files/set.zip"] * 2


@pytest.mark.parametrize("ranges", [True, False])
def test_http_cut_download_resumes_with_range_or_restarts(tmp_path, http_server, ranges):
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)  # an image by its signature, as fetch asks of a single file
    http_server.routes["/big.png"] = Route(body, cut_first=True, ranges=ranges)
    assert fetch(http_server.url("/big.png"), tmp_path / "raw") == rows_of({"big.png": body})
    first, second = http_server.log
    assert first == ("/big.png", None)
    assert second[1] and second[1].startswith("bytes=") and int(second[1][6:-1]) > 0  # asked to resume
    assert (tmp_path / "raw" / "big.png").read_bytes() == body


@pytest.mark.parametrize("cut", [False, True])
def test_http_a_server_that_compresses_anyway_still_gives_the_archive(tmp_path, http_server, cut):
    """Asked for the bytes as they are (Accept-Encoding: identity), a server may still gzip them:
    its Content-Length then counts the compressed bytes, and a cut transfer cannot resume at an
    offset of the file on disk, so it starts over."""
    import gzip

    body = zip_bytes()
    http_server.routes["/set.zip"] = Route(gzip.compress(body), headers={"Content-Encoding": "gzip"},
                                           ranges=False, cut_first=cut)
    rows = fetch(http_server.url("/set.zip"), tmp_path / "raw", sha256=hashlib.sha256(body).hexdigest(), retries=1)
    assert rows == rows_of(SET)
    assert [asked for _, asked in http_server.log] == [None] * (2 if cut else 1)  # no Range into gzip


class ChangedAfterFirst(Route):
    """A route whose file is `first` for the first request and `then` afterwards (the log counts
    requests); `status` likewise, so a first answer can be a 429 and the next a 200."""

    def __init__(self, log, first, then, first_status=200, **kwargs):
        super().__init__(then, **kwargs)
        self.log, self.first, self.then, self.first_status = log, first, then, first_status

    body = property(lambda self: self.first if len(self.log) <= 1 else self.then, lambda self, value: None)
    status = property(lambda self: self.first_status if len(self.log) <= 1 else 200, lambda self, value: None)


def test_http_resume_sends_if_range_so_a_changed_file_comes_back_whole(tmp_path, http_server):
    """The file changed between the cut and the resume: its first half spliced to the new file's
    second half would be a corrupt image with no error. (The local server honours If-Range.)"""
    old, new = (b"\x89PNG\r\n\x1a\n" + os.urandom(200_000) for _ in range(2))
    http_server.routes["/img.png"] = ChangedAfterFirst(http_server.log, old, new, cut_first=True)
    assert fetch(http_server.url("/img.png"), tmp_path / "raw") == rows_of({"img.png": new})
    (_, first), (_, resume) = http_server.log
    validator = http_server.if_range[1]
    assert first is None and resume.startswith("bytes=") and int(resume[6:-1]) > 0  # it asked to resume
    assert validator == f'"{hashlib.md5(old).hexdigest()}"'  # ...only if the file is still the one cut


def test_http_a_range_at_another_offset_is_not_spliced_on(tmp_path, http_server):
    """Asked to resume at byte N, a server answers 206 from byte 0: appended, those bytes would
    repeat the start of the file. The part is dropped and the download starts over."""
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(200_000)

    class FromZero(Route):
        headers = property(lambda self: {"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"}
                           if len(http_server.log) == 2 else {}, lambda self, value: None)
        status = property(lambda self: 206 if len(http_server.log) == 2 else 200, lambda self, value: None)

    http_server.routes["/img.png"] = FromZero(body, ranges=False, cut_first=True)
    assert fetch(http_server.url("/img.png"), tmp_path / "raw") == rows_of({"img.png": body})
    assert [asked is not None for _, asked in http_server.log] == [False, True, False]
    assert (tmp_path / "raw" / "img.png").read_bytes() == body


@pytest.mark.parametrize("status", [408, 429])
def test_http_request_timeout_and_too_many_requests_are_retried(tmp_path, http_server, status):
    body = b"\x89PNG\r\n\x1a\n one"
    http_server.routes["/a.png"] = ChangedAfterFirst(http_server.log, b"slow down", body, first_status=status)
    assert fetch(http_server.url("/a.png"), tmp_path / "raw") == rows_of({"a.png": body})
    assert len(http_server.log) == 2


def test_http_a_served_name_too_long_for_the_disk_keeps_its_last_255_bytes(tmp_path, http_server):
    name = "x" * 296 + "-end.png"  # 304 bytes: more than most file systems take
    body = b"\x89PNG\r\n\x1a\n one"
    http_server.routes["/get"] = Route(body, headers={"Content-Disposition": f'attachment; filename="{name}"'})
    assert fetch(http_server.url("/get"), tmp_path / "raw") == rows_of({name[-255:]: body})


def test_http_gives_up_after_retries_and_leaves_nothing(tmp_path, http_server):
    http_server.routes["/down.zip"] = Route(b"x", fail_first=99)
    with pytest.raises(UserError, match="download failed after 3 tries: HTTP 503"):
        fetch(http_server.url("/down.zip"), tmp_path / "raw", retries=2)
    assert len(http_server.log) == 3
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path / "raw") == []


def test_http_client_errors_are_not_retried(tmp_path, http_server):
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(http_server.url("/nothing.zip"), tmp_path / "raw")
    assert len(http_server.log) == 1


def test_http_html_page_and_pin_mismatch_are_refused(tmp_path, http_server):
    http_server.routes["/page"] = Route(b"\n<!DOCTYPE html><html>Sign in</html>", headers={"Content-Type": "text/html"})
    with pytest.raises(UserError, match="got an HTML page"):
        fetch(http_server.url("/page"), tmp_path / "raw")
    # Saved by an editor that writes a UTF-8 byte order mark first.
    http_server.routes["/bom"] = Route(b"\xef\xbb\xbf<!DOCTYPE html><html>Sign in</html>")
    with pytest.raises(UserError, match="got an HTML page"):
        fetch(http_server.url("/bom"), tmp_path / "raw")
    http_server.routes["/set.zip"] = Route(zip_bytes())
    with pytest.raises(UserError, match="sha256 mismatch: pinned a{64}, got [0-9a-f]{64}"):
        fetch(http_server.url("/set.zip"), tmp_path / "raw", sha256="a" * 64)
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path / "raw") == []


# --- Google Drive through gdown -----------------------------------------------------------------

FILE_ID, BIG_ID, QUOTA_ID, HTML_ID = "1fileAAAAAAAAAAAAAAAAAAAAAAAA", "1bigBBBBBBBBBBBBBBBBBBBBBBBBB", "1q", "1h"
FOLDER_ID, SUB_ID = "1folderCCCCCCCCCCCCCCCCCCCCCC", "1subDDDDDDDDDDDDDDDDDDDDDDDDD"
IMG_A, IMG_B = "1imgaEEEEEEEEEEEEEEEEEEEEEEEE", "1imgbFFFFFFFFFFFFFFFFFFFFFFFF"


def drive_file(body, name):
    return Route(body, headers={"Content-Disposition": f'attachment; filename="{name}"'})


def test_gdrive_file_and_virus_scan_confirmation(tmp_path, drive_stand_in):
    routes = drive_stand_in.routes
    routes[f"/uc?id={FILE_ID}"] = drive_file(zip_bytes(), "set.zip")
    assert fetch(f"gdrive://{FILE_ID}", tmp_path / "a") == rows_of(SET)
    # Large files first get a "can't scan for viruses" page whose form gdown submits.
    routes[f"/uc?id={BIG_ID}"] = Route(
        b'<!DOCTYPE html><html><body>\n<form id="download-form" action="https://drive.usercontent.google.com/download"'
        b' method="get"><input type="hidden" name="id" value="' + BIG_ID.encode() + b'"><input type="hidden" '
        b'name="confirm" value="t"></form>\n</body></html>', headers={"Content-Type": "text/html"})
    routes[f"/download?id={BIG_ID}"] = drive_file(b"\x89PNG big", "big.png")
    assert fetch(f"gdrive://{BIG_ID}", tmp_path / "b") == rows_of({"big.png": b"\x89PNG big"})


def test_gdrive_html_pages_are_refused(tmp_path, drive_stand_in):
    drive_stand_in.routes[f"/uc?id={QUOTA_ID}"] = Route(
        b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>\n"
        b'<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently.</p>\n'
        b"</body></html>", headers={"Content-Type": "text/html"})
    with pytest.raises(UserError, match="sent an HTML page instead of the file.*Too many users"):
        fetch(f"gdrive://{QUOTA_ID}", tmp_path / "raw")
    drive_stand_in.routes[f"/uc?id={HTML_ID}"] = drive_file(b"<html><body>virus scan warning</body></html>",
                                                             "set.zip")
    with pytest.raises(UserError, match="got an HTML page"):
        fetch(f"gdrive://{HTML_ID}", tmp_path / "raw", sha256="b" * 64)
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path / "raw") == []


def folder_view(title, links):
    anchors = "".join(f'<a href="{href}">{name}</a>\n' for href, name in links)
    return Route(f"<html><head><title>{title}</title></head><body>\n{anchors}</body></html>".encode(),
                 headers={"Content-Type": "text/html; charset=utf-8"})


def test_gdrive_folder(tmp_path, drive_stand_in):
    routes = drive_stand_in.routes
    routes[f"/embeddedfolderview?id={FOLDER_ID}"] = folder_view("Sargent", [
        (f"https://drive.google.com/file/d/{IMG_A}/view?usp=drive_web", "été 1.png"),
        (f"https://drive.google.com/drive/folders/{SUB_ID}", "more")])
    routes[f"/embeddedfolderview?id={SUB_ID}"] = folder_view("more", [
        (f"https://drive.google.com/file/d/{IMG_B}/view?usp=drive_web", "b.jpg")])
    routes[f"/uc?id={IMG_A}"] = drive_file(b"\x89PNG a", "x")
    routes[f"/uc?id={IMG_B}"] = drive_file(b"\xff\xd8 b", "x")
    rows = fetch(f"gdrive://folders/{FOLDER_ID}", tmp_path / "raw")
    assert rows == rows_of({"été 1.png": b"\x89PNG a", "more/b.jpg": b"\xff\xd8 b"})


def test_gdrive_folder_names_are_checked_before_downloading(tmp_path, drive_stand_in):
    """Drive lets two files of a folder share a name: gdown alone would keep the second silently.
    Junk and case-only repeats are left out and reported, as an archive's members are."""
    routes = drive_stand_in.routes
    routes[f"/embeddedfolderview?id={FOLDER_ID}"] = folder_view("Set", [
        (f"https://drive.google.com/file/d/{IMG_A}/view", "portrait.jpg"),
        (f"https://drive.google.com/file/d/{IMG_B}/view", "Portrait.JPG"),
        (f"https://drive.google.com/file/d/{BIG_ID}/view", ".DS_Store")])
    for file_id, body in ((IMG_A, b"\xff\xd8 first"), (IMG_B, b"\xff\xd8 second"), (BIG_ID, b"\0\0\0\1Bud1")):
        routes[f"/uc?id={file_id}"] = drive_file(body, "x")
    skipped = []
    assert fetch(f"gdrive://folders/{FOLDER_ID}", tmp_path / "a", skipped=skipped) == rows_of(
        {"portrait.jpg": b"\xff\xd8 first"})
    assert [s["file"] for s in skipped] == ["Portrait.JPG", ".DS_Store"]
    assert "upper/lower case" in skipped[0]["reason"]
    assert not any(key == f"/uc?id={BIG_ID}" for key, _ in drive_stand_in.log)  # junk is not even downloaded

    routes[f"/embeddedfolderview?id={SUB_ID}"] = folder_view("Set", [
        (f"https://drive.google.com/file/d/{IMG_A}/view", "portrait.jpg"),
        (f"https://drive.google.com/file/d/{IMG_B}/view", "portrait.jpg")])
    with pytest.raises(UserError, match=f"files {IMG_A} and {IMG_B} are both named 'portrait.jpg'"):
        fetch(f"gdrive://folders/{SUB_ID}", tmp_path / "b")
    assert not (tmp_path / "b").exists() and leftovers(tmp_path / "b") == []


def test_a_stalled_drive_download_times_out(tmp_path, drive_stand_in, monkeypatch):
    """gdown waits forever by default; the stage must give up with a one-line error instead."""
    monkeypatch.setattr(sdtune.data.sources, "HTTP_TIMEOUT", (1, 0.3))
    drive_stand_in.routes[f"/uc?id={FILE_ID}"] = drive_file(zip_bytes(), "set.zip")
    drive_stand_in.routes[f"/uc?id={FILE_ID}"].stall = 1.5
    started = time.monotonic()
    with pytest.raises(UserError, match=f"gdrive://{FILE_ID}: download failed"):
        fetch(f"gdrive://{FILE_ID}", tmp_path / "raw", retries=0)
    assert time.monotonic() - started < 1.4  # gave up at the read timeout, before the server answered
    assert leftovers(tmp_path / "raw") == []


# --- Google Cloud Storage through the emulator ----------------------------------------------------

def test_gcs_prefix_single_object_and_errors(tmp_path, gcs_emulator):
    bucket = gcs_emulator.create_bucket("art")
    for name, data in {**SET, ".DS_Store": b"junk"}.items():
        bucket.blob(f"raw/sargent/{name}").upload_from_string(data)
    bucket.blob("raw/sargent-extra/not-me.png").upload_from_string(b"no")
    bucket.blob("archives/set.zip").upload_from_string(zip_bytes())
    skipped = []
    assert fetch("gs://art/raw/sargent", tmp_path / "a", skipped=skipped) == rows_of(SET)
    assert skipped == [{"file": ".DS_Store", "reason": "macOS/Windows metadata"}]
    assert fetch("gs://art/archives/set.zip", tmp_path / "b") == rows_of(SET)
    with pytest.raises(UserError, match="gs://art/nothing: no objects under this prefix"):
        fetch("gs://art/nothing", tmp_path / "c")
    with pytest.raises(UserError, match="gs://missing-bucket/x: bucket .missing-bucket. not found"):
        fetch("gs://missing-bucket/x", tmp_path / "c")
    for name in ("junk/.DS_Store", "junk/__MACOSX/._a.png", "dots/."):
        bucket.blob(name).upload_from_string(b"junk")
    for prefix in ("junk", "dots"):  # objects, none of them a file to keep
        with pytest.raises(UserError, match="no files"):
            fetch(f"gs://art/{prefix}", tmp_path / "c")
    assert leftovers(tmp_path / "c") == []


@pytest.mark.parametrize("objects,message", [
    (["raw/a", "raw/a/b.png"], "object 'raw/a/b.png' clashes with 'raw/a': one would be a file and the other a folder"),
    (["raw/a", "raw/a/deeper/b.png"], "object 'raw/a/deeper/b.png' clashes with 'raw/a'"),
    (["raw/x//b.png", "raw/x/b.png"], "objects 'raw/x//b.png' and 'raw/x/b.png' both land at 'x/b.png'"),
])
def test_gcs_objects_that_clash_on_disk_are_a_user_error(tmp_path, gcs_emulator, objects, message):
    bucket = gcs_emulator.create_bucket("clash")
    for name in objects:
        bucket.blob(name).upload_from_string(b"\x89PNG")
    with pytest.raises(UserError, match=f"^gs://clash: {re.escape(message)}") as err:
        fetch("gs://clash/raw", tmp_path / "raw")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path / "raw") == []

def test_gcs_without_credentials_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no probe of the metadata server
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="no Google Application Default Credentials"):
        fetch("gs://art/raw", tmp_path / "raw")


def test_http_a_signed_urls_secrets_stay_out_of_messages_and_a_killed_download_is_removed(
        tmp_path, http_server, capsys):
    """requests quotes the URL's path and query in its errors, and fetch quoted the URL: a signed
    URL's signature was in every retry line and error. A SIGKILL left the download folder (a whole
    archive, perhaps) beside data/raw, and no later fetch removed it."""
    from fixtures_data import free_port

    left = tmp_path / ".raw.k2x9ab_1.download"
    left.mkdir()
    (left / "download.part").write_bytes(b"x" * 1000)
    http_server.routes["/down.zip"] = Route(b"x", fail_first=99)
    secret = "?X-Goog-Signature=SIGNEDSECRET&X-Goog-Expires=60"
    signed = http_server.url("/down.zip" + secret).replace("http://", "http://someone:PASSWORDSECRET@")
    with pytest.raises(UserError) as err:
        fetch(signed, tmp_path / "raw", retries=1)
    closed = f"http://127.0.0.1:{free_port()}/gone.zip{secret}"  # nothing listens: requests' own message
    with pytest.raises(UserError) as refused:
        fetch(closed, tmp_path / "raw", retries=0)
    said = str(err.value) + str(refused.value) + "".join(capsys.readouterr())
    assert "try 1/2 failed: HTTP 503" in said and "X-Goog-Signature=***" in said and "gone.zip" in said
    assert "SIGNEDSECRET" not in said and "PASSWORDSECRET" not in said
    assert not left.exists() and leftovers(tmp_path / "raw") == []
