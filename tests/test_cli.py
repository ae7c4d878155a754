"""`sdtune generate` on the tiny SD1 model: files, determinism, LoRA scale, variants, and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from PIL import Image
from test_kohya import make_lora

from conftest import OFFLINE, ROOT
from sdtune import families, io, quantize, runtime
from sdtune.cli import main
from sdtune.evaluate import generate as gen, pipelines
from sdtune.families import common
from sdtune.params import load, parse

FAST = ["--steps", "1", "--seed", "3"]  # one step: each run is mostly model building


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A working folder as the pipeline leaves it: params.yaml, models/lora/, one quantized variant."""
    root = tmp_path_factory.mktemp("repo")
    (root / "params.yaml").write_text("model: {id: tiny, resolution: 64}\n")
    make_lora(root / "models" / "lora")
    model = parse({"model": {"id": "tiny"}}).model
    quantize.make_variant(families.get("sd1"), model, root / "models" / "lora", "bf16", "fused",
                          root / "models" / "quantized" / "bf16-fused")
    return root


@pytest.fixture
def cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)
    return repo


def fails(argv, capsys) -> str:
    """Run, expect exit 2 with one `error:` line on stderr; return that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def direct(prompt, seed, size, *, steps=1, variant=None, lora=None, scheduler=None) -> np.ndarray:
    """The image `sdtune generate` should write, made here through sdtune's generate pipeline
    directly: the folder's params.yaml (run in `cwd`), the variant's own denoiser and dtype."""
    params = load("params.yaml")
    family = families.get(params.model.family)
    device = runtime.device(params.base.device)
    if variant is not None:
        method, _ = quantize.variant_parts(variant)
        pipe = pipelines.load(family, params.model, device, variant_dir=quantize.QUANT_DIR / variant, method=method,
                              lora_dir=lora)
    else:
        pipe = gen.pipeline(family, params.model, device, lora_dir=lora, lora_scale=params.evaluate.lora_scale)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    image = gen.sample(pipe, prompt, seed, steps=steps, guidance=params.evaluate.guidance_scale, size=size)
    return np.asarray(image)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def record_schedulers(monkeypatch) -> list[str]:
    """The scheduler class of each pipeline `sdtune generate` samples with."""
    used, sample = [], gen.sample

    def spy(pipe, *args, **kwargs):
        used.append(type(pipe.scheduler).__name__)
        return sample(pipe, *args, **kwargs)

    monkeypatch.setattr(gen, "sample", spy)
    return used


def test_seed_and_lora_scale(cwd):
    for name, extra in [("base", []), ("lora", ["--lora", "models/lora"]), ("again", ["--lora", "models/lora"]),
                        ("zero", ["--lora", "models/lora", "--lora-scale", "0"])]:
        assert main(["generate", "--prompt", "a harbour", *FAST, *extra, "--out", f"out/{name}.png"]) == 0
    png = {n: (cwd / "out" / f"{n}.png").read_bytes() for n in ("base", "lora", "again", "zero")}
    assert Image.open(cwd / "out" / "lora.png").size == (64, 64)
    assert png["lora"] == png["again"]  # same seed, same bytes
    assert png["zero"] == png["base"]   # scale 0: the LoRA adds exactly nothing
    assert png["lora"] != png["base"]


def test_prompts_file_writes_prompt_x_seed(cwd, monkeypatch):
    (cwd / "prompts.txt").write_text("# eval prompts\na harbour\n\na portrait of a lady\n")
    used = record_schedulers(monkeypatch)
    main(["generate", "--prompts", "prompts.txt", "--seeds", "3,4", "--steps", "1", "--lora", "models/lora",
          "--size", "32", "--scheduler", "euler", "--out", "grid"])
    names = sorted(p.name for p in (cwd / "grid").iterdir())
    assert names == ["001-a-harbour-seed3.png", "001-a-harbour-seed4.png",
                     "002-a-portrait-of-a-lady-seed3.png", "002-a-portrait-of-a-lady-seed4.png"]
    assert Image.open(cwd / "grid" / names[0]).size == (32, 32)
    assert used == ["EulerDiscreteScheduler"] * 4
    # the file named for the second prompt and seed 4 is that prompt and seed, sampled with Euler
    written = pixels(cwd / "grid" / names[3])
    euler = direct("a portrait of a lady", 4, 32, lora="models/lora", scheduler=diffusers.EulerDiscreteScheduler)
    assert np.array_equal(written, euler)
    assert not np.array_equal(written, direct("a portrait of a lady", 4, 32, lora="models/lora"))  # the default one


def test_quantized_variant(cwd, capsys):
    main(["generate", "--prompt", "a harbour", *FAST, "--variant", "bf16-fused", "--out", "v.png"])
    assert Image.open(cwd / "v.png").size == (64, 64)
    written = pixels(cwd / "v.png")  # FAST: 1 step, seed 3; 64 px from params.yaml's model.resolution
    assert np.array_equal(written, direct("a harbour", 3, 64, variant="bf16-fused"))
    assert not np.array_equal(written, direct("a harbour", 3, 64))  # not the base model's image
    assert "bf16-fused" in fails(["generate", "--prompt", "x", "--variant", "int8wo-fused", "--out", "x.png"], capsys)
    assert "drop --lora" in fails(["generate", "--prompt", "x", "--variant", "bf16-fused", "--lora", "models/lora",
                                   "--out", "x.png"], capsys)
    assert "--lora-scale: 'bf16-fused' has the LoRA fused in" in fails(
        ["generate", "--prompt", "x", "--variant", "bf16-fused", "--lora-scale", "0.5", "--out", "x.png"], capsys)


def test_the_readmes_commands_run(cwd, capsys):
    """The README's `sdtune generate` lines as written, on this folder's variant, at a fast size;
    each writes what its options ask for."""
    import shlex

    (cwd / "prompts").mkdir(exist_ok=True)
    (cwd / "prompts" / "eval.txt").write_text((ROOT / "prompts" / "eval.txt").read_text())
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.strip().startswith("sdtune generate ")]
    assert len(lines) >= 2 and any("--variant" in ln for ln in lines)
    seed = load("params.yaml").base.seed
    for line in lines:
        argv = shlex.split(line.replace("int8wo-fused", "bf16-fused"))[1:]
        capsys.readouterr()
        assert main([*argv, "--steps", "1", "--size", "32"]) == 0, line
        first = Path(capsys.readouterr().out.splitlines()[0])  # each file written, one a line
        opt = dict(zip(argv[1::2], argv[2::2]))
        prompt = opt.get("--prompt") or gen.read_prompts(Path(opt["--prompts"]), "--prompts")[0]
        want = direct(prompt, int(opt.get("--seed", seed)), 32, variant=opt.get("--variant"), lora=opt.get("--lora"))
        assert np.array_equal(pixels(first), want), line
        if "--variant" in opt:
            assert not np.array_equal(want, direct(prompt, seed, 32)), "the variant draws what the base model draws"


def test_user_mistakes_are_one_line(cwd, capsys):
    assert "no LoRA file" in fails(["generate", "--prompt", "x", "--lora", "nowhere", "--out", "x.png"], capsys)
    assert "missing.txt not found" in fails(["generate", "--prompts", "missing.txt", "--out", "d"], capsys)
    # "" was ". not found", and a folder "not found" though it is there
    assert fails(["generate", "--prompts", "", "--out", "d"], capsys) == \
        "error: --prompts: empty; name a text file of prompts, one per line"
    (cwd / "prompt-folder").mkdir()
    assert fails(["generate", "--prompts", "prompt-folder", "--out", "d"], capsys) == \
        "error: --prompts: prompt-folder is a folder; name a text file of prompts in it, one per line"
    (cwd / "latin1.txt").write_bytes("a caf\xe9 at dusk\n".encode("latin-1"))
    assert fails(["generate", "--prompts", "latin1.txt", "--out", "d"], capsys) == \
        "error: --prompts: latin1.txt: not valid UTF-8 (byte 5); save it as UTF-8"
    assert "--size" in fails(["generate", "--prompt", "x", "--size", "30", "--out", "x.png"], capsys)
    assert "--seeds" in fails(["generate", "--prompt", "x", "--seeds", "1,a", "--out", "x.png"], capsys)
    assert fails(["generate", "--prompt", "x", "--seeds", f"1,{2**64}", "--out", "d"], capsys) == \
        f"error: --seed: {2**64} is outside 0 to 2**32 - 1, what the seeders accept"
    assert fails(["generate", "--prompt", "x", "--seeds", "3,1,3", "--out", "d"], capsys) == \
        "error: --seeds: 3, 1, 3: list each seed once"
    assert fails(["generate", "--prompt", "x", "--lora", "models/lora", "--lora-scale", "-1", "--out", "x.png"],
                 capsys) == "error: --lora-scale: must be a finite number >= 0, got -1.0"
    # argparse's float() reads "nan" and "inf": guidance nan sampled unguided, inf and scale nan black images
    for flag, value in [("--guidance", "nan"), ("--guidance", "inf"), ("--lora-scale", "nan")]:
        assert fails(["generate", "--prompt", "x", "--lora", "models/lora", flag, value, "--out", "x.png"],
                     capsys) == f"error: {flag}: must be a finite number >= 0, got {value}"
    assert "--prompt" in fails(["generate", "--out", "x.png"], capsys)
    # 0 steps was a ZeroDivisionError traceback in the scheduler; a negative guidance sampled nonsense.
    assert fails(["generate", "--prompt", "x", "--steps", "0", "--out", "x.png"], capsys) == \
        "error: --steps: must be positive, got 0"
    assert fails(["generate", "--prompt", "x", "--guidance", "-1", "--out", "x.png"], capsys) == \
        "error: --guidance: must be a finite number >= 0, got -1.0"
    assert fails(["generate", "--prompt", "x", "--lora-scale", "0.5", "--out", "x.png"], capsys) == \
        "error: --lora-scale: no LoRA to scale; add --lora models/lora (or an -adapter --variant)"
    # SD3 is a flow-matching model: Euler/DDIM/DPM built from its config sampled it with DDPM betas.
    assert fails(["generate", "--prompt", "x", "--family", "sd3", "--scheduler", "euler", "--out", "x.png"],
                 capsys) == "error: --scheduler: euler cannot sample sd3 models; choose from default"
    assert fails(["generate", "--prompt", "x", "--family", "sd3", "--size", "72", "--out", "x.png"], capsys) \
        .startswith("error: --size: 72 is not a multiple of 16, which sd3 needs")
    # --size, not params.yaml's model.resolution (40 here, fine for sd1), is what generation draws at.
    (cwd / "sd1-40.yaml").write_text("model: {id: tiny, resolution: 40}\n")
    assert fails(["generate", "--prompt", "x", "--params", "sd1-40.yaml", "--family", "sd3", "--size", "64",
                  "--scheduler", "ddim", "--out", "x.png"], capsys).startswith("error: --scheduler: ddim")
    # A variant under another family's pipeline was a TypeError deep in diffusers (or, sd2, nonsense).
    assert fails(["generate", "--prompt", "x", "--variant", "bf16-fused", "--family", "sdxl", "--out", "x.png"],
                 capsys) == ("error: models/quantized/bf16-fused: made from sd1 'tiny' (revision main); this run's "
                             "model is sdxl 'tiny' (revision main): sample it with that model, or run the quantize "
                             "stage again")
    assert fails(["generate", "--prompt", "x", "--out", "params.yaml/sub/x.png"], capsys) == \
        "error: --out: params.yaml is a file, not a folder"
    assert fails(["generate", "--prompt", "x", "--out", "/proc/nope/x.png"], capsys) == \
        "error: --out: cannot make the folder /proc/nope (No such file or directory)"
    # /proc is a folder that takes no file (os.access says yes to root): it failed after sampling
    assert fails(["generate", "--prompt", "x", "--out", "/proc/x.png"], capsys).startswith(
        "error: --out: cannot write in /proc (")
    # The folder is made after the other checks: a refused run leaves none behind.
    assert fails(["generate", "--prompt", "x", "--size", "30", "--out", "new/deep/x.png"], capsys) \
        .startswith("error: --size: 30 is not a multiple of 8")
    assert not (cwd / "new").exists()
    assert not (cwd / "x.png").exists()


def test_a_variant_folder_of_no_known_method_is_one_line(cwd, capsys):
    """A folder in models/quantized/ whose name does not start with a method (copied in by hand):
    a KeyError traceback from the methods table."""
    odd = cwd / quantize.QUANT_DIR / "int4-fused"
    odd.mkdir()
    try:
        assert fails(["generate", "--prompt", "x", "--variant", "int4-fused", "--out", "x.png"], capsys) == (
            f"error: --variant: 'int4-fused' does not start with a known method ({', '.join(quantize.METHODS)})")
    finally:
        odd.rmdir()


def test_a_fused_variant_of_another_lora_warns_and_an_incomplete_one_is_one_line(cwd, tmp_path, monkeypatch, capsys):
    """A LoRA trained after the quantize stage ran: the fused variant still held the old one, and
    generate sampled it without a word. A variant folder without its weights was a traceback."""
    from safetensors.torch import load_file

    good = cwd / "models" / "lora" / common.LORA_FILE
    retrained = tmp_path / "lora"
    common.write_lora(retrained, {k: v * 2 for k, v in load_file(good).items()}, io.read_safetensors_metadata(good))
    monkeypatch.setattr(quantize, "LORA_DIR", retrained)
    assert main(["generate", "--prompt", "x", "--variant", "bf16-fused", *FAST, "--out", str(tmp_path / "v.png")]) == 0
    assert capsys.readouterr().err.strip() == (
        f"models/quantized/bf16-fused: warning: it holds another LoRA than {retrained / common.LORA_FILE} "
        f"(trained since the quantize stage ran); run `dvc repro quantize` to make it again")
    monkeypatch.setattr(quantize, "LORA_DIR", good.parent)
    assert main(["generate", "--prompt", "x", "--variant", "bf16-fused", *FAST, "--out", str(tmp_path / "w.png")]) == 0
    assert capsys.readouterr().err == ""  # the LoRA it was made from: no warning
    (cwd / "models" / "quantized" / "int8wo-fused").mkdir()
    try:
        assert fails(["generate", "--prompt", "x", "--variant", "int8wo-fused", "--out", "x.png"], capsys) \
            .startswith("error: models/quantized/int8wo-fused: not a complete int8wo variant (")
    finally:
        (cwd / "models" / "quantized" / "int8wo-fused").rmdir()


def test_lora_for_absent_modules_fails(cwd, capsys):
    # diffusers only warns about keys that match no module, and loads the rest.
    from safetensors.torch import load_file

    good = cwd / "models" / "lora" / common.LORA_FILE
    moved = {k.replace("unet.up_blocks.0.", "unet.up_blocks.7."): v for k, v in load_file(good).items()}
    common.write_lora(cwd / "absent", moved, io.read_safetensors_metadata(good))
    err = fails(["generate", "--prompt", "x", "--lora", "absent", "--out", "x.png"], capsys)
    assert f"absent/{common.LORA_FILE}" in err and "24 of its 48 modules" in err and "up_blocks.7" in err


def test_kohya_lora_for_absent_modules_fails_and_a_fitting_one_loads(cwd, tmp_path, capsys):
    """kohya's lora_unet_* keys went straight to diffusers, which loaded the modules it found."""
    from safetensors.torch import load_file

    from sdtune.train import kohya
    from test_kohya import ALPHA

    good = cwd / "models" / "lora" / common.LORA_FILE
    state = kohya.to_kohya(load_file(good), ALPHA)
    common.write_lora(tmp_path / "fits", state, {}, name="k.safetensors")
    assert main(["generate", "--prompt", "x", *FAST, "--lora", str(tmp_path / "fits" / "k.safetensors"),
                 "--out", str(tmp_path / "k.png")]) == 0
    moved = {k.replace("lora_unet_up_blocks_0_", "lora_unet_up_blocks_7_"): v for k, v in state.items()}
    path = common.write_lora(tmp_path / "absent", moved, {}, name="k.safetensors")
    err = fails(["generate", "--prompt", "x", "--lora", str(path), "--out", "x.png"], capsys)
    assert str(path) in err and "24 of its 48 modules" in err and "lora_unet_up_blocks_7_" in err


