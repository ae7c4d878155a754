"""`sdtune generate` on the tiny SD1 model: files, determinism, LoRA scale, variants, and one-line errors."""

import subprocess
import sys

import pytest
from diffusers import UNet2DConditionModel
from PIL import Image
from test_kohya import make_lora

from sdtune import families, quantize
from sdtune.cli import main
from sdtune.families import common
from sdtune.params import parse

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


def test_seed_and_lora_scale(cwd):
    for name, extra in [("base", []), ("lora", ["--lora", "models/lora"]), ("again", ["--lora", "models/lora"]),
                        ("zero", ["--lora", "models/lora", "--lora-scale", "0"])]:
        assert main(["generate", "--prompt", "a harbour", *FAST, *extra, "--out", f"out/{name}.png"]) == 0
    png = {n: (cwd / "out" / f"{n}.png").read_bytes() for n in ("base", "lora", "again", "zero")}
    assert Image.open(cwd / "out" / "lora.png").size == (64, 64)
    assert png["lora"] == png["again"]  # same seed, same bytes
    assert png["zero"] == png["base"]   # scale 0: the LoRA adds exactly nothing
    assert png["lora"] != png["base"]


def test_prompts_file_writes_prompt_x_seed(cwd):
    (cwd / "prompts.txt").write_text("# eval prompts\na harbour\n\na portrait of a lady\n")
    main(["generate", "--prompts", "prompts.txt", "--seeds", "3,4", "--steps", "1", "--lora", "models/lora",
          "--size", "32", "--scheduler", "euler", "--out", "grid"])
    names = sorted(p.name for p in (cwd / "grid").iterdir())
    assert names == ["001-a-harbour-seed3.png", "001-a-harbour-seed4.png",
                     "002-a-portrait-of-a-lady-seed3.png", "002-a-portrait-of-a-lady-seed4.png"]
    assert Image.open(cwd / "grid" / names[0]).size == (32, 32)


def test_quantized_variant(cwd, capsys):
    main(["generate", "--prompt", "a harbour", *FAST, "--variant", "bf16-fused", "--out", "v.png"])
    assert Image.open(cwd / "v.png").size == (64, 64)
    assert "bf16-fused" in fails(["generate", "--prompt", "x", "--variant", "int8wo-fused", "--out", "x.png"], capsys)
    assert "drop --lora" in fails(["generate", "--prompt", "x", "--variant", "bf16-fused", "--lora", "models/lora",
                                   "--out", "x.png"], capsys)
    assert "--lora-scale: 'bf16-fused' has the LoRA fused in" in fails(
        ["generate", "--prompt", "x", "--variant", "bf16-fused", "--lora-scale", "0.5", "--out", "x.png"], capsys)


def test_the_readmes_commands_run(cwd):
    """The README's `sdtune generate` lines as written, on this folder's variant, at a fast size."""
    import shlex

    from conftest import ROOT

    (cwd / "prompts").mkdir(exist_ok=True)
    (cwd / "prompts" / "eval.txt").write_text((ROOT / "prompts" / "eval.txt").read_text())
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.strip().startswith("sdtune generate ")]
    assert len(lines) >= 2
    for line in lines:
        argv = shlex.split(line.replace("int8wo-fused", "bf16-fused"))[1:]
        assert main([*argv, "--steps", "1", "--size", "32"]) == 0, line


def test_user_mistakes_are_one_line(cwd, capsys):
    assert "no LoRA file" in fails(["generate", "--prompt", "x", "--lora", "nowhere", "--out", "x.png"], capsys)
    assert "missing.txt not found" in fails(["generate", "--prompts", "missing.txt", "--out", "d"], capsys)
    assert "--size" in fails(["generate", "--prompt", "x", "--size", "30", "--out", "x.png"], capsys)
    assert "--seeds" in fails(["generate", "--prompt", "x", "--seeds", "1,a", "--out", "x.png"], capsys)
    assert "--prompt" in fails(["generate", "--out", "x.png"], capsys)
    assert not (cwd / "x.png").exists()


def test_lora_for_absent_modules_fails(cwd, capsys):
    # diffusers only warns about keys that match no module, and loads the rest.
    from safetensors.torch import load_file

    good = cwd / "models" / "lora" / common.LORA_FILE
    moved = {k.replace("unet.up_blocks.0.", "unet.up_blocks.7."): v for k, v in load_file(good).items()}
    common.write_lora(cwd / "absent", moved, common.read_metadata(good))
    err = fails(["generate", "--prompt", "x", "--lora", "absent", "--out", "x.png"], capsys)
    assert f"absent/{common.LORA_FILE}" in err and "24 of its 48 modules" in err and "up_blocks.7" in err


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
                          "--out", str(tmp_path / "x.png")], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert str(path) in out.stderr and "size mismatch" in out.stderr
