"""The training loop: LoRA on the denoiser, reading only the latent/text cache.

One readable loop (nanoGPT-style) built on accelerate for devices, mixed precision and
several processes. Noise, timesteps and the data order are functions of (seed, step)
alone, so a run resumed from a checkpoint computes exactly what an uninterrupted run does.
"""

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, broadcast_object_list, set_seed
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from sdtune import families, io, runtime
from sdtune.data import cache as cache_lib
from sdtune.families import common
from sdtune.errors import UserError
from sdtune.params import CUDA_GRAPH_MODES, LOGGING
from sdtune.profiling import hardware, memory
from sdtune.train import checkpoint, lora, norms, optim, upsample


# Attention kernels that can be forced by name; any other choice ("sdpa") leaves PyTorch to pick.
BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def attention(choice: str):
    """train.attention: "sdpa" lets PyTorch pick its fastest fused kernel; "math" forces the plain
    reference implementation (what attention costs without the fused kernels); "flash",
    "efficient" and "cudnn" force one fused kernel (for benchmarks; train.attention allows
    only "sdpa" and "math")."""
    return sdpa_kernel(BACKENDS[choice]) if choice in BACKENDS else contextlib.nullcontext()


class NullTimer:
    """Stands in for the profiler's PhaseTimer when nobody is measuring."""

    def phase(self, name):
        return contextlib.nullcontext()


def mixed_precision(choice: str, device_type: str) -> str:
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen base's dtype for accelerate's mixed precision ("no", "fp16" or "bf16")."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def qlora_config(train, accelerator, compute_dtype):
    """QLoRA: the frozen denoiser quantized to 4-bit NF4 as it loads; LoRA trains on top."""
    if not train.qlora:
        return None
    if accelerator.device.type != "cuda":
        raise UserError("train.qlora: 4-bit NF4 loading needs a CUDA GPU (bitsandbytes through diffusers); "
                        "set train.qlora: false to train in full precision here")
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


@dataclass
class Run:
    params: object
    accelerator: Accelerator
    family: object
    denoiser: torch.nn.Module
    noise_scheduler: object
    optimizer: object
    lr_scheduler: object
    items: list
    lora_params: list  # the trainable tensors: listed once, since walking the model's ~2,000 modules takes ms
    ema: object = None
    history: list = field(default_factory=list)
    step: int = 0
    grad_norm: object = None  # of the last step, still on the device
    batches: dict = field(default_factory=dict)  # epoch -> its batches (see epoch_batches)
    base_revision: str = "unknown"  # what model.revision named when train() began (base_revision)


def setup(params, cache_dir) -> Run:
    """Load the cache and the denoiser, attach LoRA, build the optimizer, compile if asked;
    nothing trained yet."""
    items = cache_lib.load(cache_dir)
    if not items:
        raise UserError(f"{cache_dir}/index.json: the cache holds no items; run the cache stage first")
    run = prepare(params, items)
    if params.train.compile:
        compile_denoiser(run)
    return run


