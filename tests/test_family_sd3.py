"""The SD3.x family on its tiny random-initialised variant: encoding, the flow-matching loss,
LoRA training, saving and loading, and the cache → train path end to end. All offline on CPU."""

import inspect
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from conftest import StubDenoiser  # noqa: E402
from sdtune import io, params as params_lib  # noqa: E402
from sdtune.data import cache as cache_lib  # noqa: E402
from sdtune.data.synthetic import generate  # noqa: E402
from sdtune.errors import UserError  # noqa: E402
from sdtune.evaluate import generate as gen  # noqa: E402
from sdtune.families import common, get, sd3  # noqa: E402
from sdtune.train import lora, loop  # noqa: E402

CAPTIONS = ["a red circle on a gradient", "a blue square on a gradient"]


def make_params(**train):
    train = {"lora": {"rank": 4, "alpha": 4.0}, "mixed_precision": "no", "wandb": "disabled"} | train
    return params_lib.parse({"base": {"device": "cpu"}, "model": {"family": "sd3", "id": "tiny", "resolution": 64},
                             "train": train})


@pytest.fixture(scope="module")
def params():
    return make_params()


@pytest.fixture(scope="module")
def pipe(params):
    return sd3.load_pipeline(params.model)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    generate(raw, 2, size=80)
    return raw, sorted(raw.glob("*.png"))


@pytest.fixture(scope="module")
def sd3_cache(params, images, tmp_path_factory):
    """The two images cached for the tiny SD3 model once: (cache dir, rows, build counts)."""
    raw, files = images
    rows = [{"file": f.name, "sha256": io.sha256_file(f), "caption": c} for f, c in zip(files, CAPTIONS)]
    cache_dir = tmp_path_factory.mktemp("sd3") / "cache"
    return cache_dir, rows, cache_lib.build(rows, raw, cache_dir, sd3, params.model, params.cache)


@pytest.fixture(scope="module")
def batch(pipe, images):
    prepared = [cache_lib.prepare(p, 64, True) for p in images[1]]
    pixels = torch.stack([px for px, _ in prepared])
    return sd3.encode_images(pipe, pixels, [m for _, m in prepared]) | sd3.encode_prompts(pipe, CAPTIONS)


def trained_denoiser(params, batch, steps=3, lr=1e-2):
    """A fresh tiny transformer with LoRA, trained `steps` AdamW steps. Returns it and its losses."""
    denoiser = sd3.load_denoiser(params.model)
    lora.add(denoiser, params.train.lora, sd3.LORA_TARGETS)
    opt = torch.optim.AdamW(lora.trainable(denoiser), lr=lr)
    scheduler = sd3.load_noise_scheduler(params.model)
    losses = []
    for step in range(steps):
        loss = sd3.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(step), params.train).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return denoiser, losses


@pytest.fixture(scope="module")
def trained(params, batch):
    return trained_denoiser(params, batch)


def test_registered_and_interface(pipe):
    assert get("sd3") is sd3
    assert isinstance(getattr(pipe, sd3.DENOISER_ATTR), sd3.DENOISER)
    assert isinstance(pipe, sd3.PIPELINE)
    assert type(pipe.scheduler) is type(sd3.load_noise_scheduler(make_params().model))


