"""The `sdtune` command: `sdtune generate` samples the base model, base + LoRA or a quantized variant.

    sdtune generate --prompt "a portrait" --lora models/lora --out out.png
    sdtune generate --prompts prompts/eval.txt --seeds 1,2,3 --variant int8wo-fused --out samples/

Defaults come from params.yaml (model section; steps, guidance and LoRA scale from evaluate;
the size from model.resolution; the seed from base.seed). Every user mistake is one line,
`error: ...`, and exit code 2.
"""

import argparse
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

from sdtune.errors import UserError, main_guard
from sdtune.params import FAMILIES, repeated  # light: pydantic only; torch and diffusers load after quiet_libraries()

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # --out suffix -> Pillow format
SCHEDULERS = ("default", "euler", "ddim", "dpm")  # default: the checkpoint's; the others: a family's SAMPLERS


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one `error: ...` line (exit 2) instead of usage + message."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def seeds_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser() -> Parser:
    parser = Parser(prog="sdtune", description="LoRA fine-tuning of Stable Diffusion: tools beside the DVC stages.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="sample the base model, base + LoRA, or a quantized variant")
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt")
    what.add_argument("--prompts", help="a text file, one prompt per line (# comments)")
    g.add_argument("--out", type=Path, required=True,
                   help="an image file for one image; a folder with --prompts or several seeds")
    g.add_argument("--lora", type=Path, help="LoRA folder (models/lora) or .safetensors file")
    g.add_argument("--lora-scale", type=float, help="LoRA strength (default: evaluate.lora_scale)")
    g.add_argument("--variant", help="a quantized variant in models/quantized/, e.g. int8wo-fused")
    g.add_argument("--params", type=Path, help="params file (default: ./params.yaml if present)")
    g.add_argument("--model-id", help="base model (default: params model.id)")
    g.add_argument("--revision", help="base model revision (default: params model.revision, or main with --model-id)")
    g.add_argument("--family", choices=FAMILIES, help="model family (default: params model.family)")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="default: params base.seed")
    seeds.add_argument("--seeds", type=seeds_list, help="several seeds, e.g. 1,2,3")
    g.add_argument("--steps", type=int, help="denoising steps (default: evaluate.steps)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: evaluate.guidance_scale, or the pipeline's own)")
    g.add_argument("--size", type=int, help="image height and width in pixels (default: model.resolution)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="default", help="sampling scheduler")
    g.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for the denoiser")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: params base.device")
    return parser