def test_lora_for_another_architecture_is_one_line_on_stderr(cwd, tmp_path):
    # A UNet with a wider text-embedding input: attn2.to_k/to_v LoRA matrices have other shapes.
    with common.seeded(1):
        other = UNet2DConditionModel(
            sample_size=32, layers_per_block=2, block_out_channels=(32, 64), norm_num_groups=32,
            cross_attention_dim=48, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    path = make_lora(tmp_path / "wide", unet=other)
    # A real process, so the test sees everything a user would on stderr.
    out = subprocess.run([sys.executable, "-m", "sdtune.cli", "generate", "--prompt", "x", "--lora", str(path.parent),
                          "--out", str(tmp_path / "x.png")], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})  # this checkout's sdtune, not another
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert str(path) in out.stderr and "size mismatch" in out.stderr


def test_out_naming_a_folder_keeps_it_and_is_one_line(cwd, capsys):
    """An image was renamed over a folder of that name, deleting the folder and all in it."""
    (cwd / "kept.png").mkdir()
    (cwd / "kept.png" / "work.txt").write_text("someone's work")
    assert fails(["generate", "--prompt", "x", "--out", "kept.png"], capsys) == \
        "error: --out: kept.png is a folder, where an image is to be written; move it away or choose another name"
    (cwd / "grid2" / "001-x-seed4.png").mkdir(parents=True)  # one of several images' names
    assert fails(["generate", "--prompt", "x", "--seeds", "3,4", "--out", "grid2"], capsys) == \
        ("error: --out: grid2/001-x-seed4.png is a folder, where an image is to be written; move it away or "
         "choose another name")
    assert (cwd / "kept.png" / "work.txt").read_text() == "someone's work"
    assert (cwd / "grid2" / "001-x-seed4.png").is_dir() and not (cwd / "grid2" / "001-x-seed3.png").exists()


