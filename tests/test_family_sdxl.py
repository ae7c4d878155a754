"""The SDXL family on its tiny random-initialised variant: encode, train LoRA, save, load, sample."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import StubDenoiser
from sdtune import io, params as params_lib
from sdtune.data import cache, synthetic
from sdtune.evaluate import generate
from sdtune.families import common, sdxl
from sdtune.train import lora, loop, outputs

RES = 64
PROMPT = "a red circle on a gradient"


def make_params(**train):
    train = {"steps": 3, "batch_size": 2, "lr": 1e-3, "wandb": "disabled", "log_every": 1,
             "checkpoint_every": 100, **train}
    return params_lib.parse({"base": {"device": "cpu"}, "model": {"family": "sdxl", "id": "tiny", "resolution": RES},
                             "train": train})


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, output_type="np"):
    g = torch.Generator().manual_seed(7)
    out = pipe(PROMPT, num_inference_steps=2, height=RES, width=RES, generator=g, output_type=output_type)
    return np.asarray(out.images)


def sample_latents(pipe):
    """The denoised latents: the LoRA lives in the UNet, so no need to pay for VAE decodes."""
    return sample(pipe, output_type="latent")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three synthetic squares plus one landscape image (so one item has a real crop offset)."""
    raw = tmp_path_factory.mktemp("raw")
    synthetic.generate(raw, 3, size=96)
    Image.new("RGB", (128, 96), (200, 40, 40)).save(raw / "wide.png")
    files = sorted(p.name for p in raw.glob("*.png"))
    rows = [{"file": f, "sha256": io.sha256_file(raw / f), "caption": f"picture {i}"} for i, f in enumerate(files)]
    return raw, rows


@pytest.fixture(scope="module")
def encoded(data):
    """Each item's tensors, as the cache would hold them, plus the prepared meta."""
    raw, rows = data
    pipe = sdxl.load_pipeline(make_params().model)
    prepared = [cache.prepare(raw / r["file"], RES, True) for r in rows]
    pixels = torch.stack([p for p, _ in prepared])
    tensors = sdxl.encode_images(pipe, pixels, [m for _, m in prepared])
    tensors |= sdxl.encode_prompts(pipe, [r["caption"] for r in rows])
    items = [{k: v[i] for k, v in tensors.items()} for i in range(len(rows))]
    return items, [m for _, m in prepared]


@pytest.fixture(scope="module")
def trained(encoded, tmp_path_factory):
    """A few optimizer steps called directly; returns (losses, weights before, after, saved LoRA dir)."""
    items, _ = encoded
    params = make_params()
    denoiser = sdxl.load_denoiser(params.model)
    lora.add(denoiser, params.train.lora, sdxl.LORA_TARGETS)
    opt = torch.optim.AdamW(lora.trainable(denoiser), lr=params.train.lr)
    scheduler = sdxl.load_noise_scheduler(params.model)
    before = [p.detach().clone() for p in lora.trainable(denoiser)]
    losses = []
    for step in range(params.train.steps):
        idx = [(2 * step + j) % len(items) for j in range(params.train.batch_size)]
        batch = {k: torch.stack([items[i][k] for i in idx]) for k in items[0]}
        loss = sdxl.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(step), params.train)
        assert loss.shape == (params.train.batch_size,)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.mean().item())
    after = [p.detach().clone() for p in lora.trainable(denoiser)]
    out = tmp_path_factory.mktemp("lora")
    sdxl.save_lora(out, lora.diffusers_state(denoiser), {"base_model": "tiny", "family": "sdxl"})
    return losses, before, after, out


def test_encode_stores_latents_two_encoder_embeddings_and_size_conditioning(encoded):
    items, metas = encoded
    one = items[0]
    assert one["latents"].shape == (4, RES // 2, RES // 2)  # the tiny VAE downsamples by 2
    assert one["prompt_embeds"].shape == (77, 2 * sdxl.TEXT_DIM)  # both encoders side by side
    assert one["pooled_prompt_embeds"].shape == (sdxl.TEXT_DIM,)
    for item, meta in zip(items, metas):
        assert item["time_ids"].tolist() == [*meta["original_size"], *meta["crop_top_left"], RES, RES]
    wide = items[-1]["time_ids"].tolist()  # wide.png: 128 x 96, resized to 85 x 64, centre crop
    assert wide == [96, 128, 0, 10, RES, RES]


def test_prompt_embeds_match_the_pipelines_own_encoding():
    pipe = sdxl.load_pipeline(make_params().model)
    ours = sdxl.encode_prompts(pipe, [PROMPT])
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    # The first half is encoder 1's penultimate layer.
    ids = common.tokenize(pipe.tokenizer, [PROMPT], "cpu")
    first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours["prompt_embeds"][..., :sdxl.TEXT_DIM], first)


