"""What every family's tiny pipeline shares: built from configs, in the dtype asked for, quietly."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import OFFLINE, ROOT
from sdtune import families, params as params_lib
from sdtune.errors import UserError
from sdtune.families import common, get


@pytest.fixture
def diffusers_warnings():
    """The messages diffusers logs at warning level and above during the test, whatever an
    earlier test left set (bench's main silences them; diffusers' own handler keeps the stderr
    it first saw, which pytest has swapped since)."""
    import logging

    from diffusers.utils import logging as dlogging

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    messages, handler, level = [], Collect(logging.WARNING), dlogging.get_verbosity()
    dlogging.set_verbosity_warning()
    logging.getLogger("diffusers").addHandler(handler)
    yield messages
    logging.getLogger("diffusers").removeHandler(handler)
    dlogging.set_verbosity(level)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_tiny_pipeline_is_cast_without_diffusers_float32_warning(family, diffusers_warnings):
    model = params_lib.parse({"model": {"family": family, "id": "tiny", "resolution": 64}}).model
    pipe = get(family).load_pipeline(model, dtype=torch.bfloat16)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) >= 3
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.bfloat16}
    # diffusers 0.42 warns on every dtype cast of a model built from a config ("should be kept in
    # float32: []"): noise in every demo stage's output, with nothing for the user to do.
    assert not [m for m in diffusers_warnings if "kept in float32" in m]


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_tiny_pipeline_is_in_eval_mode_as_from_pretrained_returns_it(family):
    """Modules built from a config start in train mode, where any dropout in them is live while sampling."""
    model = params_lib.parse({"model": {"family": family, "id": "tiny", "resolution": 64}}).model
    pipe = get(family).load_pipeline(model)
    training = [f"{name}.{sub}" for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)
                for sub, s in m.named_modules() if s.training]
    assert training == []


def test_cast_keeps_diffusers_own_path_when_a_model_lists_float32_modules(diffusers_warnings):
    unet = get("sd1").tiny_unet()
    unet._keep_in_fp32_modules = ["time_embedding"]
    common.cast(unet, torch.bfloat16)
    assert any("kept in float32: ['time_embedding']" in m for m in diffusers_warnings)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_real_loading_code_reads_a_saved_pipeline_quietly(family, tmp_path):
    """The hub branch (from_pretrained with subfolders) that the real run takes, on the tiny
    pipeline saved to a local folder: the same weights come back, in the dtype asked for, and
    without diffusers' FutureWarning for the `torch_dtype` it deprecated."""
    fam = get(family)
    tiny = params_lib.parse({"model": {"family": family, "id": "tiny", "resolution": 64}}).model
    fam.load_pipeline(tiny).save_pretrained(tmp_path)
    model = params_lib.parse({"model": {"family": family, "id": str(tmp_path), "resolution": 64}}).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = fam.load_pipeline(model, dtype=torch.bfloat16)
        denoiser = fam.load_denoiser(model, dtype=torch.bfloat16)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    expected = common.cast(fam.load_denoiser(tiny), torch.bfloat16).state_dict()
    torch.testing.assert_close(denoiser.state_dict(), expected)
    torch.testing.assert_close(getattr(pipe, fam.DENOISER_ATTR).state_dict(), expected)
    # The caption limit: CLIP's 77 tokens, or T5's 256 where sd3's T5 reads the whole caption.
    assert fam.load_tokenizer(model).model_max_length == {"sd1": 77, "sdxl": 77, "sd3": 256}[family]


