"""fetch + caption as stages, on a folder mixing good images with broken ones."""

import json
import os
import subprocess
import sys

from PIL import Image

from conftest import OFFLINE, ROOT


def stage(name, cwd):
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})


def test_messy_folder_keeps_every_good_image_and_names_every_bad_one(tmp_path):
    src = tmp_path / "scraped"
    src.mkdir()
    for name in ["good one.png", "ÉTUDE.JPG", "third.webp"]:
        Image.new("RGB", (80, 64), (200, 120, 40)).save(src / name, format=name.rsplit(".", 1)[1].upper().replace("JPG", "JPEG"))
    (src / "good one.txt").write_text("a sidecar caption\n")
    (src / "quota.jpg").write_text("<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>")
    (src / "empty.png").write_bytes(b"")
    Image.new("RGB", (80, 64), "blue").save(src / "cut.png")
    (src / "cut.png").write_bytes((src / "cut.png").read_bytes()[:60])
    (src / "z copy.png").write_bytes((src / "good one.png").read_bytes())
    Image.new("RGB", (8, 8)).save(src / "tiny.png")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(f"""
data: {{source: "{src}", too_small: skip}}
caption: {{model: tiny, template: "a painting by sargent, {{caption}}"}}
model: {{id: tiny, resolution: 32}}
""")
    before = set(os.listdir(tmp_path))
    fetched = stage("fetch", ws)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    captioned = stage("caption", ws)
    assert captioned.returncode == 0, captioned.stderr[-2000:]
    assert "Traceback" not in fetched.stderr + captioned.stderr
    assert "skipped 5" in captioned.stdout

    report = json.loads((ws / "reports/data.json").read_text())
    verdicts = {v["file"]: v for v in report["files"]}
    assert {f for f, v in verdicts.items() if v["status"] == "kept"} == {"good one.png", "ÉTUDE.JPG", "third.webp"}
    reasons = {f: v["reason"] for f, v in verdicts.items() if v["status"] != "kept"}
    assert "HTML" in reasons["quota.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "truncated" in reasons["cut.png"] or "corrupt" in reasons["cut.png"]
    assert "duplicate" in reasons["z copy.png"] and "good one.png" in reasons["z copy.png"]
    assert "small" in reasons["tiny.png"]

    rows = [json.loads(line) for line in (ws / "data/captions.jsonl").read_text().splitlines()]
    by_file = {r["file"]: r for r in rows}
    assert by_file["good one.png"]["caption"] == "a painting by sargent, a sidecar caption"
    assert by_file["good one.png"]["how"] == "sidecar"
    assert by_file["third.webp"]["how"] == "model" and by_file["third.webp"]["model"] == "tiny"
    assert Image.open(ws / "reports/captions.png").format == "PNG"
    # Nothing written outside the workspace's data/ and reports/.
    assert set(os.listdir(tmp_path)) == before
    assert set(os.listdir(ws)) == {"params.yaml", "data", "reports"}


def test_nothing_usable_is_one_clear_error(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_text("not an image")
    (tmp_path / "params.yaml").write_text(f'data: {{source: "{src}"}}\ncaption: {{model: tiny}}\nmodel: {{id: tiny, resolution: 32}}\n')
    assert stage("fetch", tmp_path).returncode == 0
    done = stage("caption", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: data/raw: no usable image among 1 files; reasons in reports/data.json"


def test_cache_keys_name_the_dtype_the_encoders_ran_in():
    """A cache built on a CPU (float32 encoders) is not reused on a GPU (bf16 encoders): other latents."""
    import torch

    from sdtune import params as params_lib
    from sdtune.data import cache
    from sdtune.families import sd

    p = params_lib.parse({"model": {"id": "tiny", "resolution": 64}})
    row = {"file": "a.png", "sha256": "0" * 64, "caption": "a picture"}
    code = cache.encoder_code(sd)
    cpu, gpu = (cache.item_key(row, p.model, p.cache, dtype, code) for dtype in (torch.float32, torch.bfloat16))
    assert cpu != gpu
    assert cpu == cache.item_key(row, p.model, p.cache, torch.float32, code)


def test_evaluate_reads_the_real_images_under_the_params_pixel_limit(tmp_path, monkeypatch):
    """The evaluate stage reads data/raw with data.max_pixels, as the caption stage checked it,
    not with the built-in default."""
    import pytest

    from sdtune import params as params_lib
    from sdtune.errors import UserError
    from stages import evaluate

    (tmp_path / "data/raw").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "data/raw/a.png")
    (tmp_path / "data/captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "red"}) + "\n")
    monkeypatch.chdir(tmp_path)
    roomy = params_lib.parse({"model": {"id": "tiny", "resolution": 32}})
    assert evaluate.real_images(roomy)[0].shape == (3, 32, 32)
    tight = params_lib.parse({"model": {"id": "tiny", "resolution": 32}, "data": {"max_pixels": 1000}})
    with pytest.raises(UserError, match="max_pixels 1,000"):
        evaluate.real_images(tight)