def test_encoded_shapes_and_prompt_layout(pipe, batch):
    assert batch["latents"].shape == (2, 16, 32, 32)  # 16 latent channels, VAE factor 2 on 64 px
    # 77 CLIP tokens then 256 T5 tokens: the length the pipeline samples with by default, pinned
    # here rather than read from sd3.T5_MAX_LENGTH (a cache of another length trains on a layout
    # that sampling never feeds the transformer).
    assert inspect.signature(sd3.PIPELINE.__call__).parameters["max_sequence_length"].default == 256
    assert batch["prompt_embeds"].shape == (2, 77 + 256, 64)
    assert batch["pooled_prompt_embeds"].shape == (2, 64)
    # The layout the transformer was trained on: CLIP-L | CLIP-G penultimate states, then T5.
    ids = common.tokenize(pipe.tokenizer, CAPTIONS[:1], "cpu")
    t5_ids = pipe.tokenizer_3(CAPTIONS[:1], padding="max_length", max_length=sd3.T5_MAX_LENGTH,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        one = pipe.text_encoder(ids, output_hidden_states=True)
        two = pipe.text_encoder_2(ids, output_hidden_states=True)
        t5 = pipe.text_encoder_3(t5_ids)[0]
    clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(batch["prompt_embeds"][:1], torch.cat([clip, t5], dim=1))
    torch.testing.assert_close(batch["pooled_prompt_embeds"][:1], torch.cat([one.text_embeds, two.text_embeds], -1))


def test_latents_are_shifted_and_scaled(pipe, batch, images):
    pixels, _ = cache_lib.prepare(images[1][0], 64, True)
    with torch.no_grad():
        raw = pipe.vae.encode(pixels[None]).latent_dist.mode()
    cfg = pipe.vae.config
    torch.testing.assert_close(batch["latents"][:1], (raw - cfg.shift_factor) * cfg.scaling_factor)


def test_the_transformer_receives_the_cached_text_conditioning(params, batch):
    """The pooled CLIP embedding (pooled_projections) and the token sequence go in as cached."""
    seen = {}

    def denoiser(hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        seen.update(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections)
        return (torch.zeros_like(hidden_states),)

    sd3.training_loss(StubDenoiser(denoiser, torch.float32), sd3.load_noise_scheduler(params.model), batch,
                      torch.Generator().manual_seed(0), params.train)
    assert batch["pooled_prompt_embeds"].abs().sum() > 0
    assert torch.equal(seen["pooled_projections"], batch["pooled_prompt_embeds"])
    assert torch.equal(seen["encoder_hidden_states"], batch["prompt_embeds"])


def test_encoding_needs_no_transformer(params, batch, images):
    """What the cache stage needs: encoding works on a pipeline loaded without its transformer."""
    light = sd3.load_pipeline(params.model, transformer=None)
    assert light.transformer is None
    torch.testing.assert_close(sd3.encode_prompts(light, CAPTIONS)["prompt_embeds"], batch["prompt_embeds"])


def test_training_changes_lora_and_loss_is_finite(params, batch, trained):
    denoiser, losses = trained
    assert all(np.isfinite(losses))
    fresh = sd3.load_denoiser(params.model)
    lora.add(fresh, params.train.lora, sd3.LORA_TARGETS)
    before, after = lora.peft_state(fresh), lora.peft_state(denoiser)
    assert any("add_q_proj" in k for k in after) and any("attn2.to_q" in k for k in after)
    unchanged = {k for k in after if "lora_B" in k and torch.equal(before[k], after[k])}
    # Only the last block's context query: that block drops its text stream, so it gets no gradient.
    assert unchanged == {"transformer_blocks.1.attn.add_q_proj.lora_B.weight"}


def test_loss_is_a_function_of_the_generator(params, batch, trained):
    denoiser, _ = trained
    scheduler = sd3.load_noise_scheduler(params.model)

    def loss(seed):
        with torch.no_grad():
            return sd3.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(seed), params.train)
    a, b, c = loss(7), loss(7), loss(8)
    assert a.shape == (2,)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("density", params_lib.DENSITIES)
def test_timestep_densities(density):
    scheduler = sd3.tiny_scheduler()
    train = make_params(timestep_density=density).train
    sigmas, timesteps = sd3.sample_sigmas(scheduler, 512, torch.Generator().manual_seed(0), train)
    again, _ = sd3.sample_sigmas(scheduler, 512, torch.Generator().manual_seed(0), train)
    assert torch.equal(sigmas, again)
    assert sigmas.min() > 0 and sigmas.max() <= 1
    torch.testing.assert_close(timesteps, sigmas * 1000)
    assert len(sigmas.unique()) > 100  # spread over the table, not stuck at one level


@pytest.mark.parametrize("weighting", params_lib.WEIGHTINGS)
def test_loss_weightings(params, batch, trained, weighting):
    """Each weighting's loss against one written out from the formulas: logit-normal levels on the
    scheduler's table, the velocity MSE, or (sigma_sqrt: σ⁻², cosmap: 2/(π(1−2σ+2σ²))) on the image
    the prediction implies."""
    denoiser, _ = trained
    train = make_params(loss_weighting=weighting).train
    scheduler = sd3.tiny_scheduler()
    with torch.no_grad():
        loss = sd3.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(0), train)

    x0 = batch["latents"].float()
    g = torch.Generator().manual_seed(0)  # the noise first, then the levels
    noise = torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(2,), generator=g))
    index = (u * scheduler.config.num_train_timesteps).long()
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        pred = denoiser(hidden_states=noisy, timestep=scheduler.timesteps[index],
                        encoder_hidden_states=batch["prompt_embeds"],
                        pooled_projections=batch["pooled_prompt_embeds"], return_dict=False)[0]
    velocity = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    image = ((noisy - sigma * pred - x0) ** 2).mean(dim=(1, 2, 3))
    s = sigma.flatten()
    want = {"none": velocity, "sigma_sqrt": image / s**2,
            "cosmap": image * 2 / (math.pi * (1 - 2 * s + 2 * s**2))}[weighting]
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)


