"""Quantized variants: reload without re-quantizing, same image for the same seed, fidelity ordering."""

import pytest
import torch

from sdtune import params as params_lib, quantize
from sdtune.errors import UserError
from sdtune.evaluate import generate, metrics, pipelines
from sdtune.evaluate.clip import load_clip
from sdtune.families import common, sd

MODEL = params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model
PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def images(pipe):
    return [img for _, _, img in generate.sample_all(pipe, PROMPTS, SEEDS, steps=3, guidance=7.5, size=64)]


@pytest.fixture(scope="module")
def variant(lora_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "int8wo-fused"
    row = quantize.make_variant(sd, MODEL, lora_dir, "int8wo", "fused", out)
    return out, row


def test_fused_variant_bakes_in_the_lora_scale(lora_dir):
    """Fused at evaluate.lora_scale, as the adapter variants run: at 0 the weights are the base's."""
    base = quantize.parent(sd, MODEL, lora_dir, fuse=False).state_dict()
    zero = quantize.parent(sd, MODEL, lora_dir, fuse=True, lora_scale=0.0).state_dict()
    full = quantize.parent(sd, MODEL, lora_dir, fuse=True, lora_scale=1.0).state_dict()
    assert base.keys() == zero.keys() == full.keys()
    assert all(torch.equal(base[k], zero[k]) for k in base)
    assert any(not torch.equal(base[k], full[k]) for k in base)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fused_denoiser_is_the_adapter_the_evaluate_stage_loads(lora_dir, scale):
    """Fused weights compute what the base with the LoRA loaded as an adapter computes, at the file's
    alpha/rank (the fixture's alpha is twice its rank) times evaluate.lora_scale."""
    adapter = generate.pipeline(sd, MODEL, torch.device("cpu"), lora_dir=lora_dir, lora_scale=scale,
                                dtype=torch.float32).unet
    fused = quantize.parent(sd, MODEL, lora_dir, fuse=True, lora_scale=scale)
    base = quantize.parent(sd, MODEL, lora_dir, fuse=False)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        want, got, plain = (m(x, 500, encoder_hidden_states=text).sample for m in (adapter, fused, base))
    assert (want - plain).abs().max() > 0.05  # the LoRA changes the output enough to tell strengths apart
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def int8_images(variant):
    """The saved int8 variant, reloaded and rendered once for the tests that compare it."""
    return images(pipelines.load(sd, MODEL, torch.device("cpu"), variant_dir=variant[0], method="int8wo"))


def test_report_row_measures_size_and_load(variant):
    _, row = variant
    assert row["variant"] == "int8wo-fused" and row["disk_bytes"] > 0 and row["load_seconds"] > 0
    parent = quantize.tensor_bytes(sd.tiny_unet())
    assert row["memory_bytes"] < parent  # int8 weights: smaller than the float32 parent


def linear_weight_types(module) -> set[str]:
    return {type(m.weight).__name__ for m in module.modules() if isinstance(m, torch.nn.Linear)}


def test_saved_variant_reloads_and_gives_the_same_image_for_the_same_seed(variant, int8_images):
    path, _ = variant
    pipe = pipelines.load(sd, MODEL, torch.device("cpu"), variant_dir=path, method="int8wo")
    assert "Int8Tensor" in linear_weight_types(pipe.unet)  # the pipeline samples with the saved int8 denoiser
    again = images(pipe)
    assert [a.tobytes() for a in int8_images] == [b.tobytes() for b in again]
    reloaded = quantize.load_variant(sd, path, "int8wo")
    assert "Int8Tensor" in linear_weight_types(reloaded)  # loaded as int8 from disk, not quantized again from float
    # The same images as the reloaded denoiser in a pipeline built here (int8wo computes in bf16),
    # and not the base model's in that dtype: the quantized, LoRA-fused denoiser draws them.
    by_hand = images(sd.load_pipeline(MODEL, torch.bfloat16, unet=reloaded))
    assert [a.tobytes() for a in again] == [b.tobytes() for b in by_hand]
    base = images(sd.load_pipeline(MODEL, torch.bfloat16))
    assert [a.tobytes() for a in again] != [b.tobytes() for b in base]


def test_int8_fidelity_is_below_the_parents_own_and_above_a_random_models(int8_images, lora_dir):
    parent = images(generate.pipeline(sd, MODEL, torch.device("cpu"), lora_dir=lora_dir))
    with common.seeded(99):
        other = sd.tiny_unet()  # same architecture, other random weights
    random_model = images(sd.load_pipeline(MODEL, torch.float32, unet=other))
    clip = load_clip("tiny")

    def psnr(imgs):
        return metrics.fidelity(imgs, parent, clip)["psnr"]

    assert psnr(parent) == metrics.PSNR_CAP_DB  # the parent against itself
    assert psnr(random_model) < psnr(int8_images) < metrics.PSNR_CAP_DB


def test_nf4_bytes_count_the_scales_bitsandbytes_keeps_beside_the_weights():
    """What a 4-bit layer holds is what bitsandbytes saves for it, its packed description aside:
    the packed weights, the bias, the absmax scales and the codes (1.6 KiB more than those two here)."""
    import bitsandbytes as bnb

    plain = torch.nn.Linear(256, 128)
    layer = bnb.nn.Linear4bit(256, 128, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(plain.weight.data, requires_grad=False, quant_type="nf4")
    layer.bias = plain.bias
    layer = layer.to("cpu")  # quantizes
    saved = {k: v for k, v in layer.state_dict().items() if ".quant_state." not in k}
    assert {"weight", "bias", "weight.absmax", "weight.quant_map"} <= saved.keys()
    assert quantize.tensor_bytes(layer) == sum(v.numel() * v.element_size() for v in saved.values())
    assert quantize.tensor_bytes(layer) - (128 * 256 // 2 + 128 * 4) == 1608


def test_int8_bytes_count_the_row_scales_bitsandbytes_keeps_beside_the_weights():
    """An 8-bit layer holds its int8 weights, the bias and a float32 scale per output row (SCB):
    what bitsandbytes saves for it, less the one-byte format tag. The scales were left out."""
    import bitsandbytes as bnb

    plain = torch.nn.Linear(320, 128)
    layer = bnb.nn.Linear8bitLt(320, 128, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(plain.weight.data.half(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(plain.bias.data.half())
    layer = layer.to("cpu")  # quantizes
    saved = {k: v for k, v in layer.state_dict().items() if k != "weight_format"}
    assert saved.keys() == {"weight", "bias", "SCB"}
    assert quantize.tensor_bytes(layer) == sum(v.numel() * v.element_size() for v in saved.values())
    assert quantize.tensor_bytes(layer) == 128 * 320 + 128 * 2 + 128 * 4


def test_int8wo_bytes_count_the_int8_data_and_its_row_scales_not_the_bf16_it_stands_for():
    """A torchao int8 weight-only layer holds int8 weights, a float32 scale and an int8 zero point per
    output row; the Int8Tensor says bf16 as its dtype, which counted it at twice its size."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(320, 128)).to(torch.bfloat16)
    bf16 = quantize.tensor_bytes(layer)
    assert bf16 == (128 * 320 + 128) * 2
    quantize_(layer, Int8WeightOnlyConfig())
    assert type(layer[0].weight).__name__ == "Int8Tensor"
    assert quantize.tensor_bytes(layer) == 128 * 320 + 128 * (4 + 1) + 128 * 2  # + the bf16 bias
    assert quantize.tensor_bytes(layer) < 0.6 * bf16


@pytest.mark.parametrize("name", ["nf4", "int8", "float8wo"])
def test_cuda_only_methods_refuse_in_one_line_without_cuda(name):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError) as err:
        quantize.check_supported(name)
    assert "\n" not in str(err.value) and f"'{name}' needs a CUDA GPU" in str(err.value)


def test_a_variant_whose_quantizer_cannot_run_here_is_one_line_naming_its_folder(tmp_path):
    """An nf4 variant copied to a machine without CUDA: bitsandbytes' "No GPU found" was a traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import json

    folder = tmp_path / "nf4-fused"
    sd.tiny_unet().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = json.loads(quantize.METHODS["nf4"].config().to_json_string())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        quantize.load_variant(sd, folder, "nf4")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{folder}: cannot load this nf4 variant (")


def test_pipeline_kwargs_name_the_folder_and_load_the_lora_only_for_an_adapter_variant():
    assert quantize.variant_name("int8wo", "fused") == "int8wo-fused"
    assert quantize.variant_parts("int8wo-fused") == ("int8wo", "fused")
    assert quantize.pipeline_kwargs("int8wo-fused") == {
        "variant_dir": quantize.QUANT_DIR / "int8wo-fused", "method": "int8wo", "lora_dir": None}
    assert quantize.pipeline_kwargs("bf16-adapter")["lora_dir"] == quantize.LORA_DIR
    assert quantize.pipeline_kwargs("bf16-adapter", "other")["lora_dir"] == "other"


def test_a_variant_is_refused_only_under_another_model(tmp_path, monkeypatch):
    """sdtune_base.json names the model a variant was made from; the same model spelled another
    way (a folder named relatively or not, sd1 or sd2, another revision) is the same model."""
    from sdtune import io

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/sd15").mkdir(parents=True)
    io.write_json(tmp_path / "v" / quantize.BASE_FILE, {"family": "sd1", "id": "./models/sd15", "revision": "main"})
    for same in [{"id": "models/sd15/"}, {"id": str(tmp_path / "models/sd15"), "family": "sd2", "revision": "abc"}]:
        quantize.check_base(tmp_path / "v", params_lib.parse({"model": {"id": "./models/sd15", **same}}).model)
    for other in [{"id": "tiny"}, {"id": "./models/sd15", "family": "sdxl"}]:
        with pytest.raises(UserError, match="made from sd1 './models/sd15' \\(revision main\\); this run's model is"):
            quantize.check_base(tmp_path / "v", params_lib.parse({"model": other}).model)


def test_the_quantize_stage_fuses_its_variants_at_evaluate_lora_scale(lora_dir, tmp_path, monkeypatch):
    """At evaluate.lora_scale 0.5, a fused variant's weight is base + 0.5 · (alpha/rank) · B @ A, from the
    LoRA file itself: the strength the adapter variants and base+LoRA are evaluated at, not 1."""
    import shutil

    from safetensors.torch import load_file

    from sdtune import io
    from stages import quantize as stage

    monkeypatch.chdir(tmp_path)
    shutil.copytree(lora_dir, "models/lora")
    (tmp_path / "params.yaml").write_text("model: {id: tiny, resolution: 64}\n"
                                          "quantize: {variants: [fp16], lora_modes: [fused]}\n"
                                          "evaluate: {lora_scale: 0.5}\n")
    stage.main()
    assert list(io.read_json("reports/quantize.json")["variants"]) == ["fp16-fused"]
    fused = quantize.load_variant(sd, "models/quantized/fp16-fused", "fp16").state_dict()
    base = sd.tiny_unet().state_dict()
    lora = load_file(tmp_path / "models/lora" / common.LORA_FILE)
    module = next(k for k in lora if k.endswith(".lora_A.weight")).removeprefix("unet.").removesuffix(".lora_A.weight")
    delta = lora[f"unet.{module}.lora_B.weight"] @ lora[f"unet.{module}.lora_A.weight"] * (8.0 / 4)  # alpha 8, rank 4
    want = base[f"{module}.weight"] + 0.5 * delta
    assert delta.abs().max() > 0.05  # far enough from 0 to tell 0.5 from 1
    torch.testing.assert_close(fused[f"{module}.weight"].float(), want, rtol=2e-3, atol=2e-3)
