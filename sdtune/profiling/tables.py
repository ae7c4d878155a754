"""profile.md: the profile stage's tables, from the cells profiling/run.py measured."""

from sdtune.params import cell_latents
from sdtune.profiling import kernels, roofline

PRECISION = {"no": "fp32"}  # accelerate's name for no mixed precision


def header(cells, p) -> str:
    """What the tables were measured on and how: a reader of profile.md alone needs it."""
    c, source = cells[0], cells[0]["peak_source"]
    against = (f"the {source.split(':', 1)[1]} datasheet's dense peak" if source.startswith("datasheet:")
               else "a matmul ceiling measured on this device")
    text = (f"Measured on {c['device_name']}: each step time is the median of {p.steps} steps after "
            f"{p.warmup} warm-up; images/s, TFLOP/s, MFU and cost are the images and FLOPs of all those "
            f"steps (a short last batch trains fewer images) over that median times their count; MFU is against {against}, for each cell's precision.")
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
    if any(cell_latents(cell["spec"]) == "on_the_fly" for cell in cells):
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
