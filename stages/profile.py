"""profile: where the training step's time and memory go, for each optimization-matrix cell,
and what generation costs for each inference cell.

Writes reports/profile.json (phase times, FLOPs, MFU, memory, cost and each kind of kernel's
floor per cell; for the traced cells, kernel time by kind next to each kind's FLOPs and floor),
reports/profile.md (the tables), reports/profile/ (phase, bar and memory charts),
reports/profile_cells.json (DVC plots) and reports/traces/ (Chrome traces of the baseline and of
the fastest cell and, on CUDA, their allocator snapshots; kept apart from the plots, which DVC
reads as data).
"""

import gc
import sys
from pathlib import Path

from tqdm import tqdm

from sdtune import families, io, params as params_lib, runtime
from sdtune.errors import UserError, main_guard
from sdtune.profiling import charts, cost, inference, kernels, roofline, run as prof

CACHE, LORA_DIR, OUT_DIR, TRACES = "cache", "models/lora", Path("reports/profile"), Path("reports/traces")
REPORT, TABLE, PLOT = "reports/profile.json", "reports/profile.md", "reports/profile_cells.json"


PRECISION = {"no": "fp32"}  # accelerate's name for no mixed precision


def header(cells, p) -> str:
    """What the tables were measured on and how: a reader of profile.md alone needs it."""
    c, source = cells[0], cells[0]["peak_source"]
    against = (f"the {source.split(':', 1)[1]} datasheet's dense peak" if source.startswith("datasheet:")
               else "a matmul ceiling measured on this device")
    text = (f"Measured on {c['device_name']}: each step time is the median of {p.steps} steps after "
            f"{p.warmup} warm-up; images/s, TFLOP/s, MFU and cost are from the totals over those steps "
            f"(a short last batch trains fewer images); MFU is against {against}, for each cell's precision.")
    if source.startswith("datasheet:"):
        # One ceiling per precision: an fp32 cell's says nothing of what the bf16 cells' GEMMs reach.
        first = {}
        for cell in cells:
            first.setdefault(cell["mixed_precision"], cell)
        reach = [f"{cell['ceiling_tflops']:.0f} TFLOP/s in {PRECISION.get(name, name)}, "
                 f"{cell['ceiling_tflops'] / cell['peak_tflops']:.0%} of its peak" for name, cell in first.items()]
        text += f" A large matmul reaches {'; '.join(reach)} on this device."
    if "RSS" in c["memory"]["source"]:
        text += (" Peak memory on a CPU is the process's resident set during the cell, which also holds "
                 "what earlier cells brought in (libraries, compiled code): later cells read a little high.")
    if any(cell["spec"].get("latents") == "on_the_fly" for cell in cells):
        text += (" MFU counts each cell's own FLOPs, so an on-the-fly cell's include its VAE and text "
                 "encoders: it can show a higher MFU while training fewer images a second.")
    return text + "\n"


RECOMPUTE_MARK = "†"  # a checkpointing cell whose FLOPs could only be counted with the recompute


def table(cells) -> str:
    lines = ["| cell | precision | step ms | images/s | TFLOP/s | MFU | peak MiB | $/1000 steps | phases cover |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        mark = RECOMPUTE_MARK if c["flops_with_recompute"] else ""
        lines.append(f"| {c['name']} | {c['mixed_precision']} | {c['step_ms']:.1f} | {c['images_per_second']:.2f} "
                     f"| {c['achieved_tflops']:.4f}{mark} | {c['mfu']:.1%}{mark} | {c['memory']['peak_bytes'] / 2**20:.0f} "
                     f"| {c['cost']['usd_per_1000_steps']:.4f} | {c['coverage']:.1%} |")
    if any(c["flops_with_recompute"] for c in cells):
        lines.append(f"\n{RECOMPUTE_MARK} The step without gradient checkpointing, which counts the model's FLOPs, "
                     "ran out of memory here: these count checkpointing's recomputed forward too, so they read high.")
    phase_names = list(dict.fromkeys(n for c in cells for n in c["phases"]["phases"]))
    lines += ["", "| cell | " + " | ".join(f"{n} ms" for n in phase_names) + " |",
              "|---|" + "---|" * len(phase_names)]
    for c in cells:
        ph = c["phases"]["phases"]
        lines.append(f"| {c['name']} | " + " | ".join(f"{ph.get(n, {}).get('median_ms', 0):.1f}" for n in phase_names) + " |")
    return "\n".join(lines) + "\n"


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}" if n < 100 * 2**20 else f"{n / 2**20:.0f}"


