"""Stable Diffusion XL: two CLIP text encoders, a UNet conditioned on pooled text and image sizes.

What differs from SD 1.x/2.x (sd.py):
- the prompt embedding is both encoders' penultimate hidden states side by side, and the
  second encoder's pooled, projected output goes in separately ("text_embeds");
- the UNet is also told each image's original size, crop offset and target size
  ("time_ids", six numbers), so the cache stores them per item.
"""


import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdtune.families import common

PIPELINE = StableDiffusionXLPipeline
DENOISER = UNet2DConditionModel
DENOISER_ATTR = "unet"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
COMPILE_BLOCKS = None  # the whole UNet, as for SD 1.x
SIZE_MULTIPLE = 8  # image sides, in pixels, are multiples of this
SIZE_WHY = "the VAE's factor 8"
SAMPLERS = common.NOISE_SAMPLERS  # `sdtune generate --scheduler` choices besides the default
VERSION_KEY, VERSIONS = None, {}  # one version per family name
KOHYA_VERSIONS = {}  # no kohya copy: its kohya files name the UNet's blocks as sgm does (input_blocks_4_1_...)


# ---- the tiny random-initialised variant (offline tests and the demo) ----
# Modules built from a config start in train mode; from_pretrained returns them in eval mode, so do we.
# Sizes follow diffusers' own SDXL pipeline tests. The two text encoders have hidden size 32
# each, so the prompt embedding is 64 wide (cross_attention_dim); the UNet's added embedding
# takes 6 time ids x addition_time_embed_dim 8 + the pooled projection 32 = 80 inputs.

TEXT_DIM = 32
TIME_EMBED_DIM = 8


def tiny_unet():
    with common.seeded(11):
        return UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(2, 4), norm_num_groups=1, attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * TEXT_DIM,
            addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,
        ).eval()


def tiny_vae():
    with common.seeded(12):
        # scaling_factor and force_upcast as in SDXL's own VAE config.
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=128, scaling_factor=0.13025, force_upcast=True,
        ).eval()


def _tiny_text_config():
    # Token ids match common.clip_tokenizer(): bos 512, eos = pad 513 (so the pooled output is
    # read at the first eos, as with the real CLIP).
    return CLIPTextConfig(
        vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=TEXT_DIM,
    )


def tiny_text_encoder():
    with common.seeded(13):
        return CLIPTextModel(_tiny_text_config()).eval()


def tiny_text_encoder_2():
    with common.seeded(14):
        return CLIPTextModelWithProjection(_tiny_text_config()).eval()


def tiny_sampling_scheduler(model):
    """The pipeline's sampler: Euler, as SDXL ships with."""
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                  prediction_type=common.prediction_type(model))


# ---- loading ----

load_noise_scheduler = common.load_ddpm_scheduler  # DDPM with SDXL's betas


def load_denoiser(model, dtype=torch.float32, quantization_config=None):
    return common.load_denoiser(model, DENOISER, "unet", tiny_unet, dtype, quantization_config)


load_tokenizer = common.load_tokenizer


def load_pipeline(model, dtype=torch.float32, **components):
    """The whole pipeline; `components` (e.g. unet=...) replace the loaded ones.

    No invisible watermark: it needs an extra package and changes the pixels the evaluation measures.
    """
    if model.id == "tiny":
        parts = dict(unet=common.cast(tiny_unet(), dtype), vae=common.cast(tiny_vae(), dtype),
                     text_encoder=common.cast(tiny_text_encoder(), dtype),
                     text_encoder_2=common.cast(tiny_text_encoder_2(), dtype),
                     tokenizer=common.clip_tokenizer(), tokenizer_2=common.clip_tokenizer(),
                     scheduler=tiny_sampling_scheduler(model)) | components
        return PIPELINE(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe = common.from_hub(model, PIPELINE, dtype=dtype, add_watermarker=False, **components)
    common.set_prediction_type(pipe.scheduler, model)
    return pipe


# ---- what the cache stores ----

@torch.no_grad()
def encode_images(pipe, pixels, meta):
    """pixels: float in [-1, 1], [B, 3, H, W]; meta: per image {"original_size", "crop_top_left"}.

    Returns the scaled latents and the six size/crop numbers SDXL's UNet is conditioned on:
    (original h, w, crop top, left, target h, w).
    """
    vae = pipe.vae
    latents = common.encode_latents(vae, pixels)  # in float32: SDXL's VAE overflows in float16
    target = tuple(pixels.shape[-2:])
    # Integers, so a bfloat16 cache cannot round a size (3000 would become 3008).
    time_ids = torch.tensor([[*m["original_size"], *m["crop_top_left"], *target] for m in meta],
                            dtype=torch.int64)
    # A VAE with per-channel latent statistics (e.g. Playground v2.5's) is normalised with them:
    # the pipeline decodes latents * std / scaling_factor + mean.
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1) for v in (mean, std))
        return {"latents": (latents - mean) * vae.config.scaling_factor / std, "time_ids": time_ids}
    return {"latents": latents * vae.config.scaling_factor, "time_ids": time_ids}


@torch.no_grad()
def encode_prompts(pipe, captions):
    """The pipeline's own encode_prompt, so training sees exactly what sampling will."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        captions, device=pipe.text_encoder_2.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


# ---- the objective ----

check_train = common.check_epsilon_train


def training_loss(denoiser, scheduler, batch, generator, train):
    latents = batch["latents"].float()  # the noising in float32: see common.sample_noise
    noise = common.sample_noise(latents, generator, train.noise_offset)
    timesteps = common.sample_timesteps(scheduler, latents.shape[0], generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    # float32, not the latents' dtype: bfloat16 would round a size (1023 to 1024), and the UNet
    # embeds the six numbers in float32 anyway
    dtype = common.model_dtype(denoiser)
    added = {"text_embeds": batch["pooled_prompt_embeds"].to(dtype), "time_ids": batch["time_ids"].float()}
    pred = denoiser(noisy.to(dtype), timesteps, encoder_hidden_states=batch["prompt_embeds"].to(dtype),
                    added_cond_kwargs=added).sample
    return common.diffusion_loss(pred, latents, noise, timesteps, scheduler, train)


# ---- LoRA file ----

def save_lora(directory, state_dict, metadata, adapter_metadata=None):
    # One key style throughout, for the reason in sd.save_lora.
    return common.save_lora(PIPELINE, directory, metadata,
                            unet_lora_layers=convert_unet_state_dict_to_peft(state_dict),
                            unet_lora_adapter_metadata=adapter_metadata)
