"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, epsilon or v-prediction."""


import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.families import common

PIPELINE = StableDiffusionPipeline
DENOISER = UNet2DConditionModel
DENOISER_ATTR = "unet"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
COMPILE_BLOCKS = None  # the whole UNet, as bench/ measured it (its blocks come in four widths)
SIZE_MULTIPLE = 8  # image sides, in pixels, are multiples of this
SIZE_WHY = "the VAE's factor 8"
SAMPLERS = common.NOISE_SAMPLERS  # `sdtune generate --scheduler` choices besides the default
# SD 1.x and 2.x share every class. The UNet's cross-attention width tells them apart (CLIP ViT-L's
# 768 against OpenCLIP ViT-H's 1024), and the kohya export writes which one it is.
VERSION_KEY = ("unet/config.json", "cross_attention_dim")
VERSIONS = {"sd1": 768, "sd2": 1024}
# kohya's keys are diffusers' UNet names flattened: A1111 and ComfyUI load this copy too.
KOHYA_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2"}


# ---- the tiny random-initialised variant (offline tests and the demo) ----
# Modules built from a config start in train mode; from_pretrained returns them in eval mode, so do we.

def tiny_unet():
    with common.seeded(1):
        return UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ).eval()


def tiny_vae():
    with common.seeded(2):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32,
        ).eval()


def tiny_text_encoder():
    with common.seeded(3):
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
            max_position_embeddings=77,
        )).eval()


# ---- loading ----

load_noise_scheduler = common.load_ddpm_scheduler


def load_denoiser(model, dtype=torch.float32, quantization_config=None):
    return common.load_denoiser(model, DENOISER, "unet", tiny_unet, dtype, quantization_config)


load_tokenizer = common.load_tokenizer


def load_pipeline(model, dtype=torch.float32, **components):
    """The whole pipeline; `components` (e.g. unet=...) replace the loaded ones."""
    if model.id == "tiny":
        parts = dict(unet=common.cast(tiny_unet(), dtype), vae=common.cast(tiny_vae(), dtype),
                     text_encoder=common.cast(tiny_text_encoder(), dtype), tokenizer=common.clip_tokenizer(),
                     scheduler=common.tiny_ddpm_scheduler(model)) | components
        return PIPELINE(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = common.from_hub(model, PIPELINE, dtype=dtype, safety_checker=None,
                           requires_safety_checker=False, **components)
    common.set_prediction_type(pipe.scheduler, model)
    return pipe


# ---- what the cache stores ----

@torch.no_grad()
def encode_images(pipe, pixels, meta=None):
    """pixels: float in [-1, 1], [B, 3, H, W]. The latents are scaled, ready for the UNet."""
    vae = pipe.vae
    latents = common.encode_latents(vae, pixels)
    return {"latents": latents * vae.config.scaling_factor}


@torch.no_grad()
def encode_prompts(pipe, captions):
    """The pipeline's own encode_prompt, so training sees exactly what sampling will (a text
    encoder whose config sets use_attention_mask gets its padding mask there too)."""
    prompt_embeds, _ = pipe.encode_prompt(
        captions, device=pipe.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"prompt_embeds": prompt_embeds}


# ---- the objective ----

check_train = common.check_epsilon_train


def training_loss(denoiser, scheduler, batch, generator, train):
    latents = batch["latents"].float()  # the noising in float32: see common.sample_noise
    noise = common.sample_noise(latents, generator, train.noise_offset)
    timesteps = common.sample_timesteps(scheduler, latents.shape[0], generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    dtype = common.model_dtype(denoiser)
    pred = denoiser(noisy.to(dtype), timesteps, encoder_hidden_states=batch["prompt_embeds"].to(dtype)).sample
    return common.diffusion_loss(pred, latents, noise, timesteps, scheduler, train)


# ---- LoRA file ----

def save_lora(directory, state_dict, metadata, adapter_metadata=None):
    # One key style throughout (peft's lora_A/lora_B): the diffusers conversion writes attention
    # projections as lora.down/up but conv and other modules as lora_A/B, and given such a mix
    # load_lora_weights judges the format by the first key and silently skips the rest.
    return common.save_lora(PIPELINE, directory, metadata,
                            unet_lora_layers=convert_unet_state_dict_to_peft(state_dict),
                            unet_lora_adapter_metadata=adapter_metadata)
