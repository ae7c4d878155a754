"""Profile generation (the evaluate stage's sampling): one cell per inference setting.

A cell is a name plus any of: dtype (float32, bfloat16, float16), attention (sdpa, math),
channels_last, compile, lora (load models/lora on top), or variant: a quantized denoiser the
quantize stage saved (models/quantized/<variant>, e.g. nf4-fused), which brings its own dtype and
LoRA. Each reports the median seconds per image over evaluate.latency_repeats images after one
warm-up, FLOPs per image (FlopCounterMode over one sample), MFU and peak memory.
"""

import torch

from sdtune import families, quantize
from sdtune.families import common
from sdtune.data import cache as cache_lib
from sdtune.errors import UserError
from sdtune.params import InferenceCell, inference_cell
from sdtune.evaluate import generate, metrics, pipelines
from sdtune.profiling import flops, hardware, memory
from sdtune.train.loop import attention


def check_variant(cell: InferenceCell) -> None:
    """A cell's variant must be one the quantize stage saved, of a method this machine runs (nf4
    needs CUDA), as the evaluate stage checks its variants: said before any cell is measured."""
    if cell.variant is None:
        return
    saved = quantize.saved_variants()
    if cell.variant not in saved:
        raise UserError(f"params.yaml: profile.inference.{cell.name}.variant: {quantize.QUANT_DIR / cell.variant} "
                        f"does not exist; the quantize stage saved: {', '.join(saved) or 'nothing'}")
    quantize.check_method(cell.variant, f"params.yaml: profile.inference.{cell.name}.variant")


def _pipeline(cell: InferenceCell, family, model, lora_dir, device):
    """(pipeline, dtype) of a cell: a saved variant, or the base model with or without the LoRA."""
    if cell.variant is not None:
        kwargs = quantize.pipeline_kwargs(cell.variant)
        return pipelines.load(family, model, device, **kwargs), quantize.METHODS[kwargs["method"]].dtype
    dtype = cache_lib.DTYPES[cell.dtype]
    return generate.pipeline(family, model, device, lora_dir=lora_dir if cell.lora else None, dtype=dtype), dtype


def profile_cell(params, raw: dict, lora_dir, device) -> dict:
    cell = inference_cell(raw)
    family = families.get(params.model.family)  # checked once by the stage (families.of)
    pipe, dtype = _pipeline(cell, family, params.model, lora_dir, device)
    denoiser = getattr(pipe, family.DENOISER_ATTR)
    if cell.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if cell.compile:
        torch._dynamo.reset()  # compiled code is cached per function: a fresh model needs a fresh cache
        common.compile_denoiser(denoiser, family.COMPILE_BLOCKS)
    e = params.evaluate

    def one():
        with attention(cell.attention), torch.no_grad():
            return generate.sample(pipe, "a painting", e.seeds[0], steps=e.steps, guidance=e.guidance_scale,
                                   size=params.model.resolution)

    memory.reset_peak(device)
    repeats = e.latency_repeats  # timed as the evaluate stage times its variants
    timing = metrics.time_it(one, repeats=repeats, warmup=1, sync=device)
    peak_mem = memory.peak_memory(device)["peak_bytes"]  # before the FLOP count and a GEMM ceiling
    n_flops = flops.count_flops(one)
    peak, source = hardware.peak_tflops(device, dtype)
    seconds = timing["median_s"]
    keys = cell.model_dump(exclude={"dtype", "lora"} if cell.variant else set())  # a variant's are its own
    return {"name": cell.name, "cell": keys, "dtype": str(dtype).removeprefix("torch."),
            "seconds_per_image": seconds,
            # Sampling steps over the whole image's time, text encoding and VAE decode included: the
            # rate a user sees, not the denoiser's alone.
            "steps_per_second": e.steps / seconds, "flops_per_image": n_flops,
            "achieved_tflops": flops.achieved_tflops(n_flops, seconds), "mfu": hardware.mfu(n_flops, seconds, peak),
            "peak_tflops": peak, "peak_source": source,
            "peak_memory_bytes": peak_mem, "timed_images": repeats}


def table(cells) -> str:
    if not cells:
        return ""
    lines = [f"Generation: each time is the median of {cells[0]['timed_images']} images after one warm-up.", "",
             "| inference cell | dtype | s/image | steps/s (whole image) | TFLOP/s | MFU | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['name']} | {c['dtype']} | {c['seconds_per_image']:.3f} | {c['steps_per_second']:.1f} | "
                     f"{c['achieved_tflops']:.4f} | {c['mfu']:.1%} | {c['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"
