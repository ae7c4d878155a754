"""Stable Diffusion 3.x (SD3.5 Medium/Large): two CLIP encoders and T5, an MMDiT transformer,
rectified flow matching."""

import string

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5Tokenizer)

from sdtune import runtime
from sdtune.errors import UserError
from sdtune.families import common

PIPELINE = StableDiffusion3Pipeline
DENOISER = SD3Transformer2DModel
DENOISER_ATTR = "transformer"
# Attention projections of the joint blocks: the image stream (to_*) and the text stream (add_*,
# to_add_out). The suffixes also catch SD3.5's second image-only attention (attn2).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# 24 (Medium) or 38 (Large) identical blocks: compiled one at a time, the graph is built once and
# reused, which is how bench/ measured SD3.5 Medium at 225 ms/step on an H200 (386 ms eager).
COMPILE_BLOCKS = ("JointTransformerBlock",)
SIZE_MULTIPLE = 16  # image sides, in pixels, are multiples of this
SIZE_WHY = "the VAE's factor 8 times the transformer's patch size 2"
# A flow-matching model: the noise schedulers (Euler, DDIM, DPM) built from its config fall back to
# DDPM betas and sample it wrongly without an error, so only its own FlowMatchEuler samples it.
SAMPLERS = {}
VERSION_KEY, VERSIONS = None, {}  # one version per family name
KOHYA_VERSIONS = {}  # no kohya copy: kohya's keys are for UNets

# T5 tokens per prompt: the pipeline's own default at inference, so training sees the same context.
T5_MAX_LENGTH = 256



# ---- the tiny random-initialised variant (offline tests and the demo) ----
# Sizes follow diffusers' SD3 pipeline tests, made consistent: CLIP hidden 32 + 32 = 64 = T5 width =
# joint_attention_dim, so the CLIP states are padded by nothing; pooled 32 + 32 = pooled_projection_dim.
# Modules built from a config start in train mode; from_pretrained returns them in eval mode, so do we.

def tiny_transformer():
    with common.seeded(1):
        return SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64,
            dual_attention_layers=(0,), qk_norm="rms_norm",  # SD3.5's MMDiT-X layout
        ).eval()


def tiny_vae():
    with common.seeded(2):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5305,
        ).eval()


def tiny_clip(seed):
    with common.seeded(seed):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
            max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        )).eval()


def tiny_t5_tokenizer():
    """T5's layout (<pad>=0, </s>=1, <unk>=2, then pieces) with one piece per printable character;
    built in code, so nothing is read from disk or the hub."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if not c.isspace()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_t5():
    with common.seeded(5):
        return T5EncoderModel(T5Config(
            vocab_size=len(tiny_t5_tokenizer()), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        )).eval()


def tiny_scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3.5's config


# ---- loading ----

def _flow_only(model):
    if model.prediction_type != "default":
        raise UserError(f"model.prediction_type: {model.prediction_type!r} does not apply to sd3, which "
                        f"is trained by flow matching; leave it at 'default'")


def load_noise_scheduler(model):
    _flow_only(model)
    if model.id == "tiny":
        return tiny_scheduler()
    return common.from_hub(model, FlowMatchEulerDiscreteScheduler, "scheduler")


def load_denoiser(model, dtype=torch.float32, quantization_config=None):
    """The transformer alone; `quantization_config` (e.g. BitsAndBytesConfig NF4 for QLoRA on
    SD3.5 Large) is applied as it loads."""
    return common.load_denoiser(model, DENOISER, "transformer", tiny_transformer, dtype, quantization_config)


def load_tokenizer(model):
    """The caption limit's tokenizer: T5's, at the length the cache and sampling encode (256
    tokens). T5 reads a caption up to there; the CLIP encoders read its first 77, as the pipeline
    has them. A checkpoint saved without T5 has CLIP's limit."""
    if model.id == "tiny":
        return tiny_t5_tokenizer()
    from transformers import AutoTokenizer

    from sdtune.families import checkpoint_config

    entry = checkpoint_config(model, "model_index.json").get("tokenizer_3")
    if isinstance(entry, list) and entry[0] is None:
        return common.load_tokenizer(model)
    tokenizer = common.from_hub(model, AutoTokenizer, "tokenizer_3")
    tokenizer.model_max_length = T5_MAX_LENGTH
    return tokenizer