def test_float16_vae_encodes_in_float32_and_is_put_back():
    pipe = sdxl.load_pipeline(make_params().model)
    pipe.vae.to(torch.float16)
    pixels = torch.rand(1, 3, RES, RES) * 2 - 1
    out = sdxl.encode_images(pipe, pixels, [{"original_size": (RES, RES), "crop_top_left": (0, 0)}])
    assert out["latents"].dtype == torch.float32 and torch.isfinite(out["latents"]).all()
    assert pipe.vae.dtype == torch.float16


def test_bfloat16_vae_encodes_in_float32_too_and_is_put_back():
    # As diffusers' SDXL trainer keeps its VAE: bfloat16 does not overflow, but it rounds the latents.
    pipe = sdxl.load_pipeline(make_params().model)
    pipe.vae.to(torch.bfloat16)
    pixels = torch.rand(1, 3, RES, RES) * 2 - 1
    out = sdxl.encode_images(pipe, pixels, [{"original_size": (RES, RES), "crop_top_left": (0, 0)}])
    assert out["latents"].dtype == torch.float32 and pipe.vae.dtype == torch.bfloat16


def test_latents_are_normalised_with_the_vaes_channel_statistics():
    """What the pipeline undoes when decoding (latents * std / scaling_factor + mean)."""
    pipe = sdxl.load_pipeline(make_params().model)
    pixels = torch.rand(1, 3, RES, RES) * 2 - 1
    meta = [{"original_size": (RES, RES), "crop_top_left": (0, 0)}]
    plain = sdxl.encode_images(pipe, pixels, meta)["latents"]
    channels = plain.shape[1]
    mean, std = [0.1 * (c + 1) for c in range(channels)], [0.5 + 0.25 * c for c in range(channels)]
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    normed = sdxl.encode_images(pipe, pixels, meta)["latents"]
    sf = pipe.vae.config.scaling_factor
    expected = (plain / sf - torch.tensor(mean).view(1, -1, 1, 1)) * sf / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(normed, expected)


def test_training_steps_give_finite_loss_and_move_the_lora(trained):
    losses, before, after, _ = trained
    assert all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_saved_lora_loads_into_a_fresh_pipeline_and_changes_the_output(trained):
    *_, out = trained
    assert io.read_safetensors_metadata(out / common.LORA_FILE)["family"] == "sdxl"
    pipe = quiet(sdxl.load_pipeline(make_params().model))
    base = sample_latents(pipe)
    pipe.load_lora_weights(str(out), weight_name=common.LORA_FILE, adapter_name="t")
    with_lora = sample_latents(pipe)
    print("max |lora - base|", np.abs(with_lora - base).max())
    assert not np.allclose(base, with_lora, atol=1e-4)
    pipe.set_adapters(["t"], [0.0])
    # Off, the base's output up to float32's rounding: on some CPUs (an AMD EPYC, 2026-11-27), once
    # the adapter is loaded, a Linear that peft did not wrap gives a result 2e-7 off from the same
    # input (its GEMM's summation order is the library's choice), 4e-6 by the end of sampling.
    np.testing.assert_allclose(sample_latents(pipe), base, rtol=1e-5, atol=1e-5)


def test_cache_build_and_training_loop_end_to_end(data, tmp_path):
    """The real stages' path: cache.build stores what the family needs, the loop trains on it."""
    raw, rows = data
    params = make_params(steps=3)
    family = sdxl
    counts = cache.build(rows, raw, tmp_path / "cache", family, params.model, params.cache)
    assert counts["encoded"] == len(rows)
    assert set(cache.load(tmp_path / "cache")[0]) == {"latents", "time_ids", "prompt_embeds", "pooled_prompt_embeds"}

    run = loop.setup(params, tmp_path / "cache")
    stats = loop.train(run, tmp_path / "ckpt", tmp_path / "cache")  # as stages/train.py calls it
    assert stats["steps"] == 3 and math.isfinite(stats["final_loss"])
    lora_file = outputs.write_lora(tmp_path / "lora", run, loop.final_lora(run), {"base_model": "tiny"})
    assert lora_file.is_file()

    # The published file loads the way the evaluate stage loads it.
    pipe = generate.pipeline(family, params.model, torch.device("cpu"), lora_dir=tmp_path / "lora")
    assert "sdtune" in pipe.get_active_adapters()
    assert sample(pipe).shape == (1, RES, RES, 3)

    # A second build re-encodes nothing.
    again = cache.build(rows, raw, tmp_path / "cache", family, params.model, params.cache)
    assert again["encoded"] == 0 and again["reused"] == len(rows)