def test_weightings_apply_to_the_implied_image_as_diffusers_does(params, batch, trained):
    """sigma_sqrt (sigma⁻²) on the image loss (sigma² times the velocity's) is the plain velocity loss;
    cosmap is its weight times sigma². Applied to the velocity loss, sigma_sqrt gave weights of 1e5."""
    denoiser, _ = trained

    def loss(weighting):
        train = make_params(loss_weighting=weighting).train
        with torch.no_grad():
            return sd3.training_loss(denoiser, sd3.tiny_scheduler(), batch, torch.Generator().manual_seed(0), train)

    generator = torch.Generator().manual_seed(0)  # as the loss draws them: the noise first, then the levels
    common.sample_noise(batch["latents"], generator, 0.0)
    sigmas, _ = sd3.sample_sigmas(sd3.tiny_scheduler(), 2, generator, make_params().train)
    velocity = loss("none")
    torch.testing.assert_close(loss("sigma_sqrt"), velocity, rtol=1e-4, atol=1e-6)
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(loss("cosmap"), velocity * cosmap * sigmas**2, rtol=1e-4, atol=1e-6)


def test_bad_choices_are_one_line_errors():
    with pytest.raises(UserError, match="train.timestep_density"):
        make_params(timestep_density="lognorm")
    with pytest.raises(UserError, match="train.loss_weighting"):
        make_params(loss_weighting="sqrt")
    with pytest.raises(UserError, match="train.snr_gamma"):
        sd3.check_train(make_params(snr_gamma=5.0).train)
    with pytest.raises(UserError, match="train.noise_offset: sd3 samples from pure Gaussian noise"):
        sd3.check_train(make_params(noise_offset=0.05).train)
    # A UNet's swaps would do nothing to the transformer: the run would be the native one, renamed.
    with pytest.raises(UserError, match="train.group_norm: 'per-channel' swaps a UNet's group norms"):
        sd3.check_train(make_params(group_norm="per-channel").train)
    with pytest.raises(UserError, match="train.upsample: 'broadcast' swaps a UNet's upsamplers"):
        sd3.check_train(make_params(upsample="broadcast").train)
    sd3.check_train(make_params().train)
    v = params_lib.parse({"model": {"family": "sd3", "id": "tiny", "prediction_type": "v_prediction"}})
    with pytest.raises(UserError, match="model.prediction_type"):
        sd3.load_noise_scheduler(v.model)



def test_prediction_type_is_refused_before_the_denoiser_loads(monkeypatch):
    """SD3.5 Large's transformer takes minutes to load: the refusal must not wait for it."""
    from sdtune.train import loop

    def load_denoiser(*args, **kwargs):
        raise AssertionError("the denoiser loaded before model.prediction_type was checked")

    monkeypatch.setattr(sd3, "load_denoiser", load_denoiser)
    v = params_lib.parse({"base": {"device": "cpu"}, "model": {"family": "sd3", "id": "tiny",
                                                                "prediction_type": "v_prediction"}})
    with pytest.raises(UserError, match="^model.prediction_type: 'v_prediction' does not apply to sd3"):
        loop.prepare(v, items=[{}])


