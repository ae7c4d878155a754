"""Real-size denoisers with random weights, built from their public configs, and their dummy inputs.

Weights cannot be downloaded here, and speed and memory depend on shapes alone, so each model is
built from its config.json, transcribed by hand (from memory of the files; no download) from the
Hugging Face Hub repository named above each dict. Every arch also has a tiny variant: the same
class and block layout with the sizes cut, so CPU tests run the same code paths.

Building never holds a big model on the host: parameters are made on the meta device and then
materialised straight on the target device in the target dtype with a cheap init.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune import families

# stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/...): unet/config.json
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# the same repository: vae/config.json
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
# the same repository: text_encoder/config.json (the text half of openai/clip-vit-large-patch14)
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05, "projection_dim": 768, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
}
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (keys left at their defaults omitted)
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# stabilityai/stable-diffusion-3.5-medium: transformer/config.json (MMDiT-X: dual attention in 0..12)
SD35_MEDIUM = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-large: transformer/config.json
SD35_LARGE = {
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
}

# Tiny variants: the real dict with the sizes cut and the layout (block types, options) kept.
_TINY_UNET = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32,
              "norm_num_groups": 8, "sample_size": 8}
_TINY_SDXL = {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4], "layers_per_block": 1,
              "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 32, "norm_num_groups": 8,
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8, "sample_size": 8}
_TINY_SD3 = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32,
             "joint_attention_dim": 32, "pooled_projection_dim": 16, "pos_embed_max_size": 16, "sample_size": 8}
_TINY_VAE = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}
_TINY_TEXT = {"vocab_size": 514, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32, "bos_token_id": 512, "pad_token_id": 513,
              "eos_token_id": 513}

VAE_FACTOR = 8  # every VAE here downsamples 8x


def _unet_cond(cfg, batch, res, device, dtype):
    return {"encoder_hidden_states": torch.randn(batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)}


def _sdxl_cond(cfg, batch, res, device, dtype):
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    # time_ids: original size, crop top-left, target size (SDXL's micro-conditioning)
    time_ids = torch.tensor([res, res, 0, 0, res, res], device=device, dtype=dtype).repeat(batch, 1)
    return _unet_cond(cfg, batch, res, device, dtype) | {"added_cond_kwargs": {
        "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype), "time_ids": time_ids}}


def _sd3_cond(cfg, batch, res, device, dtype):
    # 77 CLIP tokens + 256 T5 tokens (the pipeline's default max_sequence_length), concatenated.
    return {"encoder_hidden_states": torch.randn(batch, 77 + 256, cfg["joint_attention_dim"], device=device, dtype=dtype),
            "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], device=device, dtype=dtype)}


@dataclass(frozen=True)
class Arch:
    name: str
    cls: type
    config: dict
    tiny: dict              # overrides of `config` for the tiny variant
    cond: Callable          # (config, batch, res, device, dtype) -> the denoiser's conditioning kwargs
    objective: str          # "epsilon" (DDPM) or "flow" (rectified flow)
    sample_arg: str         # the denoiser's keyword for the noisy latents
    res: int                # native resolution
    family: str             # sdtune's model.family, whose training loss `--loop` runs

    @property
    def lora_targets(self) -> list:
        """The family's default LoRA targets, as training uses (SD3 adds the text stream's projections)."""
        return families.get(self.family).LORA_TARGETS

    @property
    def blocks(self) -> tuple:
        """Class names of the repeated blocks (regional compile): the family's own, or for a UNet,
        whose family compiles it whole, its transformer and resnet blocks (--compile-scope blocks)."""
        return families.get(self.family).COMPILE_BLOCKS or ("BasicTransformerBlock", "ResnetBlock2D")


ARCHS = {a.name: a for a in [
    Arch("sd15", UNet2DConditionModel, SD15_UNET, _TINY_UNET, _unet_cond, "epsilon", "sample", 512, "sd1"),
    Arch("sdxl", UNet2DConditionModel, SDXL_UNET, _TINY_SDXL, _sdxl_cond, "epsilon", "sample", 1024, "sdxl"),
    Arch("sd35m", SD3Transformer2DModel, SD35_MEDIUM, _TINY_SD3 | {"dual_attention_layers": [0]}, _sd3_cond,
         "flow", "hidden_states", 1024, "sd3"),
    Arch("sd35l", SD3Transformer2DModel, SD35_LARGE, _TINY_SD3, _sd3_cond, "flow", "hidden_states", 1024, "sd3"),
]}
TINY_RES = 64


def get(name: str) -> Arch:
    if name not in ARCHS:
        raise SystemExit(f"unknown arch {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def config(arch: Arch, tiny: bool = False) -> dict:
    return arch.config | arch.tiny if tiny else dict(arch.config)


@torch.no_grad()
def _init(name: str, t: torch.Tensor) -> None:
    # Cheap and scale-preserving enough for timing: biases 0, norm scales 1, the rest N(0, 0.02).
    if name == "bias":
        t.zero_()
    elif name == "weight" and t.ndim == 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, 0.02)


def materialise(model: torch.nn.Module, device) -> torch.nn.Module:
    """Give every meta parameter real storage on `device` (same dtype) and initialise it.

    Not Module.to_empty: that also empties the buffers, which here already hold computed values
    (position ids, SD3's sin-cos position table).
    """
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty_like(p, device=device)
                _init(name, t)
                setattr(module, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
    return model


def quantize_nf4(model: torch.nn.Module, device, compute_dtype=torch.bfloat16) -> int:
    """Replace every (still meta) nn.Linear by a bitsandbytes NF4 Linear4bit on `device`.

    One layer at a time, so at most one layer's bf16 weight exists unquantized. Every Linear, as
    diffusers' BitsAndBytesConfig does by default. Returns how many layers were replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for child_name, lin in list(parent.named_children()):
            if type(lin) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            w = torch.empty(lin.weight.shape, device=device, dtype=compute_dtype).normal_(0.0, 0.02)
            # Params4bit quantizes on its first move to a real device.
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to(device)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(torch.zeros(lin.out_features, device=device, dtype=compute_dtype),
                                            requires_grad=False)
            setattr(parent, child_name, q)
            replaced += 1
    return replaced


def _empty(factory, device):
    """Run `factory()` with parameters on meta. Buffers go to `device` (they are small and
    computed at init) unless `device` is meta itself."""
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            return factory()
    with torch.device(device), init_empty_weights(include_buffers=False):
        return factory()


def _finish(model, device, dtype, nf4=False):
    model = model.to(dtype)  # on meta: free; the buffers are cast for real
    if torch.device(device).type == "meta":
        return model
    if nf4:
        quantize_nf4(model, device)
    return materialise(model, device).eval()


def build(arch: Arch, tiny=False, device="meta", dtype=torch.float32, nf4=False):
    """The denoiser with random weights on `device` in `dtype` (NF4 linears if `nf4`)."""
    cfg = config(arch, tiny)
    return _finish(_empty(lambda: arch.cls.from_config(cfg), device), device, dtype, nf4)


def build_vae(tiny=False, device="meta", dtype=torch.float32):
    cfg = SD15_VAE | _TINY_VAE if tiny else SD15_VAE
    return _finish(_empty(lambda: AutoencoderKL.from_config(cfg), device), device, dtype)


def build_text_encoder(tiny=False, device="meta", dtype=torch.float32):
    cfg = CLIPTextConfig(**(SD15_TEXT | _TINY_TEXT if tiny else SD15_TEXT))
    return _finish(_empty(lambda: CLIPTextModel(cfg), device), device, dtype)


def inputs(arch: Arch, batch: int, res: int, device, dtype, tiny=False):
    """(latents, conditioning kwargs): random stand-ins for what the cache stage stores."""
    cfg = config(arch, tiny)
    side = res // VAE_FACTOR
    latents = torch.randn(batch, cfg["in_channels"], side, side, device=device, dtype=dtype)
    return latents, arch.cond(cfg, batch, res, device, dtype)


def cache_items(arch: Arch, n: int, res: int, tiny=False) -> list[dict]:
    """`n` items the way the cache stage stores them for the arch's family (one dict per image,
    on the host, float32): what `python -m bench.train_step --loop` feeds the training loop."""
    latents, cond = inputs(arch, n, res, "cpu", torch.float32, tiny)
    batch = {"latents": latents, "prompt_embeds": cond["encoder_hidden_states"]}
    added = cond.get("added_cond_kwargs", {})
    if added:  # SDXL: pooled embeddings and size conditioning
        batch |= {"pooled_prompt_embeds": added["text_embeds"], "time_ids": added["time_ids"]}
    if "pooled_projections" in cond:  # SD3
        batch["pooled_prompt_embeds"] = cond["pooled_projections"]
    return [{k: v[i].clone() for k, v in batch.items()} for i in range(n)]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
