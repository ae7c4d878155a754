"""The findings report: one Markdown page from the numbers the other stages measured.

Every sentence in "What helped, what did not" is computed from reports/*.json; nothing is canned.
"""

from collections import defaultdict
from pathlib import Path

from sdtune import io, runtime
from sdtune.params import cell_latents, cell_train_keys
from sdtune.profiling import cost


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old:+.0%}" if old else "n/a"


def setup_section(params, lineage: dict, data: dict, train: dict) -> list[str]:
    """`lineage`: the LoRA file's own metadata, what it was trained from. The report stage re-runs
    on changes that do not re-train (a data.source holding the same bytes, a later commit); the
    LoRA's provenance, not the workspace's, says where it came from."""
    lineage = defaultdict(lambda: "unknown", lineage)  # a LoRA from elsewhere may carry none
    return [
        "## Setup",
        "",
        f"- model: `{params.model.id}` ({params.model.family}, revision `{params.model.revision}`), "
        f"{params.model.resolution} px",
        f"- data: `{runtime.redacted(params.data.source)}`: {data['kept']} images kept, {data['skipped']} skipped "
        f"(reasons in `reports/data.json`)",
        f"- LoRA rank {params.train.lora.rank}, alpha {params.train.lora.alpha}; {train['steps']} steps of batch "
        f"{params.train.batch_size} × accumulation {params.train.grad_accum} × {train['processes']} process(es)",
        f"- hardware: {train['device_name']} ({train['device']}), mixed precision `{train['mixed_precision']}`",
        f"- the LoRA (its metadata): trained at commit `{lineage['git_commit']}` with sdtune "
        f"{lineage['sdtune_version']}, base `{lineage['base_model']}` at `{lineage['base_commit']}`, "
        f"dataset sha256 `{lineage['dataset_sha256'][:16]}…`, params sha256 "
        f"`{lineage['params_sha256'][:16]}…`",
        "",
    ]


def training_section(train: dict) -> list[str]:
    """The time and speeds in train.json are of the steps this process ran: after a resume, fewer than
    the run's."""
    steps, ran = train["steps"], train["steps_run"]
    speed = f" ({train['steps_per_second']:.2f} steps/s, {train['images_per_second']:.2f} images/s)"
    if ran == steps:
        timing = f"{steps} steps in {train['seconds']:.1f} s{speed}"
    else:  # resumed: a speed of no steps (resumed at the last one) would read 0.00 steps/s
        timing = (f"{steps} steps, resumed from step {steps - ran}: {ran} of {steps} steps ran in "
                  f"{train['seconds']:.1f} s{speed if ran else ''}")
    return [
        "## Training",
        "",
        f"Final loss {train['final_loss']:.4f} (the mean of the last {train['final_loss_steps']} steps) after "
        f"{timing}.",
        "",
        "![training loss](train_loss.png)",
        "",
    ]


def _value(v) -> str:
    """A params value as params.yaml writes it: true, null, {rank: 64, alpha: 64.0}."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


UNSET = object()  # a train key a cell leaves to the train section while the other cell sets it


def _keys(spec: dict) -> dict:
    """A cell's train keys and where its latents come from: an on-the-fly cell changes that too."""
    return cell_train_keys(spec) | {"latents": cell_latents(spec)}


def changes(cell: dict, ref: dict) -> dict:
    """The train keys (and latents) `cell` sets differently from `ref`, with `cell`'s values (or UNSET)."""
    a, b = _keys(cell["spec"]), _keys(ref["spec"])
    keys = [*a, *(k for k in b if k not in a)]
    return {k: a.get(k, UNSET) for k in keys if a.get(k, UNSET) != b.get(k, UNSET)}


def reference(cell: dict, earlier: list[dict]) -> dict:
    """What a cell's switches are measured against: the earlier cell it changes in the fewest
    train keys (the first of equals). So `bf16-compile` is measured against `bf16`, not against
    the first cell, which also differs from it in precision."""
    return min(earlier, key=lambda ref: len(changes(cell, ref)))