def prepare(params, items: list[dict], denoiser=None) -> Run:
    """A Run over `items` (the cached tensors, one dict per image): the denoiser loaded (unless
    given: bench/ passes real-size ones with random weights), LoRA attached, optimizer built."""
    p, m = params.train, params.model
    family = families.get(m.family)  # the stages check the params against it (families.of), once
    family.check_train(p)  # a key the family refuses stops here, before a model loads or a checkpoint goes
    device_type = runtime.device(params.base.device).type
    if p.mixed_precision == "fp16" and device_type == "cpu":
        # accelerate gives the CPU no fp16 autocast nor loss scaling: the fp16 base would meet the
        # float32 LoRA in a matmul and fail deep in the first step.
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # train.autocast: false keeps accelerate's mixed precision (the base's dtype, fp16's loss scaling)
    # with its autocast switched off, around the prepared model's forward and in acc.autocast() alike.
    accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision=mixed_precision(p.mixed_precision, device_type),
                              kwargs_handlers=[AutocastKwargs(enabled=p.autocast)])
    # Seeds python, numpy and torch: the LoRA initialisation and dropout draw from them.
    set_seed(params.base.seed)
    if p.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first handle is made;
        # without it torch refuses deterministic matmuls on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(p.deterministic)  # both ways: profile cells share a process
    # cuDNN times its algorithms for each convolution shape once and keeps the fastest
    # (convolutions are half of a UNet step's FLOPs). A choice by timing can differ between runs,
    # so a deterministic run keeps cuDNN's fixed heuristics.
    torch.backends.cudnn.benchmark = not p.deterministic

    # The frozen base sits in the compute dtype; the LoRA weights stay float32 for stable updates.
    dtype = weight_dtype(accelerator.mixed_precision)
    # The scheduler first: a few bytes of config, whose checks (sd3 refuses model.prediction_type)
    # must not wait for SD3.5 Large's 8B transformer to load.
    noise = family.load_noise_scheduler(m)
    if denoiser is None:
        denoiser = family.load_denoiser(m, dtype=dtype, quantization_config=qlora_config(p, accelerator, dtype))
    denoiser.train()  # from_pretrained returns eval mode, which would switch LoRA dropout off
    lora.add(denoiser, p.lora, family.LORA_TARGETS)
    for param in lora.trainable(denoiser):
        param.data = param.data.float()
    # With mixed precision and train.autocast every forward runs under autocast, training and
    # validation alike; without it only the LoRA layers that keep peft's forward do.
    mixed = accelerator.mixed_precision != "no"
    lora.training_forward(denoiser, p.lora, autocast=mixed and p.autocast,
                          own_autocast=dtype if mixed and not p.autocast else None)
    if p.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if p.group_norm == "per-channel":
        norms.per_channel_stats(denoiser)
        if not p.compile:
            print("train: warning: train.group_norm: per-channel is meant for compiled runs (train.compile: "
                  "true); eagerly it runs several kernels where torch's group norm runs one")
    if p.upsample == "broadcast":
        upsample.broadcast_upsamplers(denoiser)
    if p.channels_last:
        denoiser.to(memory_format=torch.channels_last)

    lora_params = lora.trainable(denoiser)  # the same tensors once prepared: accelerate wraps, not copies
    opt = optim.optimizer(p.optimizer, lora_params, p.lr, p.weight_decay, accelerator.device)
    sched = optim.scheduler(p.lr_scheduler, opt, p.warmup_steps, p.steps)
    denoiser, opt = accelerator.prepare(denoiser, opt)
    # foreach: the EMA's update is two multi-tensor kernels a step, not three launches per LoRA tensor
    # (768 a step for SD1.5's 256), which at small batches the GPU would wait on the host for.
    ema = EMAModel(lora_params, decay=p.ema_decay, foreach=True) if p.ema_decay else None
    return Run(params, accelerator, family, denoiser, noise, opt, sched, items, lora_params, ema)


def compile_denoiser(run: Run) -> None:
    """train.compile: in place, so LoRA saving and resume see the same modules and keys."""
    train = run.params.train
    common.compile_denoiser(run.denoiser, run.family.COMPILE_BLOCKS, train.compile_mode, train.compile_options)


def epoch_batches(run: Run, epoch: int) -> list[list[int]]:
    """The epoch's batches, a function of (seed, epoch) alone.

    Items are grouped by latent shape (one group per aspect-ratio bucket; one group when all
    are square crops), shuffled within each group and cut into batches of train.batch_size (a
    group smaller than the batch makes one smaller batch), then the batches are shuffled.
    """
    if epoch not in run.batches:
        g = torch.Generator().manual_seed(run.params.base.seed * 7919 + epoch)
        groups = {}
        for i, item in enumerate(run.items):
            groups.setdefault(tuple(item["latents"].shape), []).append(i)
        size, batches = run.params.train.batch_size, []
        for members in groups.values():
            order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            batches += [order[k:k + size] for k in range(0, len(order), size)]
        # Keep memory flat; epoch 0 stays, as sample_indices reads its length every step.
        run.batches = {e: b for e, b in run.batches.items() if e >= epoch - 1 or e == 0}
        run.batches[epoch] = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return run.batches[epoch]


