"""Build the base model's pipeline, with a LoRA, and sample it (a quantized variant's: pipelines.py)."""

import contextlib
import re
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from sdtune import io
from sdtune.errors import UserError
from sdtune.families import common
from sdtune.train import kohya

# SDXL kohya files name UNet blocks as sgm does (input_blocks_4_1_...); diffusers' converter maps those.
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


def read_prompts(path, key: str) -> list[str]:
    """One prompt per line, # for comments; `key` names where the path came from in errors."""
    if not str(path).strip():  # Path("") is ".", which "not found" would name
        raise UserError(f"{key}: empty; name a text file of prompts, one per line")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key}: {path} is a folder; name a text file of prompts in it, one per line")
    if not path.is_file():
        raise UserError(f"{key}: {path} not found (one prompt per line)")
    prompts = [line.strip() for line in io.read_text(path, key).splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{key}: {path} holds no prompt (one per line, # for comments)")
    return prompts


def add_lora(pipe, lora_dir, scale: float = 1.0):
    """Load the LoRA into the pipeline; a LoRA made for another architecture is one clear line."""
    path = common.lora_path(lora_dir)
    keys, meta = io.read_safetensors_header(path)
    trained_on = meta.get("base_model", "an unknown model")

    def misfit(reason):
        return UserError(f"{path}: this LoRA does not fit the base model (it was trained on "
                         f"{trained_on!r}): {reason[:300]}")

    missing, total = _missing_modules(pipe, keys)
    if missing:
        raise misfit(f"{len(missing)} of its {total} modules are not in the model, e.g. {missing[0]}")
    try:
        with _libraries_silent():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="sdtune")
    except (ValueError, RuntimeError, KeyError) as err:
        raise misfit(_reason(err)) from None
    if not any("sdtune" in names for names in pipe.get_list_adapters().values()):
        # Keys diffusers did not recognise for any component are skipped without an error.
        raise misfit("none of its weights matched a component of the pipeline")
    pipe.set_adapters(["sdtune"], [scale])
    trained, sampled = meta.get("prediction_type", "default"), pipe.scheduler.config.get("prediction_type")
    if trained != "default" and sampled is not None and trained != sampled:
        print(f"warning: {path}: this LoRA was trained to predict {trained} (model.prediction_type), but the "
              f"pipeline samples with {sampled}: set model.prediction_type: {trained}")
    # peft adds the LoRA's dropout in training mode: the same seed must give the same image.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _missing_modules(pipe, keys):
    """The modules a LoRA targets that the pipeline lacks, for diffusers keys
    (`unet.<module>.lora...`) and kohya's UNet keys (`lora_unet_<module with "_" for ".">...`).

    diffusers only warns about such keys and loads the rest, so a LoRA made for another
    architecture could load and silently do little or nothing. Other layouts (kohya's text
    encoder and SDXL sgm names) are left to diffusers' converters. Returns (missing, number of modules)."""
    wanted = {}  # (component, module as the file spells it) -> how to name it in an error
    for key in keys:
        component, _, rest = key.partition(".")
        if component.startswith(kohya.KOHYA_PREFIX):
            module = component.removeprefix(kohya.KOHYA_PREFIX)
            if not module.startswith(SGM_BLOCKS):
                wanted["unet", module] = component
            continue
        parts = re.split(r"\.(?=lora[._]|alpha$)", rest, maxsplit=1)
        if len(parts) == 2:
            wanted[component, parts[0]] = f"{component}.{parts[0]}"
    present = {}
    for c in {c for c, _ in wanted}:
        model = pipe.components.get(c)  # a LoRA for a component this pipeline lacks: all missing
        names = {name for name, _ in model.named_modules()} if isinstance(model, torch.nn.Module) else set()
        # kohya's names, flattened: flattening ours is exact, undoing kohya's is not (down_blocks)
        present[c] = names | {kohya.flat(name) for name in names}
    return sorted(shown for (c, m), shown in wanted.items() if m not in present[c]), len(wanted)


def _reason(err) -> str:
    """The informative line of a load error (torch puts "size mismatch for ..." on line 2+)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if "mismatch" in line), lines[0])


@contextlib.contextmanager
def _libraries_silent():
    """diffusers logs its own copy of a load error and warns about unmatched keys, peft warns about
    config/state-dict differences; add_lora reports what matters as one line, so they are off here."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(level)


def pipeline(family, model, device, *, lora_dir=None, lora_scale=1.0, dtype=None, denoiser=None):
    """The base model, with the LoRA in lora_dir when given. `denoiser`: one loaded already (a
    quantized variant's, pipelines.load), in `dtype`; `dtype` defaults to compute_dtype."""
    if lora_dir is not None:
        common.lora_path(lora_dir)  # a missing LoRA fails before the model loads
    dtype = dtype or common.compute_dtype(device)
    pipe = family.load_pipeline(model, dtype, **({family.DENOISER_ATTR: denoiser} if denoiser is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if lora_dir is not None:
        add_lora(pipe, lora_dir, lora_scale)
    return pipe


def sample(pipe, prompt: str, seed: int, *, steps: int, guidance: float | None, size: int, **extra):
    """One image, its noise from a CPU generator seeded with `seed`; guidance None keeps the
    pipeline's default guidance scale."""
    generator = torch.Generator("cpu").manual_seed(seed)
    if guidance is not None:
        extra["guidance_scale"] = guidance
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                **extra).images[0]


def sample_all(pipe, prompts, seeds, *, steps, guidance, size, desc="generate"):
    """Every prompt x seed, in a fixed order: [(prompt, seed, PIL image)]."""
    jobs = [(p, s) for p in prompts for s in seeds]
    return [(p, s, sample(pipe, p, s, steps=steps, guidance=guidance, size=size))
            for p, s in tqdm(jobs, desc=desc, unit="image")]