def _reads_cache(cell: dict) -> bool:
    return cell_latents(cell["spec"]) == "cached"


def _same_but_cached(cell: dict, cells: list[dict]):
    """The cell whose train keys are `cell`'s and which reads the cache, if the matrix has one."""
    return next((c for c in cells if _reads_cache(c) and list(changes(cell, c)) == ["latents"]), None)


def change_text(diff: dict) -> str:
    if not diff:
        return "nothing (the same train keys)"
    return ", ".join(f"{k} as in train" if v is UNSET else f"{k}: {_value(v)}" for k, v in diff.items())


def _per_image_ms(cell: dict) -> tuple[float, float]:
    """The spread of a cell's measured steps, in ms per image (cells may differ in batch size)."""
    ph, n = cell["phases"], cell["images_per_step"]
    return ph["step_min_ms"] / n, ph["step_max_ms"] / n


def _overlap(cell: dict, ref: dict) -> str | None:
    """Where two cells' step times overlap, the difference between them is inside the noise of the
    measurement (another process, a stalled step), whatever the medians say: the spreads, said."""
    (a, b), (c, d) = _per_image_ms(cell), _per_image_ms(ref)
    if a <= d and c <= b:
        return f"its steps took {a:.1f}–{b:.1f} ms per image, those of `{ref['name']}` {c:.1f}–{d:.1f}"
    return None


def _verdict(speedup: float, cell: dict, ref: dict) -> str:
    """What `cell` did against `ref`."""
    if spread := _overlap(cell, ref):
        return f"made no clear difference ({spread})"
    return "helped" if speedup > 1.05 else "did not help" if speedup < 0.95 else "made no real difference"


def memory_change(cell: dict, ref: dict) -> str:
    """Peak memory against ref's and, where both were counted, what autograd kept for the backward:
    on a CPU the peak is the process's resident set, which hides what checkpointing saves."""
    a, b = cell["memory"], ref["memory"]
    text = f"peak memory {_pct(a['peak_bytes'], b['peak_bytes'])}"
    if a.get("kept_for_backward_bytes") is not None and b.get("kept_for_backward_bytes") is not None:
        text += f", kept for the backward {_pct(a['kept_for_backward_bytes'], b['kept_for_backward_bytes'])}"
    return text