def test_device_cuda_without_cuda_names_the_flag(cwd, capsys, monkeypatch):
    """--device is what the user typed; base.device, what params.yaml set, is named when it is that."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fails(["generate", "--prompt", "x", "--device", "cuda", "--out", "x.png"], capsys) == \
        "error: --device: 'cuda' was asked for but no CUDA device is available; use auto or cpu"
    (cwd / "on-cuda.yaml").write_text("base: {device: cuda}\nmodel: {id: tiny, resolution: 64}\n")
    assert fails(["generate", "--prompt", "x", "--params", "on-cuda.yaml", "--out", "x.png"], capsys) == \
        "error: base.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu"


def test_a_stage_time_is_written_by_rank_0_alone(tmp_path, monkeypatch):
    """Under torchrun every rank runs the stage; rank 1 leaves before the LoRA is written, and its
    shorter time, written last, was the stage's."""
    monkeypatch.chdir(tmp_path)
    for rank, written in [("1", False), ("0", True)]:
        monkeypatch.setenv("RANK", rank)
        with runtime.stage("train"):
            pass
        assert (tmp_path / "reports/stages/train.json").exists() == written, rank


@pytest.mark.parametrize("source, shown", [
    ("https://h.example/a%20b.zip?X-Goog-Signature=abc&X-Goog-Expires=60#frag",
     "https://h.example/a%20b.zip?X-Goog-Signature=***&X-Goog-Expires=***"),
    ("https://user:pw@h.example:8080/x.zip", "https://***@h.example:8080/x.zip"),
    ("HTTP://token@h.example/x.zip?sig", "http://***@h.example/x.zip?sig=***"),
    ("https://h.example/x.zip", "https://h.example/x.zip"),
    ("gs://bucket/prefix", "gs://bucket/prefix"), ("data/my images", "data/my images"),
])
def test_a_url_is_kept_and_shown_without_its_credentials(source, shown):
    assert runtime.redacted(source) == shown