def _global_batch(run: Run, step: int, micro: int, rank: int) -> int:
    """The global batch number of process `rank` at (step, micro-batch):
    (step * grad_accum + micro) * processes + rank."""
    return (step * run.params.train.grad_accum + micro) * run.accelerator.num_processes + rank


def _indices(run: Run, step: int, micro: int, rank: int) -> list[int]:
    """The cached items process `rank` trains on at (step, micro-batch): the global batch b (see
    _global_batch) walks through the epochs' batches in order, so ranks take different batches and
    a resumed run takes the same ones."""
    b = _global_batch(run, step, micro, rank)
    per_epoch = len(epoch_batches(run, 0))
    return epoch_batches(run, b // per_epoch)[b % per_epoch]


def sample_indices(run: Run, step: int, micro: int) -> list[int]:
    """Which cached items this process trains on at (step, micro-batch)."""
    return _indices(run, step, micro, run.accelerator.process_index)


def images_in_step(run: Run, step: int) -> int:
    """The images every process together trains on at `step`: fewer than batch_size x grad_accum x
    processes where a batch is an epoch's or a bucket's short last one."""
    acc = run.accelerator
    return sum(len(_indices(run, step, micro, rank))
               for micro in range(run.params.train.grad_accum) for rank in range(acc.num_processes))


def step_generator(run: Run, step: int, micro: int) -> torch.Generator:
    batch = _global_batch(run, step, micro, run.accelerator.process_index)
    return torch.Generator().manual_seed(run.params.base.seed * 1_000_003 + batch)


def train_step(run: Run, step: int, timer=NullTimer()) -> torch.Tensor:
    """One optimizer step (with its micro-batches). Returns the mean loss, still on the device."""
    p, acc = run.params.train, run.accelerator
    total = torch.zeros((), device=acc.device)
    for micro in range(p.grad_accum):
        with timer.phase("data"):
            idx = sample_indices(run, step, micro)
            batch = {k: torch.stack([run.items[i][k] for i in idx]) for k in run.items[0]}
        with timer.phase("h2d"):
            batch = {k: runtime.to_device(v, acc.device) for k, v in batch.items()}
        # Under DDP only the last micro-batch all-reduces the gradients.
        sync = contextlib.nullcontext() if micro == p.grad_accum - 1 else acc.no_sync(run.denoiser)
        if p.compile_mode in CUDA_GRAPH_MODES:  # validated: only with compile on
            # CUDA graphs replay into the same output buffers: this says the last step's outputs
            # (read already: the loss went into `total`, the gradients into the optimizer) may go.
            torch.compiler.cudagraph_mark_step_begin()
        with sync, attention(p.attention):
            with timer.phase("forward"), acc.autocast():
                loss = run.family.training_loss(run.denoiser, run.noise_scheduler, batch,
                                                step_generator(run, step, micro), p).mean()
            with timer.phase("backward"):
                acc.backward(loss / p.grad_accum)
        total += loss.detach() / p.grad_accum
    with timer.phase("optimizer"):
        # An infinite bound clips nothing and still returns the norm.
        bound = p.max_grad_norm if p.max_grad_norm is not None else math.inf
        run.grad_norm = acc.clip_grad_norm_(run.lora_params, bound)
        scale = acc.scaler.get_scale() if acc.scaler is not None else None
        run.optimizer.step()
        # fp16: the loss scaler skips a step whose gradients overflowed, and halves its scale. The
        # schedule and the EMA skip it too. (accelerate's step_was_skipped misses the skips inside
        # fused AdamW, to which torch hands the overflow flag, hence the scales compared. Reading
        # the scale is a host sync, paid only by fp16 runs: bf16 and fp32 have no scaler.)
        if scale is None or acc.scaler.get_scale() >= scale:
            run.lr_scheduler.step()
            if run.ema is not None:
                run.ema.step(run.lora_params)
        run.optimizer.zero_grad(set_to_none=True)
    return total


def _set_lora(run: Run):
    from peft.utils import set_peft_model_state_dict

    def set_tensors(tensors):
        set_peft_model_state_dict(run.accelerator.unwrap_model(run.denoiser), tensors)
    return set_tensors




# The train stage's code deps in dvc.yaml but the profiling modules, which only measure (a test
# holds the two together): what computes a step, the validation images and the LoRA written.
SDTUNE = Path(common.__file__).parent.parent
TRAINING_CODE = [SDTUNE / "train", SDTUNE / "families", SDTUNE / "data/cache.py", SDTUNE / "data/images.py",
                 SDTUNE / "data/links.py", SDTUNE / "evaluate/generate.py", SDTUNE / "evaluate/report.py"]


# The libraries that change the numbers of a step, an optimizer update, a validation image (its
# prompt's embedding, its PNG bytes) or the LoRA file; those not installed count as absent.
TRAINING_LIBRARIES = ["torch", "diffusers", "peft", "accelerate", "transformers", "tokenizers", "bitsandbytes",
                      "prodigyopt", "pillow", "safetensors"]


def training_code() -> str:
    """A hash of TRAINING_CODE and TRAINING_LIBRARIES' versions. DVC re-runs train when that code
    changes; a checkpoint the old code made must not be resumed, nor one made before an upgrade."""
    files = [f for path in TRAINING_CODE for f in (sorted(path.rglob("*.py")) if path.is_dir() else [path])]
    return io.sha256_code(files, TRAINING_LIBRARIES)


def base_revision(run: Run) -> str:
    """common.resolved_revision of the base model, looked up once, by the main process: ranks that
    looked at different moments (a "main" that moved between) would resume different checkpoints."""
    found = [common.resolved_revision(run.params.model) if run.accelerator.is_main_process else None]
    return broadcast_object_list(found)[0]


def check_cache_model(run: Run, cache_dir) -> None:
    """The cache holds what the base model's VAE and text encoders made of the data, as
    model.revision named them when it was built. DVC re-runs the cache stage when a param changes,
    not when "main" moves or local weights are edited: training on it then would pair one model's
    latents with another's denoiser. Checked by the main process, its verdict shared. The model
    and cache params too: a stage run by hand after a change (dvc repro would re-run the cache
    first) trained on 64-px latents at resolution 128, or failed on another family's items."""
    index = Path(cache_dir) / "index.json"
    built = io.read_json(index, required=("items",))
    encoded, m = built.get("resolved_revision"), run.params.model
    want = cache_lib.settings(m, run.params.cache)
    for key, value in built.get("settings", want).items():
        if want.get(key) != value:
            raise UserError(f"{index}: built with {key}: {value}, but params.yaml now says {want.get(key)}; "
                            f"build it again with `dvc repro cache` (or `python -m stages.cache`)")
    now = [common.resolved_revision(m, skip=run.family.DENOISER_ATTR) if run.accelerator.is_main_process else None]
    now = broadcast_object_list(now)[0]
    if encoded is not None and encoded != now:
        raise UserError(f"{index}: encoded with {m.id} at {encoded}, but model.revision ({m.revision}) now names "
                        f"{now}; encode it again with `dvc repro -f cache`, or pin model.revision")


def fingerprint(run: Run, cache_dir, revision: str, processes: int | None = None) -> str:
    """What a checkpoint must match to be resumed: train and model params, seed, cached data, code.
    The model by `revision`, what its revision names (a moved "main" or edited local weights are
    another model; "main" pinned to the commit it names is the same); the cache by its items' keys.
    `processes`: the run's process count unless given (check_process_count asks for another's)."""
    train = {k: v for k, v in run.params.train.model_dump().items() if k not in LOGGING}  # resumed across these
    model = run.params.model.model_dump() | {"revision": revision}
    parts = {"train": train, "model": model, "seed": run.params.base.seed,
             "cache": io.sha256_json(io.read_json(Path(cache_dir) / "index.json", required=("items",))["items"]),
             "processes": processes or run.accelerator.num_processes, "code": training_code(),
             "precision": run.accelerator.mixed_precision}  # what `auto` became on this card
    return io.sha256_json(parts)


def check_process_count(run: Run, ckpt_dir, cache_dir) -> None:
    """Refuse a checkpoint that is this run's in all but the process count. Resumed, the data
    order and RNG states would be another run's; removed as stale, hours of training on a VM
    that came back with a GPU fewer would go without a word. Every process reads and raises alike."""
    now = run.accelerator.num_processes
    for path in reversed(checkpoint.all_checkpoints(ckpt_dir)):
        meta = checkpoint.meta_of(path)
        made_by = meta.get("processes", now)
        if made_by != now and meta.get("fingerprint") == fingerprint(run, cache_dir, run.base_revision, made_by):
            raise UserError(f"{path}: made by this run with {made_by} process(es), resumed with {now}; run it "
                            f"with {made_by} again (docker/run: SDTUNE_PROCESSES={made_by}), or delete "
                            f"{Path(ckpt_dir)} to train from step 0 with {now}")


def resume(run: Run, ckpt_dir, mark: str, device: str) -> Path | None:
    """Load the newest checkpoint in `ckpt_dir` whose fingerprint is `mark`, if any. `device`:
    what this run computes on (hardware.device_name)."""
    acc = run.accelerator
    if acc.is_main_process:  # one remover: ranks removing the same folders race
        checkpoint.remove_stale(ckpt_dir, mark)
    acc.wait_for_everyone()
    found = checkpoint.latest(ckpt_dir, mark)
    if found is None:
        return None
    path, saved = found
    run.step, run.history = checkpoint.restore(saved, _set_lora(run), run.optimizer, run.lr_scheduler, run.ema,
                                               acc.scaler, rank=acc.process_index)
    # Not refused: another card (or CPU thread count) gives a run as good, rounded otherwise.
    made_on = saved["meta"].get("device")
    if made_on and made_on != device and acc.is_main_process:
        print(f"train: warning: {path.name} was made on {made_on}, this run is on {device}: its kernels round "
              f"otherwise, so the LoRA will not be bit-identical to an uninterrupted run's")
    return path


def _flush(run: Run, pending: list, log=None) -> None:
    """Move the pending per-step losses to the host once, and stop on the first non-finite one
    (or non-finite gradient norm); each row goes to `log` (W&B) too, every step in order.
    Every process calls it at the same steps. The losses are the mean over the processes, each of
    which trained its own batches: the curve is the global batch's, and a loss that is not finite
    on one process stops them all, where the others would wait for it in the next all-reduce."""
    if not pending:
        return
    values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, loss, norm, _ in pending])
    values = run.accelerator.reduce(values, reduction="mean").cpu().tolist()
    for (step, _, _, lr), (loss, norm) in zip(pending, values):
        # A finite loss with a non-finite gradient has already made the weights NaN: stop before that
        # step's checkpoint is written. Not with fp16, whose loss scaler skips such a step.
        checked = {"loss": loss} if run.accelerator.scaler is not None else {"loss": loss, "gradient norm": norm}
        for what, value in checked.items():
            if not math.isfinite(value):
                raise UserError(f"train: the {what} became {value} at step {step}; stopped. The last good "
                                f"checkpoint is kept; lower train.lr or change train.mixed_precision")
        run.history.append({"step": step, "loss": loss, "lr": lr, "grad_norm": norm})
        if log is not None:
            log(run.history[-1])
    pending.clear()


