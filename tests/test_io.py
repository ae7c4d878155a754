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