def findings(evals: dict, profile: dict) -> list[str]:
    """Sentences from the measured numbers: what each optimization and each variant bought.

    Speed is images per second, not step time: a cell may change the batch size.
    """
    lines = []
    cells = list(profile["cells"].values())
    cached = [c for c in cells if _reads_cache(c)]
    for i, cell in enumerate(cells):
        if not _reads_cache(cell):
            # Here the cell is the way without the optimization, so the sentence is about the cache,
            # against the cell with the same train keys that reads the cache (else the cached cell it
            # changes least, and what else differs is said). A cell that reads the cache is never
            # measured against an on-the-fly one: that difference is this sentence's.
            if not cached:
                continue
            ref = _same_but_cached(cell, cells) or reference(cell, cached)
            other = {k: v for k, v in changes(ref, cell).items() if k != "latents"}
            also = f" (and differs by {change_text(other)})" if other else ""
            gain = ref["images_per_second"] / cell["images_per_second"]
            ph = cell["phases"]["phases"]
            encode_ms = sum(ph.get(n, {}).get("median_ms", 0.0) for n in ("decode", "encode"))
            lines.append(f"- Caching latents and text embeddings {_verdict(gain, ref, cell)}: `{ref['name']}` reads the "
                         f"cache{also} and ran {gain:.2f}× the speed of `{cell['name']}`, which reads, resizes and "
                         f"encodes its images every step ({cell['step_ms']:.1f} vs {ref['step_ms']:.1f} ms/step; "
                         f"{encode_ms:.1f} ms of it decoding and encoding).")
            continue
        earlier = [c for c in cells[:i] if _reads_cache(c)]
        if not earlier:  # the first cell that reads the cache: the others are measured against it
            continue
        ref = reference(cell, earlier)
        speed = cell["images_per_second"] / ref["images_per_second"]
        lines.append(f"- `{cell['name']}` {_verdict(speed, cell, ref)}: {speed:.2f}× the speed of `{ref['name']}`, the cell it "
                     f"changes by {change_text(changes(cell, ref))} ({cell['images_per_second']:.2f} vs "
                     f"{ref['images_per_second']:.2f} images/s; {cell['step_ms']:.1f} vs {ref['step_ms']:.1f} "
                     f"ms/step), MFU {cell['mfu']:.1%} vs {ref['mfu']:.1%}, {memory_change(cell, ref)}.")
    fly = next((c for c in cells if not _reads_cache(c)), None)
    best = profile["cells"][profile["best"]]
    # Not when the fastest cell is the on-the-fly one itself, or its cached twin (the sentence above).
    if fly is not None and best["name"] != fly["name"] and best is not _same_but_cached(fly, cells):
        # What everything together buys over the way diffusers' example scripts train.
        speed = best["images_per_second"] / fly["images_per_second"]
        spread = _overlap(best, fly)
        lines.append(f"- The fastest cell, `{best['name']}`, ran {speed:.2f}× the speed of `{fly['name']}`, the way "
                     f"diffusers' example scripts train ({best['images_per_second']:.2f} vs "
                     f"{fly['images_per_second']:.2f} images/s)" + (f"; not a clear difference: {spread}." if spread else "."))
    lines += kernel_finding(best)
    if "base" in evals and "lora" in evals:
        b, t = evals["base"], evals["lora"]
        # Two measures of the same thing; when they disagree the sentence says so, not a verdict.
        similar, kid = t["style_similarity"] > b["style_similarity"], t["kid"] < b["kid"]
        verdict = ("The LoRA moved samples closer to the training set's style" if similar and kid else
                   "The LoRA did not move samples closer to the training set's style" if not (similar or kid) else
                   "The two measures disagree on whether the LoRA moved samples toward the training set's style")
        lines.append(f"- {verdict}: style similarity {t['style_similarity']:.3f} vs {b['style_similarity']:.3f} "
                     f"for the base model (higher is closer), KID to the training images {t['kid']:.4f} vs "
                     f"{b['kid']:.4f} (lower is closer; KID, not FID, because FID is biased at a few images per set).")
    for name, rec in evals.items():
        if name in ("base", "lora"):
            continue
        ref = evals["lora"]
        lines.append(f"- `{name}`: denoiser {rec['denoiser_mib']:.1f} MiB ({_pct(rec['denoiser_mib'], ref['denoiser_mib'])}), "
                     f"latency {rec['latency_s']:.3f} s ({_pct(rec['latency_s'], ref['latency_s'])}), "
                     f"PSNR to the unquantized LoRA model {rec['psnr_to_lora']:.1f} dB, CLIP score "
                     f"{rec['clip_score']:.2f} vs {ref['clip_score']:.2f}.")
    return lines


def kernel_finding(cell: dict) -> list[str]:
    """Where a traced cell's kernel time went: its three busiest kinds, and the kind that does the
    fewest FLOPs a second, which holds MFU down."""
    rows = [r for r in cell.get("kernels", {}).get("rows", []) if r["ms"] > 0]
    if not rows:
        return []
    busiest = ", ".join(f"{r['kind']} {r['share']:.0%}" + (f" (at {r['tflops']:.3g} TFLOP/s)" if r["tflops"] else "")
                        for r in rows[:3])
    text = f"- Where `{cell['name']}`'s kernel time went: {busiest}"
    rated = [r for r in rows if r["tflops"]]
    if len(rated) > 1:
        slowest = min(rated, key=lambda r: r["tflops"])
        text += f"; of the kinds that do FLOPs, {slowest['kind']} does the fewest a second ({slowest['tflops']:.3g} TFLOP/s)"
    return [text + "."] + floor_finding(cell) + copies_finding(cell)