def quiet_libraries() -> None:
    """Library notices (import-time messages, logging) would bury the one line a mistake gets.
    Called before torch/diffusers are imported, so the environment variables still count."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):  # sdtune/__init__.py already quiets the import-time ones
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore", FutureWarning)  # deprecation notices meant for sdtune's developers


def load_params(args):
    from sdtune import params as params_lib

    if args.params is not None:
        params = params_lib.load(args.params)
    elif Path("params.yaml").is_file():
        params = params_lib.load("params.yaml")
    else:
        params = params_lib.parse({})  # outside a checkout: the defaults (SD 1.5)
    model = params.model.model_dump()
    if args.model_id is not None:
        # Another model: the params' pinned revision belongs to the params' model.
        model |= {"id": args.model_id, "revision": args.revision or "main"}
    elif args.revision is not None:
        model["revision"] = args.revision
    if args.family is not None:
        model["family"] = args.family
    raw = params.model_dump() | {"model": model}
    return params_lib.parse(raw, "command line")


def variant_kwargs(name, lora, lora_scale=None):
    """pipeline() arguments for models/quantized/<name>/: method-mode, e.g. int8wo-fused."""
    from sdtune import quantize

    have = quantize.saved_variants()
    if name not in have:
        listed = ", ".join(have) if have else "none (run the quantize stage or dvc pull)"
        raise UserError(f"--variant: no variant {name!r} in {quantize.QUANT_DIR}/; available: {listed}")
    quantize.check_method(name, "--variant")
    _, mode = quantize.variant_parts(name)
    if mode == "fused" and lora is not None:
        raise UserError(f"--variant: {name!r} already has the LoRA fused in; drop --lora")
    if mode == "fused" and lora_scale is not None:
        raise UserError(f"--lora-scale: {name!r} has the LoRA fused in at evaluate.lora_scale; "
                        f"use its -adapter variant to choose the strength")
    return quantize.pipeline_kwargs(name, lora)  # an adapter variant: the LoRA on top at run time


def check_numbers(steps, guidance, size, seeds, scale):
    if bad := [s for s in seeds if not 0 <= s < 2**32]:
        raise UserError(f"--seed: {bad[0]} is outside 0 to 2**32 - 1, what the seeders accept")
    if repeated(seeds):  # one file per seed: a repeated one would overwrite its own image
        raise UserError(f"--seeds: {', '.join(str(s) for s in seeds)}: list each seed once")
    # argparse's float() takes "nan" and "inf": guidance nan sampled without guidance, inf black images
    if scale is not None and not (math.isfinite(scale) and scale >= 0):
        raise UserError(f"--lora-scale: must be a finite number >= 0, got {scale}")
    if steps <= 0:
        raise UserError(f"--steps: must be positive, got {steps}")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance: must be a finite number >= 0, got {guidance}")
    if size <= 0:  # its multiple is the family's: families.check_size
        raise UserError(f"--size: must be positive, got {size}")


def out_paths(out: Path, prompts, seeds, many: bool) -> list[tuple[str, int, Path]]:
    """(prompt, seed, file) per prompt x seed: `out` itself for a single image, else
    <out>/NNN-<slug>-seed<S>.png."""
    if not many:
        if out.suffix.lower() not in FORMATS:
            raise UserError(f"--out: {out} should end in one of {', '.join(FORMATS)} for one image")
        jobs = [(prompts[0], seeds[0], out)]
    else:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out: {out} is a file; with --prompts or several seeds it must be a folder")
        jobs = []
        for i, prompt in enumerate(prompts, 1):
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
            jobs += [(prompt, seed, out / f"{i:03d}-{slug}-seed{seed}.png") for seed in seeds]
    # Before any sampling: an image is never written over a folder (it may hold someone's work).
    if folder := next((path for _, _, path in jobs if path.is_dir()), None):
        raise UserError(f"--out: {folder} is a folder, where an image is to be written; "
                        f"move it away or choose another name")
    return jobs


def check_folder(path: Path) -> None:
    """Before minutes of loading and sampling, after the other checks: the folder `path` goes in,
    made now if need be, and a file written there (os.access cannot tell: as root it says yes to /proc)."""
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"--out: {parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out: cannot make the folder {path.parent} ({err.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise UserError(f"--out: cannot write in {path.parent} ({err.strerror})") from None


def tune(pipe, family, scheduler, channels_last, compile_):
    """Sampling options that change the pipeline, not the weights."""
    import diffusers
    import torch

    from sdtune.families import common

    if scheduler != "default":
        pipe.scheduler = getattr(diffusers, family.SAMPLERS[scheduler]).from_config(pipe.scheduler.config)
    denoiser = getattr(pipe, family.DENOISER_ATTR)
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if compile_:
        common.compile_denoiser(denoiser, family.COMPILE_BLOCKS)
    return pipe


def generate(args) -> None:
    quiet_libraries()
    from sdtune import families, io, runtime
    from sdtune.evaluate import generate as gen, pipelines

    params = load_params(args)
    ev = params.evaluate
    steps = args.steps if args.steps is not None else ev.steps
    guidance = args.guidance if args.guidance is not None else ev.guidance_scale
    size = args.size if args.size is not None else params.model.resolution
    scale = args.lora_scale if args.lora_scale is not None else ev.lora_scale
    seeds = args.seeds or [args.seed if args.seed is not None else params.base.seed]
    check_numbers(steps, guidance, size, seeds, args.lora_scale)
    prompts = [args.prompt] if args.prompt is not None else gen.read_prompts(args.prompts, "--prompts")
    jobs = out_paths(args.out, prompts, seeds, many=args.prompts is not None or len(seeds) > 1)

    # Not families.of(params): generation takes its size from --size, and has no buckets.
    family = families.get(params.model.family)
    families.check_checkpoint(family, params.model)
    families.check_size(family, params.model.family, "--size", size)
    if args.scheduler != "default" and args.scheduler not in family.SAMPLERS:
        raise UserError(f"--scheduler: {args.scheduler} cannot sample {params.model.family} models; "
                        f"choose from {', '.join(['default', *family.SAMPLERS])}")
    device = runtime.device(args.device or params.base.device, "--device" if args.device else "base.device")
    if args.lora_scale is not None and args.variant is None and args.lora is None:
        raise UserError("--lora-scale: no LoRA to scale; add --lora models/lora (or an -adapter --variant)")
    kwargs = variant_kwargs(args.variant, args.lora, args.lora_scale) if args.variant else {"lora_dir": args.lora}
    check_folder(jobs[0][2])  # the last check: it makes the folder
    pipe = pipelines.load(family, params.model, device, lora_scale=scale, **kwargs)
    tune(pipe, family, args.scheduler, args.channels_last, args.compile)

    for prompt, seed, path in jobs:
        image = gen.sample(pipe, prompt, seed, steps=steps, guidance=guidance, size=size)
        with io.atomic_path(path) as tmp:
            image.save(tmp, format=FORMATS[path.suffix.lower()])
        print(path)


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
