"""Profile the training step: phase times, FLOPs and MFU, memory, cost, for each matrix cell.

Each cell is the train section with a few keys changed (mixed precision, gradient
checkpointing, LoRA rank, ...). A cell runs the real `train_step` of the training loop, so
what is measured is what `dvc repro` trains with.
"""

import functools

import torch
from accelerate.state import AcceleratorState

from sdtune.params import Train, validate
from sdtune.profiling import cost as cost_lib, flops, hardware, memory, phases
from sdtune.train import loop

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def cell_params(params, cell: dict):
    """params with the cell's train overrides applied, validated like params.yaml itself."""
    name, overrides = cell["name"], {k: v for k, v in cell.items() if k != "name"}
    train = validate(Train, params.train.model_dump() | overrides, where=f"profile.matrix.{name}")
    return params.model_copy(update={"train": train})


@functools.cache
def peak_of(device: str, dtype) -> tuple[float, str]:
    """Measured once per stage: on CPU every cell is then held to the same ceiling."""
    return hardware.peak_tflops(device, dtype)


def model_flops(run, step: int) -> int:
    """FLOPs of one step, without the forward recomputed by gradient checkpointing: MFU counts
    the model's work, so recomputation lowers MFU instead of inflating it."""
    model = run.accelerator.unwrap_model(run.denoiser)
    recompute = model.is_gradient_checkpointing
    if recompute:
        model.disable_gradient_checkpointing()
    try:
        return flops.count_flops(loop.train_step, run, step)
    finally:
        if recompute:
            model.enable_gradient_checkpointing()


def measure(run, steps: int, warmup: int) -> dict:
    device = run.accelerator.device
    timer = phases.PhaseTimer(device, enabled=True, warmup=warmup)
    for i in range(warmup + steps):
        timer.step_begin()
        loss = loop.train_step(run, i, timer)
        with timer.phase("logging"):
            loss.item()  # the host sync the loop does once per log interval
        timer.step_end()
    return timer.summary()


def profile_cell(params, spec: dict, cache_dir, trace_path=None) -> dict:
    p = params.profile
    cell = cell_params(params, spec)
    # Each cell may ask for another precision; accelerate keeps one state per process.
    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(cell, cache_dir)
    device = run.accelerator.device
    memory.reset_peak(device)
    summary = measure(run, p.steps, p.warmup)
    step_s = summary["step_median_ms"] / 1e3
    n_flops = model_flops(run, p.warmup + p.steps)
    peak, peak_source = peak_of(str(device), DTYPES[run.accelerator.mixed_precision])
    peak_mem = memory.peak_memory(device)
    parts = memory.breakdown(run.accelerator.unwrap_model(run.denoiser), run.optimizer)
    usd = p.usd_per_hour or cost_lib.hourly_price(p.machine_type)
    if trace_path is not None:
        step, names = iter(range(10_000, 20_000)), phases.PhaseTimer(device)  # names the phases in the trace
        phases.trace(lambda: loop.train_step(run, next(step), names), trace_path, steps=2, warmup=0)
        # On CUDA, also the allocator's history of two steps (open it at https://pytorch.org/memory_viz);
        # memory.snapshot does nothing on CPU.
        with memory.snapshot(trace_path.with_name(f"memory-{spec['name']}.pickle"), device):
            for _ in range(2):
                loop.train_step(run, next(step))
    images = cell.train.batch_size * cell.train.grad_accum
    return {
        "name": spec["name"], "spec": spec, "device": str(device),
        "mixed_precision": run.accelerator.mixed_precision,
        "step_ms": summary["step_median_ms"], "images_per_second": images / step_s,
        "phases": summary, "coverage": summary["coverage"],
        "flops_per_step": n_flops, "achieved_tflops": flops.achieved_tflops(n_flops, step_s),
        "peak_tflops": peak, "peak_source": peak_source, "mfu": hardware.mfu(n_flops, step_s, peak),
        "memory": peak_mem | parts | memory.activations(parts, peak_mem, device),
        "cost": cost_lib.cost(step_s, cell.train.steps, usd) | {"usd_per_hour": usd},
    }
