"""Profile the training step: phase times, FLOPs and MFU, memory, cost, for each matrix cell.

Each cell is the train section with a few keys changed (mixed precision, gradient
checkpointing, LoRA rank, ...). A cell runs the real `train_step` of the training loop, so
what is measured is what `dvc repro` trains with.
"""

import contextlib
import math
from collections import Counter
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from sdtune import io
from sdtune.data import cache as cache_lib
from sdtune.errors import UserError
from sdtune.params import cell_latents, cell_params
from sdtune.profiling import cost as cost_lib, flops, hardware, kernels, memory, phases, roofline
from sdtune.train import lora, loop

def check_lora_targets(params, family, specs) -> None:
    """Each cell's LoRA finds its target modules in the denoiser, tried as peft tries it on a copy
    built on the meta device from the model's config (no weights): a mistyped target module stops
    the stage before any cell is measured, not when the cell's turn comes. A config that cannot be
    read here is left to the cell's own loading, which says why."""
    from accelerate import init_empty_weights
    from peft import LoraConfig

    model = params.model
    try:
        config = (family.load_denoiser(model).config if model.id == "tiny" else
                  family.DENOISER.load_config(model.id, subfolder=family.DENOISER_ATTR, revision=model.revision))
    except (OSError, ValueError):
        return
    for spec in specs:
        cell_lora = cell_params(params, spec).train.lora
        targets = cell_lora.target_modules or family.LORA_TARGETS
        with init_empty_weights():
            denoiser = family.DENOISER.from_config(config)
            lora.check(denoiser, cell_lora, targets, key=f"params.yaml: profile.matrix.{spec['name']}.lora")
            try:
                denoiser.add_adapter(LoraConfig(r=1, target_modules=list(targets)))
            except ValueError as err:
                raise UserError(f"params.yaml: profile.matrix.{spec['name']}.lora.target_modules: "
                                f"{str(err).splitlines()[0]}") from None


class OnTheFly:
    """Each step's batch made the way diffusers' example scripts make it (their data loader runs
    in the main process by default): read and resize the images, then the VAE and the text
    encoders, every step. The fresh tensors replace the step's items before `loop.train_step`
    reads them, so both cells run the same step and differ by exactly what the cache saves."""

    def __init__(self, run, cache_dir, raw_dir):
        p = run.params
        self.run, self.raw_dir = run, Path(raw_dir)
        self.rows = io.read_json(Path(cache_dir) / "index.json", required=("items",))["items"]  # in run.items' order
        self.device = run.accelerator.device
        # The VAE encodes as the cache stage's does (float32 where it asks), so both cells train
        # on the same latents; it is put in float32 once, not cast there and back every step.
        self.pipe = cache_lib.load_encoders(run.family, p.model, self.device, for_encoding=True)
        self.dtype = cache_lib.DTYPES[p.cache.dtype]

    def __call__(self, step: int, timer) -> None:
        run, model = self.run, self.run.params.model
        for micro in range(run.params.train.grad_accum):
            idx = loop.sample_indices(run, step, micro)
            with timer.phase("decode"):
                c = run.params.cache
                prepared = [cache_lib.prepare(self.raw_dir / self.rows[i]["file"], model.resolution, c.center_crop,
                                              c.crop_step, max_pixels=run.params.data.max_pixels) for i in idx]
            with timer.phase("encode"), torch.no_grad():
                # Kept on the device, as the examples keep them: no trip through the host and back.
                fresh = cache_lib.encode(run.family, self.pipe, prepared, [self.rows[i]["caption"] for i in idx],
                                         self.dtype, self.device, out_device=self.device)
            for i, item in zip(idx, fresh):
                run.items[i] = item


def model_flops(run, step_fn, step: int) -> tuple[dict[str, int], bool]:
    """FLOPs of one step by kind of op (encoding included when it runs every step), without the
    forward recomputed by gradient checkpointing (recomputation lowers MFU instead of inflating it),
    unless the step without it did not fit: flops.count_step_flops_by_op. Returns (FLOPs, whether
    the recompute is in)."""
    by_op, with_recompute = flops.count_step_flops_by_op(step_fn, run.accelerator.unwrap_model(run.denoiser), step)
    return kernels.by_kind(by_op), with_recompute


def step_batches(run, step: int) -> tuple:
    """What step `step` trains on, as (images, latent shape) per micro-batch: steps with the same
    batches do the same FLOPs. A step can be short (the last batch of a bucket or of the data)."""
    return tuple((len(idx), tuple(run.items[idx[0]]["latents"].shape))
                 for idx in (loop.sample_indices(run, step, m) for m in range(run.params.train.grad_accum)))