def test_real_loading_code_on_a_saved_pipeline(pipe, tmp_path):
    """The hub branch (from_pretrained with subfolders), run on the tiny pipeline saved to a folder."""
    pipe.save_pretrained(tmp_path)
    model = params_lib.parse({"model": {"family": "sd3", "id": str(tmp_path)}}).model
    assert len(sd3.load_tokenizer(model)) == len(pipe.tokenizer_3)  # T5's: the caption limit is its 256 tokens
    assert sd3.load_noise_scheduler(model).config.shift == 3.0
    loaded = sd3.load_denoiser(model)
    torch.testing.assert_close(loaded.state_dict(), pipe.transformer.state_dict())
    light = sd3.load_pipeline(model, transformer=None)  # what the cache stage needs
    assert light.transformer is None
    torch.testing.assert_close(sd3.encode_prompts(light, CAPTIONS), sd3.encode_prompts(pipe, CAPTIONS))


def test_captions_are_cut_at_t5s_length_not_clips(pipe, tmp_path):
    """T5 reads 256 tokens of a caption in the cache and in sampling: cut at CLIP's 77 by the caption
    stage, its longer half never reached training. A checkpoint saved without T5 keeps CLIP's 77."""
    from diffusers import StableDiffusion3Pipeline

    from sdtune.data import captions

    pipe.save_pretrained(tmp_path / "full")
    model = params_lib.parse({"model": {"family": "sd3", "id": str(tmp_path / "full")}}).model
    long = " ".join(["a painting of a harbour at dawn with boats"] * 20)
    assert len(pipe.tokenizer(long).input_ids) > 77
    tokenizer = sd3.load_tokenizer(model)
    kept, _ = captions.truncate(long, tokenizer, tokenizer.model_max_length)
    clip_kept, clip_cut = captions.truncate(long, pipe.tokenizer, 77)
    assert clip_cut and len(kept) > len(clip_kept) and len(tokenizer(kept).input_ids) <= 256
    without = StableDiffusion3Pipeline(**(pipe.components | {"text_encoder_3": None, "tokenizer_3": None}))
    without.save_pretrained(tmp_path / "no-t5")
    model = params_lib.parse({"model": {"family": "sd3", "id": str(tmp_path / "no-t5")}}).model
    assert sd3.load_tokenizer(model).model_max_length == 77


def test_real_ids_fail_with_one_line_offline():
    model = params_lib.parse({"model": {"family": "sd3", "id": "no-such-org/no-such-sd3"}}).model
    for load in (sd3.load_denoiser, sd3.load_noise_scheduler, sd3.load_tokenizer, sd3.load_pipeline):
        with pytest.raises(UserError, match="model.id: could not load 'no-such-org/no-such-sd3'"):
            load(model)


def test_save_load_lora_changes_output_and_scale_zero_does_not(params, trained, tmp_path):
    denoiser, _ = trained
    path = sd3.save_lora(tmp_path, lora.diffusers_state(denoiser), {"base_model": "tiny", "steps": 3},
                         adapter_metadata=lora.config(params.train.lora, sd3.LORA_TARGETS).to_dict())
    assert path == tmp_path / common.LORA_FILE
    meta = io.read_safetensors_metadata(path)
    assert meta["base_model"] == "tiny" and meta["steps"] == "3"
    assert "lora_adapter_metadata" in meta  # diffusers' own metadata survives ours

    def image(pipe):
        return pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = image(gen.pipeline(sd3, params.model, torch.device("cpu")))
    direct = sd3.load_pipeline(params.model)
    direct.load_lora_weights(str(tmp_path), weight_name=common.LORA_FILE)
    # Every trained module comes back with its weights, not only some of them.
    torch.testing.assert_close(get_peft_model_state_dict(direct.transformer, adapter_name="default_0"),
                               lora.peft_state(denoiser))
    with_lora = image(direct)
    off = image(gen.pipeline(sd3, params.model, torch.device("cpu"), lora_dir=tmp_path, lora_scale=0.0))
    assert np.abs(with_lora - base).max() > 1e-3
    np.testing.assert_allclose(off, base, atol=1e-5)  # float32's rounding: see test_family_sdxl's LoRA test


