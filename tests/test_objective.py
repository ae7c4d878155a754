"""The epsilon/v objective of SD 1.x and SDXL (families.common) against references written out from
the formulas: the target (epsilon: the noise; v: sqrt(ᾱ)·noise − sqrt(1−ᾱ)·x0), min-SNR-γ weights
(min(snr, γ)/snr for epsilon, min(snr, γ)/(snr + 1) for v), the noise offset and the timesteps' range."""

import pytest
import torch

from bench import archs
from sdtune import params as params_lib
from sdtune.families import common, get

GAMMA = 5.0


def setup(arch: str, n: int = 8, **model):
    """The family, bench's tiny random denoiser of `arch`, `n` cached-like items stacked into a batch,
    and params with these model keys."""
    spec = archs.get(arch)
    torch.manual_seed(0)
    denoiser = archs.build(spec, True, torch.device("cpu"), torch.float32)
    items = archs.cache_items(spec, n, archs.TINY_RES, tiny=True)
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    p = params_lib.parse({"model": {"family": spec.family, "id": "tiny", **model}})
    return get(spec.family), denoiser, batch, p


def predict(denoiser, noisy, t, batch):
    added = {}
    if "time_ids" in batch:  # SDXL's pooled embeddings and size conditioning
        added = {"added_cond_kwargs": {"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]}}
    return denoiser(noisy, t, encoder_hidden_states=batch["prompt_embeds"], **added).sample


def reference_loss(denoiser, scheduler, batch, seed, prediction, snr_gamma=None, offset=0.0):
    """Per-sample loss from the formulas, drawing as the objective documents: the noise (and its
    per-channel offset) first, then the timesteps uniformly over the whole schedule."""
    x0 = batch["latents"].float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn((*x0.shape[:2], 1, 1), generator=g)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    abar = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        pred = predict(denoiser, noisy, t, batch)
    target = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = (abar / (1 - abar)).flatten()
    if snr_gamma is not None:
        capped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        loss = loss * (capped / snr if prediction == "epsilon" else capped / (snr + 1))
    return loss, snr


CASES = [
    pytest.param("epsilon", None, 0.0, id="epsilon"),
    pytest.param("v_prediction", None, 0.0, id="v"),
    pytest.param("epsilon", GAMMA, 0.0, id="epsilon-min-snr"),
    pytest.param("v_prediction", GAMMA, 0.0, id="v-min-snr"),
    pytest.param("epsilon", None, 0.1, id="epsilon-noise-offset"),
]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize(("prediction", "snr_gamma", "offset"), CASES)
def test_training_loss_is_the_formulas_loss(arch, prediction, snr_gamma, offset):
    family, denoiser, batch, p = setup(arch, prediction_type=prediction)
    train = params_lib.parse({"train": {"snr_gamma": snr_gamma, "noise_offset": offset}}).train
    scheduler = family.load_noise_scheduler(p.model)
    with torch.no_grad():
        loss = family.training_loss(denoiser, scheduler, batch, torch.Generator().manual_seed(11), train)
    want, snr = reference_loss(denoiser, scheduler, batch, 11, prediction, snr_gamma, offset)
    if snr_gamma is not None:  # timesteps on both sides of γ, so a weight capped the wrong way shows
        assert (snr < snr_gamma).any() and (snr > snr_gamma).any()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_finite_at_a_zero_terminal_snr_step(prediction):
    """With rescale_betas_zero_snr the last step's SNR is 0: epsilon's min(snr, γ)/snr was 0/0, a NaN
    loss that stopped the run. Its limit is 1 (v's weight there is 0)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction)
    assert scheduler.alphas_cumprod[-1] == 0
    train = params_lib.parse({"train": {"snr_gamma": GAMMA}}).train
    g = torch.Generator().manual_seed(0)
    latents, noise, pred = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    timesteps = torch.tensor([999, 500, 0])
    loss = common.diffusion_loss(pred, latents, noise, timesteps, scheduler, train)
    unweighted = common.diffusion_loss(pred, latents, noise, timesteps, scheduler,
                                       params_lib.parse({"train": {"snr_gamma": None}}).train)
    assert torch.isfinite(loss).all()
    assert loss[0] == (unweighted[0] if prediction == "epsilon" else 0)
    assert loss[2] < unweighted[2]  # the capped, easy low-noise step still down-weighted


def test_timesteps_cover_the_whole_schedule():
    scheduler = common.tiny_ddpm_scheduler(params_lib.parse({"model": {"id": "tiny"}}).model)
    t = common.sample_timesteps(scheduler, 20_000, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.int64 and t.shape == (20_000,)
    assert t.min() == 0 and t.max() == scheduler.config.num_train_timesteps - 1
    assert len(t.unique()) == scheduler.config.num_train_timesteps
    # uniform: each tenth of the schedule gets about a tenth of the draws
    counts = torch.bincount(t // 100, minlength=10)
    assert ((counts > 1800) & (counts < 2200)).all(), counts
