"""Model families: everything that differs between SD 1.x/2.x, SDXL and SD3.x lives here.

Each family is one module with the same functions (see `base.py`); the rest of sdtune
asks `get(name)` (or `of(params)`) for the module and never checks which family it holds.
"""

import importlib
import json
from pathlib import Path

from sdtune.errors import UserError

MODULES = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3"}


def get(name: str):
    if name not in MODULES:
        raise UserError(f"model.family: unknown family {name!r}; allowed: {', '.join(MODULES)}")
    return importlib.import_module(f"sdtune.families.{MODULES[name]}")


def of(params):
    """The family of `params.model`, once the params agree with it: image sides the denoiser can
    take, and a checkpoint of this family. Both mistakes would otherwise surface stages later (a
    cache of odd-sized latents, a dataset encoded with the wrong text encoders)."""
    model, cache = params.model, params.cache
    family = get(model.family)
    sizes = [("model.resolution", model.resolution)]
    if cache.buckets:
        sizes.append(("cache.bucket_step", cache.bucket_step))
    for key, value in sizes:
        check_size(family, model.family, key, value)
    check_checkpoint(family, model)
    denoiser = checkpoint_config(model, f"{family.DENOISER_ATTR}/config.json")
    check_text_to_image(family, model, denoiser)
    warn_below_native_size(model, denoiser)
    return family


def check_checkpoint(family, model) -> None:
    """A checkpoint whose model_index.json names another family's pipeline is refused, and so is
    one of the other version a family module serves (SD 2.x under sd1: the same classes)."""
    pipeline = checkpoint_config(model, "model_index.json").get("_class_name")
    owner = next((name for name in MODULES if pipeline and get(name).PIPELINE.__name__ == pipeline), None)
    if owner is not None and get(owner) is not family:
        raise UserError(f"model.family: {model.family}, but {model.id!r} is a {pipeline} checkpoint "
                        f"(its model_index.json); set model.family: {owner}")
    if not family.VERSIONS:
        return
    filename, key = family.VERSION_KEY
    value = checkpoint_config(model, filename).get(key)
    if isinstance(value, list) and len(set(value)) == 1:  # diffusers also takes one value per block
        value = value[0]
    owner = next((name for name, known in family.VERSIONS.items() if known == value), None)
    if owner not in (None, model.family):
        raise UserError(f"model.family: {model.family}, but {model.id!r} is an {owner} checkpoint "
                        f"(its {filename} has {key}: {value}); set model.family: {owner}")


def check_text_to_image(family, model, denoiser: dict) -> None:
    """A checkpoint the family's classes load but cannot train as text to image, refused before
    the cache encodes anything: an inpainting, depth or upscaling UNet takes more input channels
    than it predicts (the mask, the depth map, the small image beside the latents), and SDXL's
    refiner conditions on an aesthetic score (5 time ids, not 6). Both failed at the first step.
    `denoiser`: the denoiser's config.json."""
    takes = denoiser.get("in_channels")
    gives = denoiser.get("out_channels") or takes
    if isinstance(takes, int) and takes != gives:
        raise UserError(f"model.id: {model.id!r} is not a text-to-image checkpoint: its {family.DENOISER_ATTR} takes "
                        f"{takes} input channels for {gives} output ones, as inpainting, depth and upscaling models "
                        f"do; use a text-to-image {family.PIPELINE.__name__} checkpoint")
    if checkpoint_config(model, "model_index.json").get("requires_aesthetics_score"):
        raise UserError(f"model.id: {model.id!r} is not a text-to-image checkpoint: its model_index.json has "
                        f"requires_aesthetics_score, as SDXL's refiner; use a text-to-image "
                        f"{family.PIPELINE.__name__} checkpoint (the base model)")


def warn_below_native_size(model, denoiser: dict) -> None:
    """model.resolution defaults to SD 1.5's 512; SDXL and SD3.5 were trained at 1024 and SD 2.1-v at
    768, and below its own size a model trains and samples at its worst, the quality table with it.
    A warning, not an error: training smaller on purpose is a choice (and the cheaper one).
    `denoiser`: the denoiser's config.json."""
    blocks = checkpoint_config(model, "vae/config.json").get("block_out_channels")
    sample = denoiser.get("sample_size")
    if not isinstance(sample, int) or not isinstance(blocks, list) or not blocks:
        return
    native = sample * 2 ** (len(blocks) - 1)  # latents are the VAE's factor smaller than the image
    if model.resolution < native:
        print(f"warning: model.resolution: {model.resolution}, but {model.id!r} was trained at {native}x{native}; "
              f"below it the LoRA trains and samples worse: set model.resolution: {native} unless that is meant")


def check_size(family, name: str, key: str, value: int) -> None:
    """Image sides must be whole latent patches: the VAE's factor times the denoiser's patch."""
    if value % family.SIZE_MULTIPLE:
        raise UserError(f"{key}: {value} is not a multiple of {family.SIZE_MULTIPLE}, which {name} needs "
                        f"({family.SIZE_WHY})")


def checkpoint_config(model, filename: str) -> dict:
    """A JSON file of the checkpoint (model_index.json, unet/config.json); empty for the tiny
    models or when it cannot be read here (the loaders then give their own one-line error)."""
    if model.id == "tiny":
        return {}
    local = Path(model.id) / filename
    if not local.is_file():
        if Path(model.id).exists():
            return {}
        from huggingface_hub import hf_hub_download

        try:
            local = Path(hf_hub_download(model.id, filename, revision=model.revision))
        except Exception:  # noqa: BLE001 - offline, no such repo, no such file: the loaders say which
            return {}
    try:
        config = json.loads(local.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
