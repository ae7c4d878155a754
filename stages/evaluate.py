"""evaluate: sample fixed prompts x seeds from base, base+LoRA and every quantized variant.

Writes reports/eval.json (a record per variant: CLIP score, FID, KID, style similarity,
fidelity to base+LoRA, latency, peak memory, bytes), reports/eval.md, the grid
reports/samples/grid.png and reports/eval_plot.json (for DVC plots).
"""

from pathlib import Path

import torch

from sdtune import families, io, params as params_lib, quantize, runtime
from sdtune.data import cache as cache_lib
from sdtune.errors import UserError, main_guard
from sdtune.evaluate import clip as clip_lib, generate, metrics, pipelines, report
from sdtune.families import common
from sdtune.profiling import memory

CAPTIONS, RAW = "data/captions.jsonl", "data/raw"
REPORT, TABLE, GRID, PLOT = "reports/eval.json", "reports/eval.md", "reports/samples/grid.png", "reports/eval_plot.json"


def variants(params):
    """(name, pipeline kwargs) for base, base+LoRA and each saved quantized variant, in order."""
    out = [("base", {}), ("lora", {"lora_dir": quantize.LORA_DIR})]
    out += [(name, quantize.pipeline_kwargs(name)) for name in io.read_json("reports/quantize.json", required=("variants",))["variants"]]
    return out


def check_variants(todo) -> None:
    """Each variant can run here and is on disk, so that one which cannot fails before minutes of
    sampling the ones before it (the stage writes nothing until all are sampled)."""
    common.lora_path(quantize.LORA_DIR)  # the lora row, and every adapter variant's
    for name, kwargs in todo:
        if "method" not in kwargs:
            continue
        quantize.check_method(name, "reports/quantize.json: variant", "; run the quantize stage again")
        if not kwargs["variant_dir"].is_dir():
            raise UserError(f"{kwargs['variant_dir']}: variant {name!r} of reports/quantize.json is not there; "
                            f"run the quantize stage again or dvc pull it")


def real_images(params) -> list:
    rows = io.read_jsonl(CAPTIONS)
    size = params.model.resolution
    limit = params.data.max_pixels  # the limit the caption stage kept these images under
    return [((cache_lib.prepare(Path(RAW) / r["file"], size, True, max_pixels=limit)[0] + 1) * 127.5)
            .round().clamp(0, 255).to(torch.uint8) for r in rows]


def evaluate_one(pipe, p, prompts, device, size):
    """Every prompt x seed, then the latency of one image (median after a warm-up)."""
    samples = generate.sample_all(pipe, prompts, p.seeds, steps=p.steps, guidance=p.guidance_scale, size=size)

    def one():
        generate.sample(pipe, prompts[0], p.seeds[0], steps=p.steps, guidance=p.guidance_scale, size=size)

    latency = metrics.time_it(one, repeats=p.latency_repeats, warmup=1, sync=device)["median_s"]
    return [img for _, _, img in samples], latency


@main_guard
def main():
    params = params_lib.load()
    p, size = params.evaluate, params.model.resolution
    family = families.of(params)
    device = runtime.device(params.base.device)
    prompts = generate.read_prompts(p.prompts, "evaluate.prompts")
    if twice := params_lib.repeated(prompts):
        # with the same seeds, the same images: FID and KID would count them twice
        raise UserError(f"evaluate.prompts: {p.prompts} has {twice[0]!r} more than once; list each prompt once")
    if len(prompts) * len(p.seeds) < 2:  # before minutes of generating, not after
        raise UserError(f"evaluate: FID and KID need at least 2 images per variant; {p.prompts} has "
                        f"{len(prompts)} prompt(s) and evaluate.seeds {len(p.seeds)} seed(s)")
    with runtime.stage("evaluate"):
        # CLIP is loaded first, so that a bad clip_model stops the stage before minutes of sampling,
        # but waits on the CPU: on the GPU it would be in every variant's peak memory.
        clip = clip_lib.load_clip(p.clip_model, p.clip_revision, device="cpu")
        real = real_images(params)
        extractor = metrics.fid_extractor(p.fid_extractor, clip)
        metrics.check_counts(len(real), len(prompts) * len(p.seeds))
        todo = variants(params)
        check_variants(todo)
        images, records = {}, []
        for name, kwargs in todo:
            memory.reset_peak(device)
            pipe = pipelines.load(family, params.model, device, lora_scale=p.lora_scale, **kwargs)
            images[name], latency = evaluate_one(pipe, p, prompts, device, size)
            denoiser = getattr(pipe, family.DENOISER_ATTR)
            # The dtype the pipeline ran in: a variant's method sets it (bf16 for int8wo), so on a
            # CPU, where base and lora run in float32, a variant's differences are not all quantization.
            records.append({"variant": name, "dtype": str(pipe.vae.dtype).removeprefix("torch."), "latency_s": latency,
                            "peak_memory_mib": memory.peak_memory(device)["peak_bytes"] / 2**20,
                            "denoiser_mib": quantize.tensor_bytes(denoiser) / 2**20})
            del pipe, denoiser
        clip[0].to(device)  # the metrics run where the samples were made
        paired = [prompt for prompt in prompts for _ in p.seeds]  # the prompt of each image, in order
        for rec in records:
            fake = images[rec["variant"]]
            fid, kid, _ = metrics.fid_kid(real, fake, extractor)
            fidelity = metrics.fidelity(fake, images["lora"], clip)
            rec |= {"clip_score": metrics.clip_score(fake, paired, clip), "fid": fid, "kid": kid,
                    "style_similarity": metrics.style_similarity(fake, real, clip),
                    "psnr_to_lora": fidelity["psnr"], "lpips_like_to_lora": fidelity["lpips_like"]}
        report.grid(images, GRID, rows=report.row_labels(prompts, p.seeds))
        io.write_json(REPORT, {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in records})
        io.write_json(PLOT, records)
        table = report.markdown(records, len(paired), len(real), metrics.feature_dim(extractor),
                                cpu=device.type == "cpu")
        table += "\n" + report.prompt_list(prompts)
        io.write_text(TABLE, table)
    print(table)


if __name__ == "__main__":
    main()
