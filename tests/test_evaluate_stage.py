"""The evaluate stage run in-process on the tiny SD1 model and the tiny CLIP: what each metric is
given, checked by spies that record the arguments the real functions got and call them through."""

import json
import shutil

import pytest
import torch
from PIL import Image

from sdtune import io
from sdtune.evaluate import generate, metrics
from sdtune.profiling import memory

PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def workspace(ws, lora_dir, variants=()):
    """A folder as the stages before evaluate leave it, its quantize report listing `variants`."""
    (ws / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    evaluate_keys = {"clip_model": "tiny", "prompts": "prompts.txt", "seeds": SEEDS, "steps": 2, "latency_repeats": 1}
    (ws / "params.yaml").write_text(f"model: {{id: tiny, resolution: 32}}\nevaluate: {json.dumps(evaluate_keys)}\n")
    (ws / "data/raw").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 90, 20, 200)).save(ws / f"data/raw/{i}.png")
    (ws / "data/captions.jsonl").write_text("".join(
        json.dumps({"file": f"{i}.png", "caption": "a painting"}) + "\n" for i in range(3)))
    shutil.copytree(lora_dir, ws / "models/lora")
    io.write_json(ws / "reports/quantize.json", {"variants": {name: {} for name in variants}})
    return ws


@pytest.fixture(scope="module")
def evaluated(lora_dir, tmp_path_factory):
    """(workspace, calls): the stage run once over base and base+LoRA, 2 prompts x 2 seeds.
    calls lists ("sample", prompt, seed, image bytes), ("clip_score", images, prompts),
    ("fidelity", images, reference), ("reset_peak",), ("pipeline",), ("peak_memory",) in call order."""
    ws = workspace(tmp_path_factory.mktemp("evaluate"), lora_dir)

    calls = []
    real = {name: getattr(mod, name) for mod, name in
            [(generate, "sample"), (generate, "pipeline"), (metrics, "clip_score"), (metrics, "fidelity"),
             (metrics, "style_similarity"),
             (memory, "reset_peak"), (memory, "peak_memory")]}

    def sample(pipe, prompt, seed, **kw):
        img = real["sample"](pipe, prompt, seed, **kw)
        calls.append(("sample", prompt, seed, img.tobytes()))
        return img

    def spy(name):
        def call(*args, **kwargs):
            calls.append((name, *args[:2]) if name in ("clip_score", "fidelity", "style_similarity") else (name,))
            return real[name](*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setattr(generate, "sample", sample)
        for name in ("pipeline", "clip_score", "fidelity", "style_similarity"):
            mp.setattr(generate if name == "pipeline" else metrics, name, spy(name))
        for name in ("reset_peak", "peak_memory"):
            mp.setattr(memory, name, spy(name))
        from stages import evaluate

        evaluate.main()
    return ws, calls


def test_each_image_is_scored_against_its_own_prompt(evaluated):
    """2 prompts x 2 seeds: image i goes to CLIP score with the prompt it was generated from."""
    _, calls = evaluated
    made_from = {img: prompt for _, prompt, _, img in (c for c in calls if c[0] == "sample")}
    scored = [c for c in calls if c[0] == "clip_score"]
    assert len(scored) == 2  # base and lora
    for _, images, prompts in scored:
        assert len(images) == len(prompts) == len(PROMPTS) * len(SEEDS)
        assert [made_from[img.tobytes()] for img in images] == prompts
        assert prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]


def test_fidelity_is_measured_against_base_plus_lora(evaluated):
    ws, calls = evaluated
    scores = io.read_json(ws / "reports/eval.json")
    # base+LoRA against itself is identical; the base, which the LoRA changes, is not.
    assert scores["lora"]["psnr_to_lora"] == metrics.PSNR_CAP_DB and scores["lora"]["lpips_like_to_lora"] == 0.0
    assert scores["base"]["psnr_to_lora"] < metrics.PSNR_CAP_DB
    lora_images = [c[1] for c in calls if c[0] == "clip_score"][1]
    for _, _, reference in (c for c in calls if c[0] == "fidelity"):
        assert [r.tobytes() for r in reference] == [i.tobytes() for i in lora_images]


def test_each_variants_peak_memory_is_measured_from_a_fresh_peak(evaluated):
    """reset_peak before each variant's pipeline loads: otherwise the second variant reports the
    first one's peak when it is higher."""
    _, calls = evaluated
    order = [c[0] for c in calls if c[0] in ("reset_peak", "pipeline", "peak_memory")]
    assert order == ["reset_peak", "pipeline", "peak_memory"] * 2


@pytest.mark.parametrize("variant, expected", [
    pytest.param("nf4-fused", "error: quantize.variants: 'nf4' needs a CUDA GPU", id="cuda-only",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 runs here")),
    pytest.param("bf16-fused", "error: models/quantized/bf16-fused: variant 'bf16-fused' of reports/quantize.json "
                 "is not there", id="no-folder"),
])
def test_a_variant_that_cannot_run_stops_the_stage_before_any_sampling(variant, expected, lora_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """The variants came last: base and lora were sampled for minutes, then a traceback and nothing written."""
    ws = workspace(tmp_path, lora_dir, [variant])
    if variant.startswith("nf4"):
        (ws / "models/quantized" / variant).mkdir(parents=True)
    monkeypatch.chdir(ws)
    sampled = []
    monkeypatch.setattr(generate, "sample", lambda *args, **kw: sampled.append(args))
    from stages import evaluate

    with pytest.raises(SystemExit) as exc:
        evaluate.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(expected), err
    assert sampled == [] and not (ws / "reports/eval.json").exists()


def test_style_similarity_compares_each_variants_samples_with_the_training_images(evaluated):
    """style_similarity(fake, real): the centroid is the training images' (3 in data/raw), and
    each of the 4 samples is scored against it."""
    _, calls = evaluated
    sampled = [c[3] for c in calls if c[0] == "sample"]
    styled = [c for c in calls if c[0] == "style_similarity"]
    assert len(styled) == 2  # base and lora
    for _, fake, real in styled:
        assert len(real) == 3
        assert {img.tobytes() for img in fake} <= set(sampled) and len(fake) == len(PROMPTS) * len(SEEDS)