def load_pipeline(model, dtype=torch.float32, **components):
    """The whole pipeline; `components` (e.g. transformer=..., or transformer=None to skip it) replace
    the loaded ones."""
    if model.id == "tiny":
        parts = dict(transformer=tiny_transformer(), vae=tiny_vae(),
                     text_encoder=tiny_clip(3), text_encoder_2=tiny_clip(4), text_encoder_3=tiny_t5(),
                     tokenizer=common.clip_tokenizer(), tokenizer_2=common.clip_tokenizer(),
                     tokenizer_3=tiny_t5_tokenizer(), scheduler=tiny_scheduler())
        # Cast only what we built: a passed-in component (maybe quantized) keeps its own dtype.
        parts = {k: common.cast(v, dtype) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
        return PIPELINE(**(parts | components))
    return common.from_hub(model, PIPELINE, dtype=dtype, **components)


# ---- what the cache stores ----

@torch.no_grad()
def encode_images(pipe, pixels, meta=None):
    """pixels: float in [-1, 1], [B, 3, H, W]. The latents are shifted and scaled, ready for the
    transformer (the pipeline undoes exactly this before decoding)."""
    vae = pipe.vae
    latents = common.encode_latents(vae, pixels)
    return {"latents": (latents - vae.config.shift_factor) * vae.config.scaling_factor}


@torch.no_grad()
def encode_prompts(pipe, captions):
    """The pipeline's own encoder, so training and sampling condition the same way: CLIP-L and
    CLIP-G penultimate states side by side, zero-padded to T5's width, then the T5 sequence after
    them; pooled = both CLIP projections side by side."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_MAX_LENGTH)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


# ---- the objective ----

def check_train(train) -> None:
    """The train keys flow matching or the transformer cannot honour, refused before anything
    loads or a checkpoint is removed."""
    if train.snr_gamma is not None:
        raise UserError("train.snr_gamma: min-SNR weighting is for epsilon/v models; sd3 is trained by "
                        "flow matching, so leave it unset and use train.loss_weighting")
    if train.noise_offset:
        raise UserError("train.noise_offset: sd3 samples from pure Gaussian noise at sigma 1, and an offset "
                        "would train it to start elsewhere; leave it 0 for sd3")
    # Both swap layers a UNet has; the transformer has none, so the run would time or train the
    # native model under another name.
    if train.group_norm != "native":
        raise UserError(f"train.group_norm: {train.group_norm!r} swaps a UNet's group norms; sd3's transformer "
                        "has none, so leave it native")
    if train.upsample != "native":
        raise UserError(f"train.upsample: {train.upsample!r} swaps a UNet's upsamplers; sd3's transformer "
                        "has none, so leave it native")


def sample_sigmas(scheduler, batch_size, generator, train):
    """Noise levels for a batch, from the configured density over the scheduler's (shifted) table,
    the same table sampling walks down. Returns (sigmas, timesteps), each [B]."""
    # params checked the names: diffusers treats any unknown one as uniform / unweighted.
    u = compute_density_for_timestep_sampling(
        train.timestep_density, batch_size, logit_mean=train.logit_mean, logit_std=train.logit_std,
        mode_scale=train.mode_scale, generator=generator)
    n = scheduler.config.num_train_timesteps
    index = (u * n).long().clamp(0, n - 1)
    return scheduler.sigmas[index], scheduler.timesteps[index]


def training_loss(denoiser, scheduler, batch, generator, train):
    """The flow-matching loss. `none`: the velocity MSE, the SD3 paper's objective. `sigma_sqrt` and
    `cosmap` are diffusers' weightings, which its SD3 trainer applies to the loss on the image the
    prediction implies (x0 = noisy - sigma * v, its default --precondition_outputs); that loss is
    sigma² times the velocity's, so applied to the velocity's they weight otherwise (sigma_sqrt by
    sigma⁻², up to 1e5 near sigma 0). They are applied where diffusers applies them."""
    weighting = train.loss_weighting
    latents = batch["latents"].float()  # the noising in float32: see common.sample_noise
    noise = common.sample_noise(latents, generator, train.noise_offset)
    sigmas, timesteps = sample_sigmas(scheduler, latents.shape[0], generator, train)
    sigmas = runtime.to_device(sigmas, latents.device).to(latents.dtype).view(-1, 1, 1, 1)
    timesteps = runtime.to_device(timesteps, latents.device)
    # Rectified flow: a straight line from the image (sigma 0) to noise (sigma 1); the model
    # predicts its velocity, noise - x0.
    noisy = (1 - sigmas) * latents + sigmas * noise
    # The timesteps stay float32: the denoiser embeds them itself, and bf16 would round 999 to 1000.
    dtype = common.model_dtype(denoiser)
    pred = denoiser(hidden_states=noisy.to(dtype), timestep=timesteps,
                    encoder_hidden_states=batch["prompt_embeds"].to(dtype),
                    pooled_projections=batch["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]
    target = noise - latents
    if weighting != "none":  # on the implied image, as diffusers' trainer weights it
        pred, target = noisy - sigmas * pred, latents
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return loss * compute_loss_weighting_for_sd3(weighting, sigmas.flatten().float())


# ---- LoRA file ----

def save_lora(directory, state_dict, metadata, adapter_metadata=None):
    """diffusers keys via the pipeline's own writer, then our provenance added as metadata."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    # One key style throughout (peft's lora_A/lora_B, as diffusers' own SD3 trainer writes). The
    # UNet-style conversion renames to_q/to_k/to_v/to_out.0 to lora.down/up but not add_*; given such
    # a mix, load_lora_weights judges the format by the first key and silently skips the rest.
    return common.save_lora(PIPELINE, directory, metadata,
                            transformer_lora_layers=convert_unet_state_dict_to_peft(state_dict),
                            transformer_lora_adapter_metadata=adapter_metadata)