def _validates_at(p, step: int) -> bool:
    """Whether the run draws its validation images after `step`: every validate_every, and the last."""
    return bool(p.validate_every) and (step % p.validate_every == 0 or step == p.steps)


def train(run: Run, ckpt_dir, cache_dir, log=None, validate=None, on_start=None) -> dict:
    """The loop. Resumes from the newest checkpoint in `ckpt_dir` made by this same run, if any.
    `on_start(step)` is called on the main process with the step the run starts from (0 or the
    resumed checkpoint's) before any step or validation."""
    p, acc = run.params.train, run.accelerator
    check_cache_model(run, cache_dir)
    run.base_revision = base_revision(run)
    mark = fingerprint(run, cache_dir, run.base_revision)
    check_process_count(run, ckpt_dir, cache_dir)
    device = hardware.device_name(acc.device)  # in words: the card, or the CPU and its threads
    resumed = resume(run, ckpt_dir, mark, device)
    start, pending = run.step, []
    if on_start is not None and acc.is_main_process:
        on_start(start)
    if validate is not None and start and _validates_at(p, start):
        # Resumed at a validation step: a failure between its checkpoint and its images (validation
        # out of memory, a kill) left none. They come out as they did: the checkpoint holds the weights.
        validate(run)
    # The speed is the training's: time spent writing checkpoints and drawing validation images is
    # counted apart (`paused`), and images are counted batch by batch (a short last batch has fewer).
    t0, paused, images = time.perf_counter(), 0.0, 0
    bar = tqdm(range(start, p.steps), initial=start, total=p.steps, desc="train", unit="step",
               disable=not acc.is_main_process)
    for step in bar:
        lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        loss = train_step(run, step)
        images += images_in_step(run, step)
        pending.append((step + 1, loss, run.grad_norm.detach(), lr))
        run.step = step + 1
        last = run.step == p.steps
        if run.step % p.log_every == 0 or run.step % p.checkpoint_every == 0 or last:
            _flush(run, pending, log)
            bar.set_postfix(loss=f"{run.history[-1]['loss']:.4f}")
        # The checkpoint before validation: a validation that fails (out of memory on a small card)
        # must not take the step's checkpoint with it. The last step too, so that a rerun after a
        # failure past the loop (its validation, writing the LoRA) resumes there, not steps earlier.
        if run.step % p.checkpoint_every == 0 or last:  # flushed above: the steps before are done
            began = time.perf_counter()
            rng = checkpoint.rng_by_rank(acc)  # from every process, so every process comes here
            if acc.is_main_process:
                checkpoint.save(ckpt_dir, run.step, lora.peft_state(acc.unwrap_model(run.denoiser)),
                                run.optimizer, run.lr_scheduler, run.ema, acc.scaler, run.history,
                                p.keep_checkpoints, mark, rng_by_rank=rng, device=device)
            paused += time.perf_counter() - began
        if validate is not None and _validates_at(p, run.step):
            _flush(run, pending, log)  # waits for the steps queued on the device: their time is training's
            began = time.perf_counter()
            validate(run)
            paused += time.perf_counter() - began
    acc.wait_for_everyone()
    wall = time.perf_counter() - t0
    seconds = wall - paused
    done = p.steps - start
    # The mean of the last steps, one step's loss swings with its timesteps and noise: over the
    # window of the loss curve's running mean, so the number is where the curve ends.
    recent = [h["loss"] for h in run.history[-smoothing_window(len(run.history)):]]
    return {
        # steps_run: the steps this process trained (fewer after a resume); the times and speeds are theirs
        "steps": p.steps, "steps_run": done, "resumed_from": str(resumed) if resumed else None,
        # seconds: training steps only; wall_seconds: with checkpoints written and validation drawn
        "final_loss": sum(recent) / len(recent), "final_loss_steps": len(recent), "seconds": seconds,
        "wall_seconds": wall, "images": images,
        "steps_per_second": done / seconds if done else 0.0,
        "images_per_second": images / seconds if done else 0.0,
        "mixed_precision": acc.mixed_precision, "device": str(acc.device),
        "device_name": device, "processes": acc.num_processes,
        "peak_memory_bytes": memory.peak_memory(acc.device)["peak_bytes"],
    }


def final_lora(run: Run) -> dict:
    """The adapter to publish, in diffusers keys: the EMA weights when EMA is on."""
    model = run.accelerator.unwrap_model(run.denoiser)
    if run.ema is not None:
        run.ema.copy_to(run.lora_params)
    return lora.diffusers_state(model)


def smoothing_window(steps: int) -> int:
    """The steps the final loss and the loss curve's running mean average: a twentieth of the
    run, and at least 5 (a 30-step demo would otherwise average 1)."""
    return min(steps, max(5, steps // 20))