def copies_finding(cell: dict) -> list[str]:
    """How much of a traced cell's kernel time went to copies and layout changes, and the op that
    launched the most of them (kernels.launched_by): where memory traffic that computes nothing
    comes from, which a change of layout or of a `contiguous()` can remove."""
    k = cell.get("kernels", {})
    ms = sum(r["ms"] for r in k.get("rows", []) if r["kind"] in ("copy", "layout"))
    if not k.get("copies") or ms <= 0 or not k.get("kernel_ms"):
        return []
    top = k["copies"][0]
    inside = f" inside `{top['callers'][0]}`" if top["callers"] else ""
    inputs = f" on {top['inputs']}" if top["inputs"] else ""
    return [f"- Copies and layout changes took {ms:.2f} ms of `{cell['name']}`'s {k['kernel_ms']:.2f} ms of kernels a "
            f"step ({ms / k['kernel_ms']:.0%}); the most, {top['ms']:.2f} ms, from `{top['op']}`{inside}{inputs}."]


def floor_finding(cell: dict) -> list[str]:
    """How far a traced cell's GEMM-like kernels (convolution, matmul, attention) are from their
    floor on this device (the profile stage's kernels.vs_floor), the furthest named. The
    memory-bound kinds are left out: their floor is eager's unfused traffic."""
    ratios = cell.get("kernels", {}).get("vs_floor")
    if not ratios:
        return []
    furthest = max(ratios, key=ratios.get)
    parts = ", ".join(f"{k} {r:.1f}×" for k, r in sorted(ratios.items(), key=lambda kv: -kv[1]))
    return [f"- Against their floor on this device (each op at the GEMM ceiling or the copy bandwidth measured "
            f"here), `{cell['name']}`'s kernels take: {parts}; {furthest} is furthest from what the device allows."]


def stage_times(folder) -> list[str]:
    """A table of each stage's wall time, in pipeline order (a stage not in it comes last)."""
    rows = [io.read_json(p) for p in Path(folder).glob("*.json")]
    order = {name: i for i, name in enumerate(runtime.STAGES)}
    rows.sort(key=lambda r: (order.get(r["stage"], len(order)), r["stage"]))
    total = sum(r["seconds"] for r in rows) or 1.0
    out = ["| stage | seconds | share |", "|---|---|---|"]
    out += [f"| {r['stage']} | {r['seconds']:.1f} | {r['seconds'] / total:.0%} |" for r in rows]
    return out


def build(params, lineage: dict, reports="reports") -> str:
    r = Path(reports)
    data, train = io.read_json(r / "data.json"), io.read_json(r / "train.json")
    evals, profile = io.read_json(r / "eval.json"), io.read_json(r / "profile.json")
    best = profile["cells"][profile["best"]]
    lines = ["# sdtune report", ""]
    lines += setup_section(params, lineage, data, train)
    lines += training_section(train)
    lines += ["## Evaluation", "", (r / "eval.md").read_text().strip(), "", "![samples](samples/grid.png)", ""]
    lines += ["## Profile", "", (r / "profile.md").read_text().strip(), "",
              "![phases](profile/phases.png)", "", "![step time](profile/step_ms.png)", "",
              "![MFU](profile/mfu.png)", "", "![memory](profile/memory.png)", "",
              "![generation time](profile/inference.png)", ""]
    # On a CPU (the demo) the step times are the CPU's: priced at a GPU machine's rate they say little.
    measured_on = "" if best["device"].startswith("cuda") else (
        f" These step times were measured on {best['device_name']}, not on that machine's GPU.")
    lines += ["## Cost", "",
              f"At ${best['cost']['usd_per_hour']:.2f}/h ({cost.price_source(params.profile)}), the fastest cell "
              f"`{best['name']}` ({best['images_per_second']:.2f} images/s) costs "
              f"${best['cost']['usd_per_1000_steps']:.3f} per 1,000 steps of {best['images_per_step']} images and "
              f"${best['cost']['usd_per_run']:.3f} for this run's {params.train.steps} steps (training only)."
              + measured_on, ""]
    lines += ["## Stage times", ""] + stage_times(r / "stages") + [""]
    lines += ["## What helped, what did not", ""] + findings(evals, profile) + [""]
    return "\n".join(lines)