def test_importing_the_stages_and_the_cli_prints_nothing():
    """Every stage starts by importing diffusers, transformers, peft and their optional kernels;
    their import-time notices about things sdtune does not use (torchvision, bitsandbytes' hub
    kernels, torchao's CUDA extensions) must not greet the user as warnings."""
    modules = sorted(f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    assert len(modules) == 8
    code = "; ".join(f"import {m}" for m in [*modules, "sdtune.cli"])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | OFFLINE, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""


def test_compiling_a_bf16_unet_does_not_warn_about_diffusers_version_check():
    """Dynamo warns twice per traced graph that diffusers' upsamplers call an lru_cache'd
    is_torch_version(); compile_denoiser filters exactly that warning (in a fresh process, where
    the filter is not undone by pytest's own warning capture)."""
    code = """
import torch
from sdtune.families import common, sd
unet = common.cast(sd.tiny_unet(), torch.bfloat16)
common.compile_denoiser(unet, None)
out = unet(torch.randn(1, 4, 16, 16, dtype=torch.bfloat16), torch.tensor([10]),
           torch.randn(1, 77, 32, dtype=torch.bfloat16)).sample
print(out.shape)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | OFFLINE, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "torch.Size([1, 4, 16, 16])"
    assert "lru_cache" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]


class Noisy(torch.nn.Module):
    """Adds uniform noise: compiled, inductor draws its own random numbers unless told to fall
    back to torch's (its fallback_random option), so the option's effect shows in the output."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_train_compile_options_reach_inductor_with_the_modes_own(mode):
    from types import SimpleNamespace

    from sdtune.train import loop

    x = torch.zeros(64)
    torch.manual_seed(0)
    eager = Noisy()(x)
    outputs = {}
    for options in ({}, {"fallback_random": True}):
        train = params_lib.parse({"train": {"compile": True, "compile_mode": mode, "compile_options": options}}).train
        denoiser = torch.nn.Sequential(Noisy(), Noisy())  # compiled block by block, as SD3's is
        run = SimpleNamespace(denoiser=denoiser, family=SimpleNamespace(COMPILE_BLOCKS=("Noisy",)),
                              params=SimpleNamespace(train=train))
        loop.compile_denoiser(run)
        torch.manual_seed(0)
        outputs[bool(options)] = denoiser[0](x)
    assert not torch.equal(outputs[False], eager)  # inductor's own random numbers
    assert torch.equal(outputs[True], eager)


@pytest.mark.parametrize("family, train, message", [
    ("sd1", {"loss_weighting": "cosmap"}, "train.loss_weighting: is for flow-matching models"),
    ("sdxl", {"timestep_density": "uniform"}, "train.timestep_density: is for flow-matching models"),
    ("sd3", {"snr_gamma": 5.0}, "train.snr_gamma: min-SNR weighting is for epsilon/v models"),
    ("sd3", {"snr_gamma": None, "noise_offset": 0.05}, "train.noise_offset: sd3 samples from pure Gaussian noise"),
])
def test_each_family_refuses_the_train_keys_it_cannot_honour(family, train, message):
    refused = params_lib.parse({"model": {"family": family}, "train": train}).train
    with pytest.raises(UserError, match=f"^{message}"):
        get(family).check_train(refused)
    # The defaults pass, for each family's own keys (sd3 needs min-SNR off, which sd1's default has on).
    fine = params_lib.parse({"model": {"family": family}, "train": {"snr_gamma": None} if family == "sd3" else {}})
    get(family).check_train(fine.train)


def test_a_checkpoint_of_another_family_is_refused_before_anything_is_encoded(tmp_path):
    # An SDXL checkpoint under the default family (sd1) would be cached with SDXL's first text
    # encoder alone, and the train stage would fail on it later with a TypeError.
    tiny = params_lib.parse({"model": {"family": "sdxl", "id": "tiny", "resolution": 64}}).model
    get("sdxl").load_pipeline(tiny).save_pretrained(tmp_path)
    as_sd1 = params_lib.parse({"model": {"family": "sd1", "id": str(tmp_path), "resolution": 64}})
    with pytest.raises(UserError) as err:
        families.of(as_sd1)
    assert str(err.value) == (f"model.family: sd1, but {str(tmp_path)!r} is a StableDiffusionXLPipeline "
                              f"checkpoint (its model_index.json); set model.family: sdxl")
    as_sdxl = params_lib.parse({"model": {"family": "sdxl", "id": str(tmp_path), "resolution": 64}})
    assert families.of(as_sdxl) is get("sdxl")


def test_sd1_and_sd2_checkpoints_are_told_apart_by_the_unets_cross_attention_width(tmp_path):
    # SD 1.x and 2.x share every class, so model_index.json cannot tell them apart; under sd1 an
    # SD 2.x LoRA was exported to kohya as ss_base_model_version sd_v1. The UNet's cross-attention
    # width can: 768 (CLIP ViT-L) for 1.x, 1024 (OpenCLIP ViT-H) for 2.x.
    tiny = params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model
    get("sd1").load_pipeline(tiny).save_pretrained(tmp_path)
    config = tmp_path / "unet" / "config.json"
    for width, family, other in [(1024, "sd2", "sd1"), (768, "sd1", "sd2"), ([1024] * 4, "sd2", "sd1")]:
        config.write_text(json.dumps(json.loads(config.read_text()) | {"cross_attention_dim": width}))
        width = width[0] if isinstance(width, list) else width  # one per block, as diffusers also takes it
        with pytest.raises(UserError) as err:
            families.of(params_lib.parse({"model": {"family": other, "id": str(tmp_path)}}))
        assert str(err.value) == (f"model.family: {other}, but {str(tmp_path)!r} is an {family} checkpoint "
                                  f"(its unet/config.json has cross_attention_dim: {width}); set model.family: {family}")
        assert families.of(params_lib.parse({"model": {"family": family, "id": str(tmp_path)}})) is get(family)


@pytest.mark.parametrize("family, file, change, message", [
    ("sd1", "unet/config.json", {"in_channels": 9},  # latents, mask, masked image
     "its unet takes 9 input channels for 4 output ones, as inpainting, depth and upscaling models do; use a "
     "text-to-image StableDiffusionPipeline checkpoint"),
    ("sdxl", "model_index.json", {"requires_aesthetics_score": True},
     "its model_index.json has requires_aesthetics_score, as SDXL's refiner; use a text-to-image "
     "StableDiffusionXLPipeline checkpoint (the base model)"),
    ("sd3", "transformer/config.json", {"out_channels": 8},
     "its transformer takes 16 input channels for 8 output ones"),
])
def test_a_checkpoint_that_is_not_text_to_image_is_refused_before_anything_is_encoded(tmp_path, family, file,
                                                                                       change, message):
    """An inpainting UNet failed on conv_in at the first training step, and SDXL's refiner on its
    time embedding, after the cache stage had encoded every image."""
    tiny = params_lib.parse({"model": {"family": family, "id": "tiny", "resolution": 64}}).model
    get(family).load_pipeline(tiny).save_pretrained(tmp_path)
    config = tmp_path / file
    original = config.read_text()
    params = params_lib.parse({"model": {"family": family, "id": str(tmp_path), "resolution": 64}})
    assert families.of(params) is get(family)
    config.write_text(json.dumps(json.loads(original) | change))
    with pytest.raises(UserError) as err:
        families.of(params)
    assert str(err.value).startswith(f"model.id: {str(tmp_path)!r} is not a text-to-image checkpoint: {message}")


def test_a_resolution_below_the_checkpoints_own_is_warned_of(tmp_path, capsys):
    """model.resolution defaults to 512: an SDXL or SD3.5 run that kept it trained and was judged at
    half its model's size without a word."""
    tiny = params_lib.parse({"model": {"family": "sdxl", "id": "tiny", "resolution": 64}}).model
    get("sdxl").load_pipeline(tiny).save_pretrained(tmp_path)
    config = tmp_path / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"sample_size": 128}))  # SDXL base's
    factor = 2 ** (len(json.loads((tmp_path / "vae/config.json").read_text())["block_out_channels"]) - 1)
    native = 128 * factor
    families.of(params_lib.parse({"model": {"family": "sdxl", "id": str(tmp_path), "resolution": native // 2}}))
    assert capsys.readouterr().out == (f"warning: model.resolution: {native // 2}, but {str(tmp_path)!r} was trained "
                                       f"at {native}x{native}; below it the LoRA trains and samples worse: set "
                                       f"model.resolution: {native} unless that is meant\n")
    families.of(params_lib.parse({"model": {"family": "sdxl", "id": str(tmp_path), "resolution": native}}))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("keys, message", [
    ({"model": {"resolution": 72}}, "model.resolution: 72 is not a multiple of 16, which sd3 needs "
                                    "(the VAE's factor 8 times the transformer's patch size 2)"),
    ({"cache": {"buckets": True, "bucket_step": 24}}, "cache.bucket_step: 24 is not a multiple of 16"),
])
def test_sizes_the_denoiser_cannot_take_are_refused(keys, message):
    # SD3 latents of odd sides were cached, then the train stage failed on a size mismatch.
    def params(family):
        return params_lib.parse({**keys, "model": {"family": family, "id": "tiny", **keys.get("model", {})}})

    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        families.of(params("sd3"))
    # The UNet families take any multiple of the VAE's factor, and a bucket step is free without buckets.
    assert families.of(params("sd1")) is get("sd1")
    assert families.of(params_lib.parse({"model": {"family": "sd3", "id": "tiny"},
                                         "cache": {"buckets": False, "bucket_step": 24}})) is get("sd3")


def test_a_model_folder_that_is_not_there_is_one_line(tmp_path):
    missing = params_lib.parse({"model": {"id": "./models/sd15"}}).model
    with pytest.raises(UserError, match=r"^model.id: no folder './models/sd15' \(and a path is not a Hub id\)$"):
        common.resolved_revision(missing)
    # A folder that is there but cannot be loaded keeps the loader's own reason.
    tiny = params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model
    get("sd1").load_pipeline(tiny).save_pretrained(tmp_path)
    for weights in (tmp_path / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    broken = params_lib.parse({"model": {"id": str(tmp_path), "resolution": 64}}).model
    with pytest.raises(UserError) as err:
        get("sd1").load_pipeline(broken)
    assert str(err.value).startswith(f"model.id: could not load {str(tmp_path)!r}") and "no folder" not in str(err.value)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_a_force_upcast_vae_encodes_in_float32_and_is_put_back(family, diffusers_warnings):
    """bf16 latents kept 8 bits each, and SDXL's VAE overflows in float16: a VAE marked
    force_upcast (SD 1.x's and SDXL's, and the tiny ones) encodes the cache in float32."""
    import copy

    fam = get(family)
    model = params_lib.parse({"model": {"family": family, "id": "tiny", "resolution": 64}}).model
    pipe = fam.load_pipeline(model, dtype=torch.bfloat16)
    assert pipe.vae.config.force_upcast
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    meta = [{"original_size": (64, 64), "crop_top_left": (0, 0)}] * 2
    latents = fam.encode_images(pipe, pixels, meta)["latents"]
    assert pipe.vae.dtype == torch.bfloat16  # put back
    # The same bf16-rounded weights, run in float32 by hand: the same latents to the bit.
    wide = copy.deepcopy(pipe)
    common.cast(wide.vae, torch.float32)
    assert latents.dtype == torch.float32
    assert torch.equal(latents, fam.encode_images(wide, pixels, meta)["latents"])
    assert not [m for m in diffusers_warnings if "kept in float32" in m]  # no notice in the cache stage's output


@pytest.mark.parametrize("use_attention_mask", [False, True])
def test_sd_prompt_embeds_are_the_pipelines_own_with_or_without_an_attention_mask(use_attention_mask):
    """Some SD 1.x/2.x text encoders are configured to mask their padding; the pipeline then
    samples with masked embeddings, so the cache must train on the same ones."""
    pipe = get("sd1").load_pipeline(params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model)
    pipe.text_encoder.config.use_attention_mask = use_attention_mask
    captions = ["a painting by sargent", "a harbour at dawn, oil on canvas"]
    ours = get("sd1").encode_prompts(pipe, captions)["prompt_embeds"]
    theirs, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(ours, theirs)
    ids = common.tokenize(pipe.tokenizer, captions, "cpu")
    unmasked = pipe.text_encoder(ids)[0]
    assert torch.equal(ours, unmasked) != use_attention_mask  # the mask changes the padded positions


def test_sd_latents_are_the_vaes_mean_times_its_scaling_factor():
    """What the UNet trains on and what the pipeline divides by scaling_factor before decoding:
    unscaled latents would train the LoRA on inputs ~5x larger than sampling feeds it."""
    pipe = get("sd1").load_pipeline(params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mean
    assert pipe.vae.config.scaling_factor == 0.18215
    torch.testing.assert_close(get("sd1").encode_images(pipe, pixels)["latents"], raw * 0.18215)