def memory_table(cells) -> str:
    """Each cell's peak memory and what it is made of: the parts counted from the tensors, the peak
    measured (on a CPU the process's resident set, which holds far more than tensors)."""
    cols = [("peak", "peak_bytes"), ("reserved", "reserved_bytes"), ("weights", "weights_bytes")]
    if any("encoder_weights_bytes" in c["memory"] for c in cells):  # an on-the-fly cell's VAE and text encoders
        cols.append(("encoders", "encoder_weights_bytes"))
    cols += [("gradients", "gradients_bytes"), ("optimizer", "optimizer_bytes"),
             ("kept for backward", "kept_for_backward_bytes"), ("activations", "activations_bytes")]
    lines = ["| cell | " + " | ".join(f"{name} MiB" for name, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {c['name']} | " + " | ".join(_mib(c["memory"].get(key)) for _, key in cols) + " |" for c in cells]
    return ("Memory: weights are every parameter (the frozen base and the LoRA); gradients and optimizer state "
            "are the LoRA's; kept for backward is what autograd saved in one step's forward for its backward, "
            "counted tensor by tensor (gradient checkpointing keeps only its segments' inputs; a compiled step is "
            "not counted); activations "
            "are the peak allocated less weights, gradients and optimizer state (CUDA only).\n\n"
            + "\n".join(lines) + "\n")


def kernel_tables(cells) -> str:
    """Where the traced cells' (the baseline's and the fastest's) time went, by kind of kernel, and
    how far each kind is from its floor on this device."""
    parts = []
    for c in cells:
        if not c.get("kernels"):
            continue
        ref = c["reference_step"]
        parts.append(f"Kernel time by kind in `{c['name']}`'s traced steps (step {ref['step']}, {ref['images']} "
                     f"images, twice: reports/traces/trace-{c['name']}.json), next to the model FLOPs of each kind "
                     f"(recomputation left out, though its kernels' time is in: a fused attention backward "
                     f"recomputes its scores, checkpointing its forward; the floor table counts it):"
                     f"\n\n{kernels.table(c['kernels'])}\n")
        note = "; on a CPU its measured time includes Python's between the ops" if c["device"] == "cpu" else ""
        parts.append(f"`{c['name']}`'s kinds against their floor. {roofline.floor_table(c['floor'], c['kernels'], note)}\n")
    return "\n".join(parts)


def failed_list(failed: dict) -> str:
    said = {"trace": "trace only: its numbers above stand"}
    lines = [f"- `{name}` ({said.get(kind, kind)}): {f['reason']}" for kind, cells in failed.items()
             for name, f in cells.items()]
    return "Cells that did not run:\n\n" + "\n".join(lines) + "\n" if lines else ""


def measure_each(specs, measure, what: str):
    """(results, failures): each cell measured in turn. A cell that fails at run time (out of
    memory, a kernel or package this machine lacks) is recorded with its reason and the others
    still run, so one cell cannot throw away the minutes spent measuring the rest."""
    done, failed = [], {}
    for spec in tqdm(specs, desc=what, unit="cell"):
        try:
            done.append(measure(spec))
        except Exception as err:  # noqa: BLE001 -- reported in profile.json and profile.md
            text = str(err).strip().splitlines()
            reason = text[0] if isinstance(err, UserError) else f"{type(err).__name__}: {text[0] if text else ''}"
            failed[spec["name"]] = {"spec": spec, "reason": reason}
            tqdm.write(f"profile: {what} cell {spec['name']!r} did not run: {reason}", file=sys.stderr)
        gc.collect()  # a failed cell's model is garbage now; free it before the next one loads
    return done, failed


@main_guard
def main():
    params = params_lib.load()
    p = params.profile
    family = families.of(params)
    for spec in p.matrix:  # a typo in any cell, or a key the family refuses, stops here, before minutes of measuring
        family.check_train(params_lib.cell_params(params, spec).train)
    prof.check_lora_targets(params, family, p.matrix)
    for spec in p.inference:
        inference.check_variant(params_lib.inference_cell(spec))
    cost.hourly_usd(p)  # an unpriced machine type stops here too, not in every cell after it was measured
    with runtime.stage("profile"):
        with io.atomic_path(OUT_DIR) as tmp, io.atomic_path(TRACES) as traces:
            tmp.mkdir()
            traces.mkdir()
            traced = False

            def train_cell(spec):  # the first cell that runs is the baseline: its trace is kept
                nonlocal traced
                trace = traces / f"trace-{spec['name']}.json" if p.trace and not traced else None
                cell = prof.profile_cell(params, spec, CACHE, trace)
                traced = traced or trace is not None
                return cell
            cells, failed = measure_each(p.matrix, train_cell, "profile")
            if not cells:
                name, first = next(iter(failed.items()))
                raise UserError(f"profile.matrix: no cell ran; the first, {name!r}, failed with: {first['reason']}")
            best, trace_failed = prof.fastest(cells), {}
            if p.trace and best is not cells[0]:  # the fastest cell's trace, to compare with the baseline's
                # Set up anew, it can fail (out of memory, say) where its measuring did not: noted, not fatal.
                traced, trace_failed = measure_each(
                    [best["spec"]], lambda spec: prof.trace_cell(params, spec, CACHE, traces / f"trace-{spec['name']}.json"),
                    "trace")
                if traced:
                    best["kernels"] = prof.kernel_breakdown(best, traced[0])
            charts.phase_chart({c["name"]: c["phases"] for c in cells}, tmp / "phases.png")
            charts.bar_chart(cells, "step_ms", tmp / "step_ms.png", "Training step time (ms, median)")
            charts.bar_chart(cells, "mfu", tmp / "mfu.png", "Model FLOPs utilisation", fmt="{:.1%}")
            charts.memory_chart(cells, tmp / "memory.png")
            gen, gen_failed = measure_each(
                p.inference, lambda spec: inference.profile_cell(params, spec, LORA_DIR, cells[0]["device"]), "inference")
            charts.bar_chart(gen, "seconds_per_image", tmp / "inference.png", "Generation time (s per image, median)")
            # The reports before the folders are swapped in: one that cannot be written leaves the
            # last run's folders, not new charts beside old numbers.
            failed = {"matrix": failed, "trace": trace_failed, "inference": gen_failed}
            io.write_json(REPORT, {"best": best["name"], "cells": {c["name"]: c for c in cells},
                                   "inference": {c["name"]: c for c in gen}, "failed": failed})
            io.write_json(PLOT, [{"cell": c["name"], "step_ms": c["step_ms"], "mfu": c["mfu"],
                                  "peak_mib": c["memory"]["peak_bytes"] / 2**20} for c in cells])
            text = "\n".join(filter(None, [header(cells, p), table(cells), memory_table(cells), kernel_tables(cells),
                                            inference.table(gen), failed_list(failed)]))
            io.write_text(TABLE, text)
    print(text)


if __name__ == "__main__":
    main()
