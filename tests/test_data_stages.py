"""fetch + caption as stages, on a folder mixing good images with broken ones."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import OFFLINE, ROOT, hub_snapshot


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
    Image.new("RGB", (80, 64)).save(tmp_path / "outside.png")
    (src / "elsewhere.png").symlink_to(tmp_path / "outside.png")  # leaves the source: fetch skips it
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
    assert f"DVC does not watch {src}; after changing its files, run `dvc repro -f fetch && dvc repro`" in fetched.stdout
    captioned = stage("caption", ws)
    assert captioned.returncode == 0, captioned.stderr[-2000:]
    assert "Traceback" not in fetched.stderr + captioned.stderr
    assert "skipped 5" in captioned.stdout
    # What fetch left out is in the manifest, with why (the stdout only counts it).
    manifest = json.loads((ws / "data/raw.manifest.json").read_text())
    assert [entry["file"] for entry in manifest["skipped"]] == ["elsewhere.png"]
    assert "outside the source folder" in manifest["skipped"][0]["reason"]
    assert "left out 1 (reasons in data/raw.manifest.json)" in fetched.stdout

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


def test_caption_stage_checks_images_against_the_params_pixel_limit_and_buckets(tmp_path):
    """data.max_pixels and cache.buckets reach the image checks: a 100 x 24 strip fits its
    40 x 16 bucket at resolution 32 (square crops would skip it as too small), and an image over
    the user's pixel limit is skipped there rather than failing the cache stage later."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (100, 24), (10, 200, 10)).save(src / "strip.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(src / "square.png")
    Image.new("RGB", (80, 80), (10, 10, 200)).save(src / "large.png")
    (tmp_path / "params.yaml").write_text(f"""
data: {{source: "{src}", too_small: skip, max_pixels: 5000}}
caption: {{model: tiny}}
model: {{id: tiny, resolution: 32}}
cache: {{buckets: true, bucket_step: 8}}
""")
    assert stage("fetch", tmp_path).returncode == 0
    captioned = stage("caption", tmp_path)
    assert captioned.returncode == 0, captioned.stderr[-2000:]
    verdicts = {v["file"]: v for v in json.loads((tmp_path / "reports/data.json").read_text())["files"]}
    assert verdicts["strip.png"]["status"] == "kept" and verdicts["square.png"]["status"] == "kept"
    assert verdicts["large.png"]["status"] == "skipped" and "max_pixels 5,000" in verdicts["large.png"]["reason"]

    # A failure while captioning (here the captioner cannot load) keeps data.json and the captions a
    # pair: data.json was rewritten first, for the new limit, beside the old captions.
    before = {f: (tmp_path / f).read_bytes() for f in ("reports/data.json", "data/captions.jsonl")}
    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("max_pixels: 5000", "max_pixels: 4096").replace(
        "model: tiny}", "model: nonexistent/captioner}"))
    failed = stage("caption", tmp_path)
    assert failed.returncode == 2 and "nonexistent/captioner" in failed.stderr
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_cache_stage_reads_images_under_the_params_pixel_limit(tmp_path):
    """An image listed in captions.jsonl but over data.max_pixels (lowered since the caption stage
    ran) is refused by the cache stage too, in one line, not decoded."""
    (tmp_path / "data/raw").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "data/raw/a.png")
    row = {"file": "a.png", "sha256": "0" * 64, "caption": "a red picture"}
    (tmp_path / "data/captions.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "params.yaml").write_text("data: {max_pixels: 3071}\nmodel: {id: tiny, resolution: 32}\n")
    done = stage("cache", tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "max_pixels 3,071" in done.stderr.strip().splitlines()[-1]


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
    cpu, gpu = (cache.item_key(row, p.model, p.cache, dtype, code, "tiny") for dtype in (torch.float32, torch.bfloat16))
    assert cpu != gpu
    assert cpu == cache.item_key(row, p.model, p.cache, torch.float32, code, "tiny")


@pytest.mark.parametrize("model, cache_params, row, changes", [
    ({}, {}, {"caption": "another picture"}, True),
    ({}, {}, {"sha256": "1" * 64}, True),
    ({"resolution": 32}, {}, {}, True),
    ({}, {"center_crop": False}, {}, True),
    ({}, {"dtype": "bfloat16"}, {}, True),
    ({}, {"buckets": True}, {}, True),
    # The prediction type is the train stage's target; the latents and embeddings are the same.
    ({"prediction_type": "v_prediction"}, {}, {}, False),
])
def test_cache_keys_change_exactly_with_what_is_encoded(model, cache_params, row, changes):
    import torch

    from sdtune import params as params_lib
    from sdtune.data import cache
    from sdtune.families import sd

    code = cache.encoder_code(sd)
    base_row = {"file": "a.png", "sha256": "0" * 64, "caption": "a picture"}

    def key(model_keys, cache_keys, row_keys):
        p = params_lib.parse({"model": {"id": "tiny", "resolution": 64, **model_keys}, "cache": cache_keys})
        return cache.item_key({**base_row, **row_keys}, p.model, p.cache, torch.float32, code, "tiny")

    assert (key(model, cache_params, row) != key({}, {}, {})) == changes



def test_every_cache_param_in_the_key_is_one_the_train_stage_checks():
    """The train stage refuses a cache built with other params by index.json's settings: a param that
    changes the items' keys but not the settings would slip past that check."""
    import typing

    import torch

    from sdtune import params as params_lib
    from sdtune.data import cache

    p = params_lib.parse({"model": {"id": "tiny", "resolution": 64}})
    row = {"file": "a.png", "sha256": "0" * 64, "caption": "a picture"}
    base = cache.item_key(row, p.model, p.cache, torch.float32, "code", "tiny")
    varied = 0
    for section in ("model", "cache"):
        fields = type(getattr(p, section)).model_fields
        for key, info in fields.items():
            value = getattr(getattr(p, section), key)
            choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
            change = {bool: lambda v: [not v], int: lambda v: [v + 16], str: lambda v: ["other"]}.get(type(value))
            others = [c for c in choices if c != value] or (change(value) if change else [])
            field = f"{section}.{key}"
            if not others:
                continue  # None-valued keys: the test above sets them
            raw = {"model": {"id": "tiny", "resolution": 64}}
            raw[section] = raw.get(section, {}) | {key: others[0]}
            q = params_lib.parse(raw)
            varied += 1
            if cache.item_key(row, q.model, q.cache, torch.float32, "code", "tiny") != base:
                assert cache.settings(q.model, q.cache) != cache.settings(p.model, p.cache), field
    assert varied >= 8


def test_cache_keys_follow_the_image_reader_and_the_libraries_that_make_the_pixels(tmp_path, monkeypatch):
    """An edit to images.py (how images are decoded, rotated, converted) or another Pillow (its
    Lanczos filter) gives the VAE other pixels, another `tokenizers` other token ids: every item
    must be re-encoded."""
    import shutil

    from sdtune import io
    from sdtune.data import cache, images
    from sdtune.families import sd

    first = cache.encoder_code(sd)
    copy = tmp_path / "images.py"
    shutil.copy(images.__file__, copy)
    monkeypatch.setattr(images, "__file__", str(copy))
    assert cache.encoder_code(sd) == first
    copy.write_text(copy.read_text() + "\n# an edit\n")
    assert cache.encoder_code(sd) != first
    monkeypatch.undo()

    assert cache.encoder_code(sd) == first
    # transformers' CLIP and T5 tokenizers are `tokenizers` objects: its version makes the token ids
    for dist in ["pillow", "tokenizers"]:
        monkeypatch.setattr(io, "library_version", lambda d, real=io.library_version, upgraded=dist:
                            real(d) + ".post1" if d == upgraded else real(d))
        assert cache.encoder_code(sd) != first, dist
        monkeypatch.undo()


def test_cache_keys_follow_the_commit_a_branch_points_to(tmp_path, monkeypatch):
    """revision: main is resolved to its commit (here from the offline Hub cache), so a moved
    branch re-encodes; so does a local model folder whose files changed."""
    import pytest
    import torch
    from huggingface_hub import constants

    from sdtune import params as params_lib
    from sdtune.data import cache
    from sdtune.errors import UserError
    from sdtune.families import common, sd

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    p = params_lib.parse({"model": {"id": "org/model", "revision": "main"}})
    row = {"file": "a.png", "sha256": "0" * 64, "caption": "a picture"}
    code = cache.encoder_code(sd)

    def key():
        return cache.item_key(row, p.model, p.cache, torch.float32, code, common.resolved_revision(p.model))

    hub_snapshot(tmp_path / "hub", "org/model", "main", "a" * 40)
    assert common.resolved_revision(p.model) == "a" * 40
    first = key()
    hub_snapshot(tmp_path / "hub", "org/model", "main", "b" * 40)  # main moved
    assert key() != first

    local = tmp_path / "weights"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "w.safetensors").write_bytes(b"x" * 10)
    p = params_lib.parse({"model": {"id": str(local)}})
    first = key()
    assert key() == first
    (local / "unet" / "w.safetensors").write_bytes(b"y" * 11)
    assert key() != first
    # Rewritten in place at the same size (a re-saved checkpoint): the modification time tells.
    weights = local / "unet" / "w.safetensors"
    second, before = key(), weights.stat().st_mtime_ns
    weights.write_bytes(b"z" * 11)
    os.utime(weights, ns=(before + 10**9, before + 10**9))  # a second later, whatever the clock's grain
    assert key() != second

    p = params_lib.parse({"model": {"id": "org/not-downloaded"}})
    with pytest.raises(UserError, match="^model.id: could not load 'org/not-downloaded' at revision 'main'"):
        common.resolved_revision(p.model)


def test_a_models_revision_follows_linked_folders_leaves_out_the_denoiser_and_covers_the_tiny_tokenizer(
        tmp_path, monkeypatch):
    """What keys the cache: a VAE folder that is a link to another folder is another model (a link
    back up adds nothing); the UNet, which the cache never loads, is not (the cache stage passes
    skip="unet"); the tiny models' tokenizer, the one file of theirs that is not code, is."""
    import shutil

    from sdtune import params as params_lib
    from sdtune.families import common

    local = tmp_path / "weights"
    for name, data in [("vae_a", b"a"), ("vae_b", b"bb"), ("unet", b"u")]:
        (local / name).mkdir(parents=True)
        (local / name / "w.safetensors").write_bytes(data)
    (local / "vae").symlink_to("vae_a", target_is_directory=True)
    model = params_lib.parse({"model": {"id": str(local)}}).model
    first = common.resolved_revision(model, skip="unet")
    (local / "unet" / "w.safetensors").write_bytes(b"uu")
    assert common.resolved_revision(model, skip="unet") == first
    (local / "vae").unlink()
    (local / "vae").symlink_to("vae_b", target_is_directory=True)
    second = common.resolved_revision(model, skip="unet")
    assert second != first
    for name in "ab":  # links back up: each folder is walked once (two such links were 2^40 walks)
        (local / "vae_b" / name).symlink_to("..", target_is_directory=True)
    assert common.resolved_revision(model, skip="unet") == second

    tiny = params_lib.parse({"model": {"id": "tiny"}}).model
    shutil.copytree(common.ASSETS, tmp_path / "assets")
    monkeypatch.setattr(common, "ASSETS", tmp_path / "assets")
    first = common.resolved_revision(tiny)
    vocab = tmp_path / "assets" / "clip-tokenizer" / "vocab.json"
    ids = json.loads(vocab.read_text())
    ids["a"], ids["b"] = ids["b"], ids["a"]  # two tokens swapped: other embeddings for "a" and "b"
    vocab.write_text(json.dumps(ids))
    assert common.resolved_revision(tiny) != first


def test_prepare_resizes_only_the_crop_centred_or_from_the_left_edge(tmp_path, monkeypatch):
    """A thin strip does not become a huge intermediate (8 x 3000 at 512 was 512 x 192000), and
    the pixels are those of resizing the whole image and cropping it."""
    import numpy as np
    from PIL import Image

    from sdtune.data import cache

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (3000, 8, 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    smooth = np.linspace(0, 255, 300)[None, :, None] * np.ones((200, 1, 3)) + rng.normal(0, 8, (200, 300, 3))
    Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(tmp_path / "wide.png")

    sizes, resize = [], Image.Image.resize

    def recording(im, size, *args, **kwargs):
        sizes.append(size)
        return resize(im, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    pixels, meta = cache.prepare(tmp_path / "strip.png", 512, True)
    assert pixels.shape == (3, 512, 512) and max(w * h for w, h in sizes) == 512 * 512

    pixels, meta = cache.prepare(tmp_path / "wide.png", 128, True)
    whole = resize(Image.open(tmp_path / "wide.png").convert("RGB"), (192, 128), Image.Resampling.LANCZOS)
    expected = np.asarray(whole.crop((32, 0, 160, 128)), dtype=np.float32) / 127.5 - 1
    assert meta == {"original_size": (200, 300), "crop_top_left": (0, 32)}
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1.5 / 127.5)

    # center_crop: false keeps the left edge: the crop starts at 0, not (192 - 128) / 2.
    pixels, meta = cache.prepare(tmp_path / "wide.png", 128, False)
    expected = np.asarray(whole.crop((0, 0, 128, 128)), dtype=np.float32) / 127.5 - 1
    assert meta == {"original_size": (200, 300), "crop_top_left": (0, 0)}
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1.5 / 127.5)


def test_evaluate_refuses_fewer_than_two_images_before_loading_anything(tmp_path):
    (tmp_path / "one.txt").write_text("a single prompt\n")
    (tmp_path / "params.yaml").write_text("model: {id: tiny, resolution: 32}\n"
                                          "evaluate: {prompts: one.txt, seeds: [0], clip_model: tiny}\n")
    out = stage("evaluate", tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: evaluate: FID and KID need at least 2 images per variant; one.txt has 1 prompt(s) "
        "and evaluate.seeds 1 seed(s)")
    assert not (tmp_path / "reports").exists()


def test_eval_table_says_what_fid_and_kid_saw():
    from sdtune.evaluate import report

    rec = {"variant": "lora", "dtype": "float32", "clip_score": 30.0, "fid": 0.5, "kid": 0.001, "style_similarity": 0.5,
           "psnr_to_lora": 100.0, "lpips_like_to_lora": 0.0, "latency_s": 1.0, "peak_memory_mib": 10.0,
           "denoiser_mib": 3.0}
    few = report.markdown([rec], 8, 20, 512)
    assert "8 generated images per variant against 20 real ones, 512 features each" in few
    assert "compare them by KID" in few
    assert "compare them by KID" not in report.markdown([rec], 600, 800, 512)


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


@pytest.mark.parametrize("stage, missing", [
    ("cache", "data/captions.jsonl"), ("train", "cache/index.json"),
    ("evaluate", "data/captions.jsonl"), ("report", "models/lora/pytorch_lora_weights.safetensors"),
])
def test_a_stage_run_before_the_stages_it_reads_says_what_is_missing(stage, missing, tmp_path, monkeypatch, capsys):
    """Each of these was a FileNotFoundError traceback when run on its own in a fresh clone."""
    import importlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a portrait\na landscape\n")
    (tmp_path / "params.yaml").write_text("model: {id: tiny, resolution: 32}\n"
                                          "evaluate: {clip_model: tiny, prompts: prompts.txt}\n")
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"stages.{stage}").main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"error: {missing}: not found; run the stages before this one first "
                                       f"(dvc repro runs them in order) or dvc pull their outputs\n")


