"""io.atomic_path: a file never replaces a folder; folders still replace folders."""

import pytest

from sdtune import io
from sdtune.errors import UserError


def test_a_file_is_not_written_over_a_folder_and_the_folder_is_kept(tmp_path):
    dest = tmp_path / "out.png"
    dest.mkdir()
    (dest / "work.txt").write_text("someone's work")
    with pytest.raises(UserError) as err:
        io.write_bytes(dest, b"an image")
    assert str(err.value) == (f"{dest}: a folder is there, where a file is to be written; move it away or choose "
                              f"another name (the folder is kept)")
    assert (dest / "work.txt").read_text() == "someone's work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left beside it


def test_a_folder_still_replaces_a_folder(tmp_path):
    """What the stages rely on: models/lora/, checkpoints, the profile's folders are made anew."""
    dest = tmp_path / "lora"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with io.atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_a_damaged_json_input_is_one_line_naming_the_file(tmp_path):
    """A truncated reports/quantize.json was a JSONDecodeError traceback in evaluate; a cache
    index of {} a KeyError in train."""
    cut = tmp_path / "quantize.json"
    cut.write_text('{"variants": {"bf16-fus')
    with pytest.raises(UserError, match=r"quantize.json: not valid JSON \(Unterminated string .*\); run the stage "
                                         r"that writes it again \(dvc repro -f <stage>\)$"):
        io.read_json(cut)
    empty = tmp_path / "index.json"
    empty.write_text("{}")
    assert io.read_json(empty) == {}
    with pytest.raises(UserError, match=r"index.json: expected a JSON object with 'items'; run the stage"):
        io.read_json(empty, required=("items",))
    rows = tmp_path / "captions.jsonl"
    rows.write_text('{"file": "a.png"}\n\n{"file": "b.p\n')
    with pytest.raises(UserError, match=r"captions.jsonl: line 3 is not valid JSON"):
        io.read_jsonl(rows)
    rows.write_bytes(b'{"file": "caf\xe9.png"}\n')
    with pytest.raises(UserError, match=r"captions.jsonl: not valid UTF-8"):
        io.read_jsonl(rows)


def test_what_a_killed_writer_left_is_removed_by_the_next_write_of_the_same_output(tmp_path):
    """A SIGKILL leaves atomic_path's temporary (a whole dataset for data/raw) and nothing removed
    it; a temporary of another output is left alone."""
    mine = tmp_path / ".raw.k2x9ab_1.tmp"
    (mine / "sub").mkdir(parents=True)
    (tmp_path / ".raw.zz99yy88.tmp").write_bytes(b"half a file")
    theirs = tmp_path / ".raw.json.k2x9ab_1.tmp"  # data/raw.json's, not data/raw's
    theirs.write_bytes(b"x")
    with io.atomic_path(tmp_path / "raw") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".raw.json.k2x9ab_1.tmp", "raw"]


def test_an_interrupt_between_the_two_renames_of_a_folder_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    """Ctrl-C after the old folder was moved aside and before the new one took its place left no
    folder at all, the old one hidden in .raw.old, which no later run restored."""
    import os

    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "a.png").write_bytes(b"old")
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "b.png").write_bytes(b"new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"] and os.listdir(dest) == ["a.png"]

    # A SIGKILL in the same place (no except clause runs): the next write of it brings the folder back
    os.replace(dest, tmp_path / ".raw.old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(dest):
            assert os.listdir(dest) == ["a.png"]
            raise RuntimeError("the new fetch failed too")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"] and os.listdir(dest) == ["a.png"]


def test_a_full_disk_is_one_line_naming_the_file_and_a_bug_keeps_its_traceback(capsys):
    """A stage writing onto a full disk ended in 20 lines of traceback (a folder copy's
    shutil.Error in 29, listing every file)."""
    import os
    import shutil

    from sdtune.errors import main_guard

    @main_guard
    def write_to_a_full_disk():
        with open("/dev/full", "wb") as f:  # the kernel's always-full device: a real ENOSPC
            f.write(b"x" * 10)

    @main_guard
    def copy_a_folder_onto_a_full_disk():
        raise shutil.Error([("data/raw/a.png", "data/.raw.x/a.png", "[Errno 28] No space left on device"),
                            ("data/raw/b.png", "data/.raw.x/b.png", "[Errno 28] No space left on device")])

    @main_guard
    def a_bug():
        os.rmdir("/nonexistent/folder")

    for stage, where in [(write_to_a_full_disk, ""), (copy_a_folder_onto_a_full_disk, "data/.raw.x/a.png: ")]:
        with pytest.raises(SystemExit) as done:
            stage()
        assert done.value.code == 2
        assert capsys.readouterr().err == (f"error: {where}No space left on device; free some space and run it "
                                           f"again (the outputs before are kept)\n")
    with pytest.raises(FileNotFoundError):
        a_bug()


def test_a_nan_is_refused_not_written_as_json_dvc_cannot_read(tmp_path):
    with pytest.raises(ValueError):
        io.write_json(tmp_path / "eval.json", {"fid": float("nan")})
    assert not (tmp_path / "eval.json").exists()