def flops_by_layout(run, step_fn, steps: range) -> tuple[dict[tuple, dict[str, int]], bool]:
    """FLOPs by kind of op of each distinct batch layout among `steps` (step_batches), each
    counted once, on the first step that has it; and whether any count holds recompute (model_flops)."""
    first = {}
    for i in steps:
        first.setdefault(step_batches(run, i), i)
    counted = {layout: model_flops(run, step_fn, i) for layout, i in first.items()}
    return {layout: n for layout, (n, _) in counted.items()}, any(r for _, r in counted.values())


def reference_step(run, steps: range) -> int:
    """The step of `steps` that does the most work (the most latent pixels; the first such). The
    floor, the traced steps and what the backward keeps are all of this one step, so they compare
    like with like, and the memory kept is a full step's, as the peak is."""
    return max(steps, key=lambda i: sum(n * math.prod(shape) for n, shape in step_batches(run, i)))


def floor(run, step_fn, step: int, ceiling_tflops: float) -> dict:
    """The least time step `step` could take on this device, kind by kind (roofline.step_floor;
    checkpointing's recompute counts, as its kernels run)."""
    return roofline.step_floor(step_fn, step, device=run.accelerator.device, ceiling_tflops=ceiling_tflops,
                               lora_params=run.lora_params)