def test_a_model_id_not_found_is_one_line_without_hubs_deprecation_warning(tmp_path):
    """diffusers passes huggingface_hub a deprecated argument: its two-line UserWarning came
    above the stage's one-line error."""
    (tmp_path / "params.yaml").write_text("base: {device: cpu}\nmodel: {id: nonexistent/repo}\n")
    done = subprocess.run([sys.executable, "-m", "stages.quantize"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: model.id: could not load 'nonexistent/repo' at revision 'main': "
                                        "nonexistent/repo does not appear to have a file named config.json."]


def test_a_stage_run_as_a_file_is_one_line_naming_the_module_form(tmp_path):
    """stages/ first on sys.path hides the standard library's profile module (stages/profile.py)."""
    done = subprocess.run([sys.executable, str(ROOT / "stages/train.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stderr) == (2, "error: run a stage as a module, from the repository root: "
                                                 "python -m stages.train (or docker/run train)\n")


def test_guidance_defaults_to_the_pipelines_own(cwd):
    """evaluate.guidance_scale: null samples at the family pipeline's own scale (7.5 for SD 1.x/2.x,
    5.0 for SDXL), as the validation images do: one number for every family drew SDXL at SD 1.5's."""
    import inspect

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert load("params.yaml").evaluate.guidance_scale is None
    own = inspect.signature(StableDiffusionPipeline.__call__).parameters["guidance_scale"].default
    assert (own, inspect.signature(StableDiffusionXLPipeline.__call__).parameters["guidance_scale"].default) == (7.5, 5.0)
    for name, extra in [("default", []), ("own", ["--guidance", str(own)]), ("other", ["--guidance", "2"])]:
        assert main(["generate", "--prompt", "a harbour", *FAST, *extra, "--out", f"out/{name}.png"]) == 0
    png = {n: (cwd / "out" / f"{n}.png").read_bytes() for n in ("default", "own", "other")}
    assert png["default"] == png["own"] != png["other"]
