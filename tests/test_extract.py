"""Safe extraction: real archives on disk, well-formed and hostile."""

import io
import random
import stat
import tarfile
import zipfile

import pytest

from sdtune.data.extract import archive_kind, extract, safe_relpath
from sdtune.errors import UserError

LIMITS = {"max_bytes": 10**6, "max_files": 100}
GOOD = {
    "set/a painting.png": b"\x89PNG fake one",
    "set/ünïcødé/été 2.jpg": b"\xff\xd8 fake two",
    "set/a painting.txt": b"a caption\n",
}
JUNK = {"__MACOSX/set/._a painting.png": b"apple", "set/.DS_Store": b"finder", "set/._x.png": b"apple"}


def make_tar(path, members, mode="w"):
    """members: name -> bytes, or name -> TarInfo field overrides (for links, devices...)."""
    with tarfile.open(path, mode) as tf:
        for name, spec in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(spec, bytes):
                info.size = len(spec)
                tf.addfile(info, io.BytesIO(spec))
            else:
                for key, value in spec.items():
                    setattr(info, key, value)
                tf.addfile(info)
    return path


def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, b"/etc/passwd")
            else:
                zf.writestr(name, data)
    return path


def files_in(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz"),
                                         (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz"), (".zip", None)])
def test_extracts_every_format_with_unicode_names_and_drops_junk(tmp_path, suffix, mode):
    members = {**GOOD, **JUNK, "./": {"type": tarfile.DIRTYPE}} if mode else {**GOOD, **JUNK}
    path = tmp_path / f"set{suffix}"
    make_tar(path, members, mode) if mode else make_zip(path, members)
    skipped = extract(path, tmp_path / "out", **LIMITS)
    assert files_in(tmp_path / "out") == GOOD
    assert sorted(s["file"] for s in skipped) == sorted(JUNK)
    assert archive_kind(path) == ("tar" if mode else "zip")


def _dos_folder(name):
    """A folder entry as some Windows tools write it: a backslash name and the MS-DOS attribute."""
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = 0, 0x10
    return info


def test_windows_backslash_names_become_folders(tmp_path):
    path = tmp_path / "win.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(_dos_folder("set\\"), b"")
        zf.writestr("set\\one.png", b"x")
        zf.writestr(_dos_folder("set\\empty\\"), b"")
        zf.writestr(_dos_folder("set\\no separator"), b"")  # the attribute alone marks it
    extract(path, tmp_path / "out", **LIMITS)
    assert files_in(tmp_path / "out") == {"set/one.png": b"x"}
    assert (tmp_path / "out/set/empty").is_dir() and (tmp_path / "out/set/no separator").is_dir()


def _zip_link():
    info = zipfile.ZipInfo("set/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _zip_fifo():
    info = zipfile.ZipInfo("set/pipe")
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info


TAR_ATTACKS = [
    ("../evil.png", b"x", "outside the target folder"),
    ("set/../../evil.png", b"x", "outside the target folder"),
    ("/etc/evil.png", b"x", "absolute path"),
    # The kind as the refusal names it: "links and special files" is in every such refusal.
    ("set/link.png", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "is a link to '/etc/passwd';"),
    ("set/inside-link.png", {"type": tarfile.SYMTYPE, "linkname": "a painting.png"}, "is a link to 'a painting.png';"),
    ("set/hard.png", {"type": tarfile.LNKTYPE, "linkname": "../../etc/passwd"}, "is a link to '../../etc/passwd';"),
    ("set/pipe", {"type": tarfile.FIFOTYPE}, "is a FIFO;"),
    ("set/tty", {"type": tarfile.CHRTYPE, "devmajor": 4, "devminor": 1}, "is a device file;"),
]
ZIP_ATTACKS = [
    ("../evil.png", b"x", "outside the target folder"),
    ("..\\..\\evil.png", b"x", "outside the target folder"),
    ("/etc/evil.png", b"x", "absolute path"),
    ("C:\\Windows\\evil.png", b"x", "absolute path"),
    ("C:/evil.png", b"x", "absolute path"),
    ("set/link.png", _zip_link(), "is a link;"),
    ("set/pipe", _zip_fifo(), "is a device file or FIFO;"),
]


@pytest.mark.parametrize("name,spec,problem", TAR_ATTACKS, ids=[a[0] for a in TAR_ATTACKS])
def test_hostile_tar_is_refused_before_writing_anything(tmp_path, name, spec, problem):
    path = make_tar(tmp_path / "bad.tar.gz", {**GOOD, name: spec}, "w:gz")
    with pytest.raises(UserError, match=problem) as err:
        extract(path, tmp_path / "out", **LIMITS)
    assert repr(name) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == {}
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("name,spec,problem", ZIP_ATTACKS, ids=[a[0] for a in ZIP_ATTACKS])
def test_hostile_zip_is_refused_before_writing_anything(tmp_path, name, spec, problem):
    path = make_zip(tmp_path / "bad.zip", {**GOOD, name: spec})
    with pytest.raises(UserError, match=problem) as err:
        extract(path, tmp_path / "out", **LIMITS)
    assert repr(name) in str(err.value)
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == {}


def test_bomb_is_refused_by_size_before_extraction(tmp_path):
    path = make_zip(tmp_path / "bomb.zip", {"zeros.png": bytes(5 * 10**6)})
    assert path.stat().st_size < 10**5  # compresses ~1000:1
    with pytest.raises(UserError, match=r"5000000 bytes uncompressed exceed max_archive_bytes=1000000"):
        extract(path, tmp_path / "out", **LIMITS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_too_many_members_is_refused(tmp_path, kind):
    members = {f"f{i}.txt": b"x" for i in range(101)}
    path = make_tar(tmp_path / "many.tar", members) if kind == "tar" else make_zip(tmp_path / "many.zip", members)
    with pytest.raises(UserError, match="more than max_archive_files=100 members; refusing the archive"):
        extract(path, tmp_path / "out", **LIMITS)
    assert not (tmp_path / "out").exists()


def test_a_tar_of_too_many_members_is_refused_before_it_is_read_to_the_end(tmp_path, monkeypatch):
    """A tar lists its members only by being read: the count stops at the limit, not after a list
    of millions (a bomb of empty members fills memory with their headers)."""
    path = make_tar(tmp_path / "many.tar", {f"f{i}.txt": b"x" for i in range(1000)})
    read, real_next = [], tarfile.TarFile.next

    def next_member(self):
        read.append(1)
        return real_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", next_member)
    with pytest.raises(UserError, match="more than max_archive_files=100 members"):
        extract(path, tmp_path / "out", **LIMITS)
    assert len(read) < 150  # about the first 101 headers (and the probes that tell a tar), not 1000


def test_truncated_archive_is_a_user_error(tmp_path):
    path = make_tar(tmp_path / "t.tar.gz", {"a.png": bytes(range(256)) * 4000}, "w:gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        extract(path, tmp_path / "out", **LIMITS)


def test_misnamed_archive_and_plain_files(tmp_path):
    fake = tmp_path / "data.zip"
    fake.write_bytes(b"not an archive")
    with pytest.raises(UserError, match="named like an archive"):
        archive_kind(fake)
    image = tmp_path / "one.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))
    assert archive_kind(image) is None


def test_safe_relpath_normalises():
    assert safe_relpath("./a//b/./c.png", "x") == "a/b/c.png"
    assert safe_relpath("./", "x") is None
    with pytest.raises(UserError, match="NUL"):
        safe_relpath("a\x00b", "x")


def test_name_that_is_not_utf8_is_refused(tmp_path):
    name = b"set/caf\xe9.png".decode("utf-8", "surrogateescape")  # a Latin-1 name from an old tool
    path = tmp_path / "latin1.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        extract(path, tmp_path / "out", **LIMITS)


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2"])
def test_flipped_bit_in_a_compressed_tar_is_a_user_error(tmp_path, mode):
    # Incompressible data is stored nearly as is, so a flipped bit decodes to a different image;
    # only the stream's checksum (gzip's at its very end) can tell. bz2 level 1: 100 kB blocks,
    # so the damage is in a later block than the first header.
    path = tmp_path / "one.tar"
    data = random.Random(0).randbytes(300_000)
    with tarfile.open(path, mode, **({"compresslevel": 1} if mode == "w:bz2" else {})) as tf:
        info = tarfile.TarInfo("set/a.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    raw[len(raw) * 3 // 4] ^= 0x10
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"one.tar: corrupt or truncated archive \(.+\)$") as err:
        extract(path, tmp_path / "out", **LIMITS)
    assert "\n" not in str(err.value)


def _zip_with_repeats(path, names):
    with zipfile.ZipFile(path, "w") as zf:  # writestr warns on a repeated name but writes it
        for i, name in enumerate(names):
            zf.writestr(name, f"content {i}".encode())
    return path


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("first,second", [("set/a.png", "set/a.png"), ("./set/b.png", "set//b.png")])
def test_members_extracting_to_the_same_file_are_refused(tmp_path, first, second):
    path = _zip_with_repeats(tmp_path / "twice.zip", ["set/ok.png", first, second])
    with pytest.raises(UserError, match="both extract to") as err:
        extract(path, tmp_path / "out", **LIMITS)
    assert f"members {first!r} and {second!r}" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before writing


def test_tar_member_repeated_is_refused(tmp_path):
    path = tmp_path / "twice.tar"
    with tarfile.open(path, "w") as tf:
        for data in (b"old", b"new"):  # what `tar -r` leaves when a file is added again
            info = tarfile.TarInfo("set/a.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="'set/a.png' and 'set/a.png' both extract to 'set/a.png'"):
        extract(path, tmp_path / "out", **LIMITS)


def test_names_equal_but_for_case_keep_the_first_and_report_the_rest(tmp_path):
    path = _zip_with_repeats(tmp_path / "case.zip", ["set/A.jpg", "set/a.jpg", "SET/A.JPG", "set/b.jpg"])
    skipped = extract(path, tmp_path / "out", **LIMITS)
    assert files_in(tmp_path / "out") == {"set/A.jpg": b"content 0", "set/b.jpg": b"content 3"}
    assert [s["file"] for s in skipped] == ["set/a.jpg", "SET/A.JPG"]
    assert all("same name as 'set/A.jpg' but for upper/lower case" in s["reason"] for s in skipped)


def test_names_equal_but_for_unicode_composition_keep_the_first(tmp_path):
    """café.png with é as one code point and as e + U+0301 (how macOS writes names): two files on
    Linux, one on a Mac; both were extracted."""
    composed, decomposed = "set/caf\u00e9.png", "set/cafe\u0301.png"
    path = _zip_with_repeats(tmp_path / "nfd.zip", [composed, decomposed])
    skipped = extract(path, tmp_path / "out", **LIMITS)
    assert files_in(tmp_path / "out") == {composed: b"content 0"}
    assert [s["file"] for s in skipped] == [decomposed] and "Unicode composition" in skipped[0]["reason"]
