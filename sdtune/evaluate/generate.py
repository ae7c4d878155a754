"""Build a pipeline for one variant (base, base+LoRA, a saved quantized denoiser) and sample it."""

import torch
from tqdm import tqdm

from sdtune import quantize
from sdtune.errors import UserError
from sdtune.families import common


def compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (the reference), bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def add_lora(pipe, lora_dir, scale: float = 1.0):
    """Load the LoRA into the pipeline; a LoRA made for another architecture is one clear line."""
    path = common.lora_path(lora_dir)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="sdtune")
    except (ValueError, RuntimeError, KeyError) as err:
        meta = common.read_metadata(path)
        raise UserError(f"{path}: this LoRA does not fit the base model (it was trained on "
                        f"{meta.get('base_model', 'an unknown model')!r}): {str(err).splitlines()[0][:200]}") from None
    pipe.set_adapters(["sdtune"], [scale])
    return pipe


def pipeline(family, model, device, *, lora_dir=None, variant_dir=None, method=None, lora_scale=1.0):
    """base: neither; base+LoRA: lora_dir; a quantized variant: variant_dir + method (+ lora_dir
    when its LoRA was kept as an adapter)."""
    if variant_dir is not None:
        denoiser = quantize.load_variant(family, variant_dir, method)
        dtype = quantize.METHODS[method].dtype
        pipe = family.load_pipeline(model, dtype, **{family.DENOISER_ATTR: denoiser})
    else:
        dtype = compute_dtype(device)
        pipe = family.load_pipeline(model, dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if lora_dir is not None:
        add_lora(pipe, lora_dir, lora_scale)
    return pipe


def sample(pipe, prompt: str, seed: int, *, steps: int, guidance: float, size: int, **extra):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                generator=generator, **extra).images[0]


def sample_all(pipe, prompts, seeds, *, steps, guidance, size, desc="generate"):
    """Every prompt x seed, in a fixed order: [(prompt, seed, PIL image)]."""
    jobs = [(p, s) for p in prompts for s in seeds]
    return [(p, s, sample(pipe, p, s, steps=steps, guidance=guidance, size=size))
            for p, s in tqdm(jobs, desc=desc, unit="image")]