def test_quantization_config_is_applied_and_lora_attaches(params):
    """The QLoRA path: the config reaches from_pretrained (torchao int8 here; NF4 needs CUDA)."""
    torchao_config = pytest.importorskip("torchao.quantization").Int8WeightOnlyConfig
    from diffusers import TorchAoConfig

    denoiser = sd3.load_denoiser(params.model, torch.bfloat16, TorchAoConfig(torchao_config()))
    assert denoiser.hf_quantizer is not None
    assert type(denoiser.transformer_blocks[0].attn.to_q.weight).__name__ != "Parameter"
    lora.add(denoiser, params.train.lora, sd3.LORA_TARGETS)
    assert lora.trainable(denoiser)


def test_cache_then_train_end_to_end(images, sd3_cache, tmp_path):
    raw, _ = images
    cache_dir, rows, counts = sd3_cache
    p = make_params(steps=3, batch_size=2, lr=1e-3, checkpoint_every=2, log_every=1)
    family = get("sd3")
    assert counts["encoded"] == 2
    assert set(cache_lib.load(cache_dir)[0]) == {"latents", "prompt_embeds", "pooled_prompt_embeds"}
    again = cache_lib.build(rows, raw, cache_dir, family, p.model, p.cache)
    assert again["reused"] == 2 and again["encoded"] == 0

    run = loop.setup(p, cache_dir)
    stats = loop.train(run, tmp_path / "ckpt", cache_dir)
    assert stats["steps"] == 3 and np.isfinite(stats["final_loss"])
    assert list((tmp_path / "ckpt").iterdir())  # the step-2 checkpoint
    path = family.save_lora(tmp_path / "lora", loop.final_lora(run), {"base_model": "tiny"})
    pipe = sd3.load_pipeline(p.model)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    torch.testing.assert_close(get_peft_model_state_dict(pipe.transformer, adapter_name="default_0"),
                               lora.peft_state(run.accelerator.unwrap_model(run.denoiser)))


@pytest.mark.parametrize("weighting", params_lib.WEIGHTINGS)
def test_the_loss_and_its_backward_read_nothing_back_to_the_host(params, batch, weighting):
    from conftest import HostReads

    denoiser = sd3.load_denoiser(params.model)
    lora.add(denoiser, params.train.lora, sd3.LORA_TARGETS)
    train, scheduler = make_params(loss_weighting=weighting).train, sd3.load_noise_scheduler(params.model)
    with HostReads() as host:
        loss = sd3.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(0), train).mean()
        loss.backward()
    assert host.reads == []


def compiled_classes(model) -> set:
    return {type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}


def test_generate_compiles_the_blocks_as_training_does(params):
    from sdtune import cli

    pipe = cli.tune(sd3.load_pipeline(params.model), sd3, "default", channels_last=False, compile_=True)
    assert compiled_classes(pipe.transformer) == {"JointTransformerBlock"}  # wrapped now, compiled on first use


def test_compile_takes_the_transformer_blocks_one_by_one_and_trains_as_eager(sd3_cache):
    """train.compile on SD3 compiles each JointTransformerBlock (one graph, reused), not the whole
    transformer, and the compiled loop computes what the eager one does."""
    from accelerate.state import AcceleratorState

    cache_dir = sd3_cache[0]
    losses = {}
    for compiled in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)
        torch._dynamo.reset()
        run = loop.setup(make_params(batch_size=2, lr=1e-3, compile=compiled), cache_dir)
        model = run.accelerator.unwrap_model(run.denoiser)
        assert compiled_classes(model) == ({"JointTransformerBlock"} if compiled else set())
        losses[compiled] = torch.stack([loop.train_step(run, s) for s in range(3)])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