def test_real_loading_code_reads_a_saved_pipeline(tmp_path):
    """The from_pretrained paths (subfolders, scheduler, prediction type) on a local copy of the tiny model."""
    sdxl.load_pipeline(make_params().model).save_pretrained(tmp_path)
    model = params_lib.parse({"model": {"family": "sdxl", "id": str(tmp_path), "resolution": RES,
                                        "prediction_type": "v_prediction"}}).model
    pipe = sdxl.load_pipeline(model)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder_2.config.projection_dim == sdxl.TEXT_DIM
    noise = sdxl.load_noise_scheduler(model)  # DDPM read from the Euler config SDXL ships
    assert noise.config.prediction_type == "v_prediction" and noise.config.beta_schedule == "scaled_linear"
    assert sdxl.load_denoiser(model).config.addition_embed_type == "text_time"
    assert sdxl.load_tokenizer(model).model_max_length == 77


def test_the_loss_and_its_backward_read_nothing_back_to_the_host(encoded):
    from conftest import HostReads

    items, _ = encoded
    params = make_params()
    denoiser = sdxl.load_denoiser(params.model)
    lora.add(denoiser, params.train.lora, sdxl.LORA_TARGETS)
    batch = {k: torch.stack([item[k] for item in items[:2]]) for k in items[0]}
    scheduler = sdxl.load_noise_scheduler(params.model)
    with HostReads() as host:
        loss = sdxl.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(0), params.train).mean()
        loss.backward()
    assert host.reads == []


def test_sizes_and_pooled_text_reach_the_unet_exactly_whatever_the_cache_dtype(encoded):
    """time_ids go in as float32: cast to a bfloat16 cache's dtype, 1023 px became 1024."""
    items, _ = encoded
    params = make_params()
    batch = {k: torch.stack([item[k] for item in items[:2]]) for k in items[0]}
    batch = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    batch["time_ids"][0, 0] = 1023
    seen = {}

    def denoiser(noisy, timesteps, encoder_hidden_states, added_cond_kwargs):
        seen.update(added_cond_kwargs, noisy=noisy, encoder_hidden_states=encoder_hidden_states)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    unet = StubDenoiser(denoiser, torch.bfloat16)  # bf16: what the frozen UNet computes in
    sdxl.training_loss(unet, sdxl.load_noise_scheduler(params.model), batch, torch.Generator().manual_seed(0),
                       params.train)
    assert seen["time_ids"].dtype == torch.float32 and seen["time_ids"][0, 0].item() == 1023
    # The rest goes in the UNet's dtype (without autocast nothing else would cast it).
    assert {seen[k].dtype for k in ("noisy", "encoder_hidden_states", "text_embeds")} == {torch.bfloat16}
    # The conditioning is the cached captions' own: the pooled embedding and the sequence.
    assert torch.equal(seen["text_embeds"], batch["pooled_prompt_embeds"])
    assert seen["text_embeds"].abs().sum() > 0
    assert torch.equal(seen["encoder_hidden_states"], batch["prompt_embeds"])


def test_a_non_square_buckets_target_size_is_height_then_width():
    """SDXL's UNet reads (original h, w, crop top, left, target h, w): a landscape bucket's target
    is (64, 96), as the pipeline conditions sampling at height=64, width=96."""
    pipe = sdxl.load_pipeline(make_params().model)
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = sdxl.encode_images(pipe, pixels, [{"original_size": (480, 720), "crop_top_left": (0, 3)}])
    assert out["latents"].shape == (1, 4, 32, 48)
    assert out["time_ids"].tolist() == [[480, 720, 0, 3, 64, 96]]


def test_a_bfloat16_cache_stores_large_original_sizes_exactly(tmp_path):
    """bfloat16 keeps 8 significant bits: a 3000 x 2001 photo's sizes would be cached as 3008 x
    2000. The integer time ids keep their own dtype whatever cache.dtype is."""
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (3000, 2001), (30, 90, 160)).save(raw / "big.png")
    rows = [{"file": "big.png", "sha256": io.sha256_file(raw / "big.png"), "caption": "a blue field"}]
    params = params_lib.parse({"base": {"device": "cpu"}, "model": {"family": "sdxl", "id": "tiny", "resolution": RES},
                               "cache": {"dtype": "bfloat16", "center_crop": False}})
    cache.build(rows, raw, tmp_path / "cache", sdxl, params.model, params.cache)
    [item] = cache.load(tmp_path / "cache")
    assert item["latents"].dtype == torch.bfloat16
    assert not item["time_ids"].is_floating_point()
    assert item["time_ids"].tolist() == [2001, 3000, 0, 0, RES, RES]