@pytest.mark.parametrize("evaluate_keys, rows, prompts, message", [
    ({}, 1, "a portrait\na landscape\n",
     "error: fid: needs at least 2 real and 2 generated images, got 1 real (data/raw) and 4 generated"),
    ({"fid_extractor": "inception"}, 2, "a portrait\na landscape\n",
     "error: evaluate.fid_extractor: 'inception' needs the torch-fidelity package"),
    ({"seeds": [0]}, 2, "a portrait\na portrait\n",  # one image twice: it passed the two-image guard
     "error: evaluate.prompts: prompts.txt has 'a portrait' more than once; list each prompt once"),
])
def test_evaluate_refuses_what_fid_cannot_take_before_it_samples_anything(evaluate_keys, rows, prompts, message,
                                                                         tmp_path, monkeypatch, capsys):
    """The first two were refused in the FID step, after every variant had been loaded, sampled and timed."""
    import importlib

    from sdtune.evaluate import generate

    if "fid_extractor" in evaluate_keys and importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text(prompts)
    (tmp_path / "params.yaml").write_text(
        "model: {id: tiny, resolution: 32}\n"
        f"evaluate: {json.dumps({'clip_model': 'tiny', 'prompts': 'prompts.txt', **evaluate_keys})}\n")
    (tmp_path / "data/raw").mkdir(parents=True)
    for i in range(rows):
        Image.new("RGB", (40, 40), (i * 90, 20, 200)).save(tmp_path / f"data/raw/{i}.png")
    (tmp_path / "data/captions.jsonl").write_text("".join(
        json.dumps({"file": f"{i}.png", "caption": "a painting"}) + "\n" for i in range(rows)))

    def sampled(*args, **kwargs):
        raise AssertionError("a variant was loaded before the check")

    monkeypatch.setattr(generate, "pipeline", sampled)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module("stages.evaluate").main()
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(message)


def test_a_damaged_lora_file_is_one_line_naming_it(tmp_path):
    """The report stage reads the LoRA's metadata first: a file cut short was a SafetensorError traceback."""
    from sdtune import io
    from sdtune.errors import UserError

    damaged = tmp_path / "pytorch_lora_weights.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match=f"^{damaged}: not a readable .safetensors file"):
        io.read_safetensors_metadata(damaged)
