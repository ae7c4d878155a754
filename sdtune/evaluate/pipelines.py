"""A pipeline for any variant the evaluate stage compares: the base model, base + LoRA, or a
denoiser the quantize stage saved.

Apart from generate.py so that the train stage, whose validation images sample through
generate.py, does not depend on quantize.py: a change to how variants are saved would
otherwise have thrown away its checkpoints and trained again from step 0.
"""

from sdtune import quantize
from sdtune.evaluate import generate
from sdtune.families import common


def load(family, model, device, *, lora_dir=None, variant_dir=None, method=None, lora_scale=1.0, dtype=None):
    """base: neither; base+LoRA: lora_dir; a quantized variant: variant_dir + method (+ lora_dir
    when its LoRA was kept as an adapter). `dtype` (unquantized only) defaults to compute_dtype."""
    if variant_dir is None:
        return generate.pipeline(family, model, device, lora_dir=lora_dir, lora_scale=lora_scale, dtype=dtype)
    if lora_dir is not None:
        common.lora_path(lora_dir)  # a missing LoRA fails before the model loads
    quantize.check_base(variant_dir, model)
    denoiser = quantize.load_variant(family, variant_dir, method)
    return generate.pipeline(family, model, device, lora_dir=lora_dir, lora_scale=lora_scale,
                             dtype=quantize.METHODS[method].dtype, denoiser=denoiser)