@contextlib.contextmanager
def process_flags():
    """Put back the process-wide switches a training cell sets (deterministic algorithms, cuDNN's
    autotuning), so a later cell, e.g. an inference cell, runs with the process's own."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def measure(run, step_fn, steps: int, warmup: int) -> dict:
    device = run.accelerator.device
    timer = phases.PhaseTimer(device, enabled=True, warmup=warmup)
    for i in range(warmup + steps):
        timer.step_begin()
        loss = step_fn(i, timer)
        with timer.phase("logging"):
            loss.item()  # the host sync the loop does once per log interval
        timer.step_end()
    return timer.summary()


def _setup(params, spec: dict, cache_dir, raw_dir):
    """(cell params, run, step_fn, on-the-fly encoder or None) for one matrix cell; step_fn(i, timer)
    runs training step i."""
    cell = cell_params(params, spec)
    # Each cell may ask for another precision; accelerate keeps one state per process.
    AcceleratorState._reset_state(reset_partial_state=True)
    # Compiled code is cached per function, not per model: a second compiled cell's fresh denoiser
    # fails the first one's guards, and after torch._dynamo's recompile limit runs uncompiled.
    torch._dynamo.reset()
    run = loop.setup(cell, cache_dir)
    fly = OnTheFly(run, cache_dir, raw_dir) if cell_latents(spec) == "on_the_fly" else None

    def step_fn(i, timer=loop.NullTimer()):
        if fly is not None:
            fly(i, timer)
        return loop.train_step(run, i, timer)

    return cell, run, step_fn, fly


def _trace(run, step_fn, name: str, trace_path, step: int, warmup: int) -> tuple[dict[str, float], float, list]:
    """A Chrome trace of training step `step` run twice after `warmup` steps (0, 1, ...) and, on
    CUDA, the allocator's history of it twice more (open it at https://pytorch.org/memory_viz;
    memory.snapshot does nothing on CPU). Returns the traced steps' milliseconds per step by kernel
    (kernels.per_kernel), their own wall milliseconds per step, and the ops that launched their
    copies (kernels.launched_by; the trace records each op's input shapes and strides for it)."""
    device = run.accelerator.device
    order, names = iter([*range(warmup), step, step]), phases.PhaseTimer(device)  # names the phases in the trace
    traced = phases.trace(lambda: step_fn(next(order), names), trace_path, steps=2, warmup=warmup,
                          record_shapes=True)
    with memory.snapshot(trace_path.with_name(f"memory-{name}.pickle"), device):
        for _ in range(2):
            step_fn(step)
    cuda = device.type == "cuda"
    copies = kernels.launched_by(traced, 2, cuda, trace=trace_path)  # strides, where needed, from the trace written
    return kernels.per_kernel(traced, 2, cuda), kernels.traced_step_ms(traced), copies


def trace_cell(params, spec: dict, cache_dir, trace_path, raw_dir="data/raw") -> tuple[dict[str, float], float, list]:
    """Only the trace and snapshot of one cell (the fastest, once the matrix has been measured), of
    the reference step its profile_cell counted; returns what _trace returns."""
    p = params.profile
    with process_flags():
        _, run, step_fn, _ = _setup(params, spec, cache_dir, raw_dir)
        step = reference_step(run, range(p.warmup, p.warmup + p.steps))
        return _trace(run, step_fn, spec["name"], trace_path, step, warmup=p.warmup)


def kernel_breakdown(cell: dict, traced: tuple[dict[str, float], float, list]) -> dict:
    """A measured cell's traced kernel time by kind next to its FLOPs by kind (kernels.breakdown),
    and the GEMM-like kinds' time over their floor; `traced` is what _trace returns."""
    per_kernel_ms, step_ms, copies = traced
    out = kernels.breakdown(per_kernel_ms, cell["reference_step"]["flops_by_kind"], step_ms, copies=copies)
    # Measured over floor for the GEMM-like kinds: what REPORT.md reads without recounting.
    if ratios := roofline.vs_floor(cell["floor"], out):
        out["vs_floor"] = ratios
    return out


def fastest(cells: list[dict]) -> dict:
    """The cell that trains the most images per second. Not the shortest step: cells may differ in
    batch size, and a batch-1 cell's short steps would win while doing the least work."""
    return max(cells, key=lambda c: c["images_per_second"])


def profile_cell(params, spec: dict, cache_dir, trace_path=None, raw_dir="data/raw") -> dict:
    with process_flags():
        return _profile_cell(params, spec, cache_dir, trace_path, raw_dir)


def _profile_cell(params, spec, cache_dir, trace_path, raw_dir) -> dict:
    p = params.profile
    cell, run, step_fn, fly = _setup(params, spec, cache_dir, raw_dir)
    device = run.accelerator.device
    memory.reset_peak(device)
    summary = measure(run, step_fn, p.steps, p.warmup)
    # Read before the FLOP count, whose step runs without checkpointing, and before a GEMM ceiling
    # is measured: either would otherwise become this cell's peak.
    peak_mem = memory.peak_memory(device)
    # Throughput and MFU: the images and FLOPs of all measured steps, so a short step (the last
    # batch of a bucket) counts with its fewer images; over the median step's time that many
    # times, the statistic the tables and charts show, so one stalled step (another process, a page
    # fault) does not decide which cell is fastest.
    measured = range(p.warmup, p.warmup + p.steps)
    seconds = summary["step_median_ms"] * p.steps / 1e3
    images = sum(n for i in measured for n, _ in step_batches(run, i))
    counted, with_recompute = flops_by_layout(run, step_fn, measured)
    by_kind = Counter()
    for i in measured:
        by_kind.update(counted[step_batches(run, i)])
    n_flops = sum(by_kind.values())
    ref = reference_step(run, measured)
    dtype = loop.weight_dtype(run.accelerator.mixed_precision)
    peak, peak_source = hardware.peak_tflops(device, dtype)
    parts = memory.breakdown(run.accelerator.unwrap_model(run.denoiser), run.optimizer)
    if fly is not None:  # its VAE and text encoders stay resident all along
        parts["encoder_weights_bytes"] = memory.weight_bytes(fly.pipe)
    usd = cost_lib.hourly_usd(p)
    ceiling = hardware.ceiling_tflops(device, dtype)
    step_floor = floor(run, step_fn, ref, ceiling)
    traced = _trace(run, step_fn, spec["name"], trace_path, ref, warmup=0) if trace_path is not None else None  # warm
    result = {
        "name": spec["name"], "spec": spec, "device": str(device), "device_name": hardware.device_name(device),
        "mixed_precision": run.accelerator.mixed_precision,
        "step_ms": summary["step_median_ms"], "images_per_step": cell.train.batch_size * cell.train.grad_accum,
        "images_per_second": images / seconds,
        "phases": summary, "coverage": summary["coverage"],
        "flops_per_step": n_flops / p.steps, "achieved_tflops": flops.achieved_tflops(n_flops, seconds),
        "flops_by_kind": {kind: n / p.steps for kind, n in by_kind.items()},
        "peak_tflops": peak, "peak_source": peak_source, "mfu": hardware.mfu(n_flops, seconds, peak),
        # True where the step without checkpointing did not fit: FLOPs and MFU then count the recompute.
        "flops_with_recompute": with_recompute,
        # What this device's GEMMs reach (the peak itself where none is in the datasheet table).
        "ceiling_tflops": ceiling,
        # The reference step's floor, kind by kind: how far the kernels are from what the device allows.
        "reference_step": {"step": ref, "images": sum(n for n, _ in step_batches(run, ref)),
                           "flops_by_kind": counted[step_batches(run, ref)]},
        "floor": step_floor,
        "memory": peak_mem | parts | memory.activations(parts, peak_mem, device)
                  | memory.kept(step_floor, cell.train.compile),
        "cost": cost_lib.cost(seconds / p.steps, cell.train.steps, usd) | {"usd_per_hour": usd},
    }
    if traced is not None:  # where the traced steps' time went, by kind of kernel
        result["kernels"] = kernel_breakdown(result, traced)
    return result
