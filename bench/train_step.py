"""One LoRA training step on a random-weight, real-size denoiser: step time, FLOPs, MFU, peak memory.

    python -m bench.train_step --arch sd15 --res 512 --bs 16 --precision bf16 --compile --json out.json

The inputs stand in for cached latents and text embeddings (what sdtune's train stage reads), so
a step is the denoiser's forward and backward plus the optimizer, as in sdtune.train.loop.

--baseline writes the step the way diffusers' examples/text_to_image/train_text_to_image_lora.py
does instead: VAE encode and text-encoder forward inside every step, fp16 weights with fp16
autocast and a GradScaler, no compile, cuDNN's default algorithm heuristics, one loss.item() per
step. SD1.5 only, as that script is.

--loop runs sdtune's own training step (sdtune.train.loop.train_step, as `dvc repro` trains) on the
same denoiser, fed host-side items shaped like the cache's: the batch is stacked and copied to the
device, noise and timesteps come from the per-step generator, accelerate, clipping, the LR
schedule and the optimizer run as in training, and --compile compiles as train.compile does (per
block for SD3). The gap to the plain step is what the loop costs.

--many FILE runs several configurations in one process, one per line ("LIMIT_S [NEED_S] ARGS..."),
each under its own time limit and not started with less than NEED_S of the budget left, so the
imports and the CUDA start-up are paid once (bench/gpu.sh groups its eager runs this way).
"""

import argparse
import ast
import contextlib
import datetime
import json
import platform
import shlex
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

IMPORTED_AT = time.perf_counter()  # before torch and diffusers: their import time is part of a run's cost

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from bench import archs
from sdtune import errors, families, io, params
from sdtune.families import common
from sdtune.params import CUDA_GRAPH_MODES
from sdtune.profiling import flops, hardware, kernels, memory, roofline
from sdtune.profiling.phases import PhaseTimer, sync
from sdtune.train import lora, loop, norms, optim, upsample

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Blocks of back-to-back steps timed. One block gives no spread to judge a 2% change by; on the
# H100 the same compiled step read 116.5 and 117.2 ms pipelined in two calls (117.9 and 125.0 synced).
PIPELINED_BLOCKS = 3
# torch's fp32 matmul and conv precision before any run changed them (only fp32 runs set them).
FP32_PRECISION = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


def parse(argv=None, prog="python -m bench.train_step"):
    """The run's options; `prog` names the command in errors (bench.roofline passes its own)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", choices=list(archs.ARCHS))
    p.add_argument("--tiny", action="store_true", help="the tiny config of the arch (CPU tests)")
    p.add_argument("--res", type=int, help="image side in pixels (default: the arch's native one, 64 if --tiny)")
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--precision", choices=list(DTYPES), help="default bf16; fp16 with --baseline")
    p.add_argument("--tf32", action="store_true", help="let fp32 matmuls and convs use TF32 (--precision fp32)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--compile-scope", choices=["full", "blocks"],
                   help="whole model, or each repeated block (regional: faster to compile); "
                        "default full for UNets, blocks for SD3")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set a torch._inductor.config option for this run's compile, e.g. "
                        "force_layout_optimization=True (repeatable)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-forward", default="addmm", choices=["addmm", "peft"],
                   help="addmm: each LoRA product added inside a GEMM, as the loop does; peft: peft's own "
                   "forward (--baseline always, as the diffusers example)")
    p.add_argument("--no-autocast", action="store_true",
                   help="run the bf16/fp16 base in its own dtype, not under autocast, as train.autocast: false "
                        "does (CUDA autocast runs each norm in float32 and copies its input and output)")
    p.add_argument("--nf4", action="store_true", help="NF4 base weights via bitsandbytes (QLoRA); CUDA only")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", *loop.BACKENDS, "fa4"],
                   help="sdpa: let torch pick the fused kernel; math: the unfused reference; "
                        "flash, efficient, cudnn: that SDPA kernel only; fa4: the flash kernel, with "
                        "FlashAttention 4's (the flash-attn-4 package; Hopper and Blackwell) in its place")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--group-norm", default="native", choices=["native", "per-channel"],
                   help="per-channel: group norms take their statistics channel by channel first "
                        "(train.group_norm, sdtune/train/norms.py), which channels-last memory reads in "
                        "whole rows; for compiled channels-last or force_layout_optimization runs")
    p.add_argument("--upsample", default="native", choices=["native", "broadcast"],
                   help="broadcast: the UNet's x2 upsamplers repeat pixels by a broadcast, whose compiled backward "
                        "is a 2x2 sum, not an atomic scatter into an NCHW buffer (train.upsample, "
                        "sdtune/train/upsample.py); for compiled channels-last runs")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="cuDNN's fixed heuristics instead of timing its convolution algorithms (the training "
                        "loop times them unless train.deterministic)")
    p.add_argument("--baseline", action="store_true", help="the diffusers-example way (see above)")
    p.add_argument("--loop", action="store_true", help="sdtune's training loop step (see above)")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--kernels", action="store_true",
                   help="also profile a few steps and sum kernel time by kind (attention, convolution, "
                        "matmul, fused, ...) next to each kind's FLOPs: which kind holds MFU down")
    p.add_argument("--warm-only", action="store_true",
                   help="build, compile and run the warm-up steps only, without timing or FLOP counts: "
                        "fills inductor's on-disk caches so that a later run of the same options compiles "
                        "from them (bench/gpu.sh does this while the GPU tests run)")
    p.add_argument("--phases", action="store_true",
                   help="also time forward/backward/optimizer (a sync at each boundary: slower steps)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda[:i], or meta: count the FLOPs of a step at any size, time nothing")
    p.add_argument("--threads", type=int, help="CPU threads for torch (on a loaded machine 1 avoids spin-waits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="label in the table (default: built from the options)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)

    arch = archs.get(args.arch)
    args.res = (archs.TINY_RES if args.tiny else arch.res) if args.res is None else args.res
    args.precision = args.precision or ("fp16" if args.baseline else "bf16")
    # The family's scope (sdtune.families.*.COMPILE_BLOCKS), as train.compile compiles it.
    scope = "blocks" if families.get(arch.family).COMPILE_BLOCKS else "full"
    if args.loop:
        if args.baseline or args.tf32 or args.device == "meta":
            p.error("--loop runs the training loop's own step: not with --baseline, --tf32 or --device meta")
        if args.compile_scope not in (None, scope):
            p.error(f"--loop runs the training loop's own step, which compiles {args.arch} with --compile-scope {scope}")
    args.compile_scope = args.compile_scope or scope
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = args.device.startswith("cuda")
    if args.nf4 and not cuda:
        p.error("--nf4 needs a CUDA GPU: bitsandbytes' 4-bit training kernels are CUDA only here")
    if args.attention == "fa4" and not cuda:
        p.error("--attention fa4 needs a CUDA GPU: FlashAttention 4's kernels run on Hopper and Blackwell only")
    if args.tf32 and args.precision != "fp32":
        p.error("--tf32 is for --precision fp32 (bf16 and fp16 runs leave torch's TF32 flags alone)")
    if args.no_autocast and (args.precision == "fp32" or args.baseline):
        p.error("--no-autocast: fp32 runs no autocast anyway, and --baseline autocasts as the diffusers example does")
    if args.nf4 and args.precision == "fp32":
        p.error("--nf4 computes in bf16 or fp16; pick --precision bf16")
    if args.baseline and (args.arch != "sd15" or args.compile or args.nf4 or args.group_norm != "native"
                          or args.upsample != "native"):
        p.error("--baseline is the SD1.5 diffusers example: --arch sd15, no --compile, --nf4, --group-norm or --upsample")
    if args.group_norm != "native" and arch.family == "sd3":
        p.error(f"--group-norm: {args.arch}'s transformer has no group norms")
    if args.upsample != "native" and arch.family == "sd3":
        p.error(f"--upsample: {args.arch}'s transformer has no upsamplers")
    for flag, value, least in (("--bs", args.bs, 1), ("--res", args.res, 8), ("--rank", args.rank, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--threads", 1 if args.threads is None else args.threads, 1)):
        if value < least:  # a shape of 0 was a reshape traceback deep in the model
            p.error(f"{flag}: expected a whole number of at least {least}, got {value}")
    if args.res % 8:
        p.error("--res must be a multiple of 8 (the VAE downsamples 8x)")
    args.inductor = dict(inductor_option(p, item) for item in args.inductor)
    if args.inductor and not args.compile:
        p.error("--inductor sets torch.compile's options: it needs --compile")
    args.name = args.name or label(args)
    return args


def inductor_option(p, item: str) -> tuple[str, object]:
    """KEY=VALUE to (key, value), the value a Python literal of the option's own type (checked as
    train.compile_options is)."""
    key, sep, text = item.partition("=")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    try:
        if not sep:
            raise ValueError("expected KEY=VALUE")
        params.check_inductor_options({key: value})
    except ValueError as err:
        p.error(f"--inductor {item}: {err}")
    return key, value


def label(args) -> str:
    parts = [args.arch + ("-tiny" if args.tiny else ""), f"{args.res}px", f"bs{args.bs}", args.precision]
    if args.baseline:
        parts.append("baseline")
    if args.loop:
        parts.append("loop")
    if args.compile:
        parts.append("compile" + ("" if args.compile_mode == "default" else f"-{args.compile_mode}"))
        parts += [f"{k}={v}" for k, v in args.inductor.items()]
    for flag, text in [(args.checkpointing, "ckpt"), (args.nf4, "nf4"), (args.tf32, "tf32"),
                       (args.channels_last, "channels-last"), (args.optimizer == "adamw8bit", "adamw8bit"),
                       (args.attention != "sdpa", f"{args.attention}-attn"),
                       (args.lora_forward == "peft" and not args.baseline, "peft-lora"),
                       (args.no_autocast, "no-autocast"), (args.group_norm != "native", f"{args.group_norm}-gn"),
                       (args.upsample != "native", f"{args.upsample}-upsample"),
                       (args.no_cudnn_benchmark, "no-cudnn-benchmark")]:
        if flag:
            parts.append(text)
    return " ".join(parts)


def flash_attention_4():
    """SDPA's flash kernel replaced by FlashAttention 4's for the rest of the process (torch's own
    hook for it; the flash-attn-4 package's CuTe kernels, compiled on first use). Its kernels
    overlap the softmax's exponentials with the matmuls, which the roofline's exponential floor
    says the kernels torch picks on an H100 do not (docs/benchmarks.md)."""
    from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl

    if current_flash_attention_impl() != "FA4":
        activate_flash_attention_impl("FA4")


class Bench:
    """The model, optimizer and pre-made inputs of one configuration, and its step()."""

    def __init__(self, args):
        self.args = args
        self.arch = archs.get(args.arch)
        self.device = torch.device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        if args.precision == "fp32":
            tf32 = "tf32" if args.tf32 else "ieee"
            torch.backends.cuda.matmul.fp32_precision = tf32
            torch.backends.cudnn.conv.fp32_precision = tf32
        else:
            # torch's own flags (an fp32 run before this one in a --many process set them): once the
            # new API sets cuDNN's conv precision alone, the legacy getter torch.backends.cudnn.allow_tf32
            # raises, and inductor's max-autotune conv template reads it (pytorch issue 166387).
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = FP32_PRECISION
        dtype = DTYPES[args.precision]
        self.dtype = dtype
        # The SDPA kernel each step forces (loop.attention); fa4 is the flash one, FlashAttention 4's.
        self.backend = "flash" if args.attention == "fa4" else args.attention
        if args.attention == "fa4":
            flash_attention_4()

        self.model = archs.build(self.arch, args.tiny, self.device, dtype, nf4=args.nf4)
        if args.loop:
            self._setup_loop()
        else:
            self._setup_step()
        # After the loop's own setting. The diffusers example leaves cuDNN on its heuristics.
        torch.backends.cudnn.benchmark = not (args.no_cudnn_benchmark or args.baseline)

    def _setup_step(self):
        """This denoiser with LoRA, an optimizer and pre-made inputs (or the diffusers example's parts)."""
        args, dtype = self.args, self.dtype
        self.lora = params.Lora(rank=args.rank, alpha=float(args.rank), addmm=args.lora_forward == "addmm")
        lora.add(self.model, self.lora, self.arch.lora_targets)
        self.params = lora.trainable(self.model)
        for p in self.params:  # LoRA weights stay float32 for stable updates, as in sdtune.train.loop
            p.data = p.data.float()
        self.model.train()
        if args.checkpointing:
            self.model.enable_gradient_checkpointing()
        if args.group_norm == "per-channel":  # as train.group_norm does
            norms.per_channel_stats(self.model)
        if args.upsample == "broadcast":  # as train.upsample does
            upsample.broadcast_upsamplers(self.model)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        if args.channels_last:
            self.model.to(memory_format=self.memory_format)

        if args.baseline:
            self._setup_baseline()
        else:
            self.optimizer = optim.optimizer(args.optimizer, self.params, 1e-4, 1e-2, self.device)
            self.latents, self.cond = archs.inputs(self.arch, args.bs, args.res, self.device, dtype, args.tiny)
            # DDPM's scaled-linear schedule (SD1.x/SDXL), kept on the device so noising needs no copy.
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=self.device) ** 2
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        mixed = dtype != torch.float32 and self.device.type != "meta"  # meta has no autocast
        autocast = mixed and not args.no_autocast
        self.amp = torch.autocast(self.device.type, dtype=dtype) if autocast else contextlib.nullcontext()
        if not args.baseline:  # as the loop does; the diffusers example keeps peft's forward and casts
            own = dtype if mixed and args.no_autocast else None
            lora.training_forward(self.model, self.lora, autocast, own_autocast=own)

    def _setup_loop(self):
        """A training-loop Run over this denoiser: LoRA, optimizer and everything else as in training."""
        a = self.args
        train = {"steps": 10**6, "batch_size": a.bs, "wandb": "disabled", "optimizer": a.optimizer,
                 "mixed_precision": {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[a.precision],
                 "gradient_checkpointing": a.checkpointing, "channels_last": a.channels_last,
                 "compile": a.compile,  # attention: step() forces the asked kernel around the loop
                 "compile_mode": a.compile_mode, "autocast": not a.no_autocast, "group_norm": a.group_norm,
                 "upsample": a.upsample,
                 "lora": {"rank": a.rank, "alpha": float(a.rank), "addmm": a.lora_forward == "addmm"}}
        # model.id "tiny" only picks the noise schedule (the same as the real configs'); the
        # denoiser is this one.
        run_params = params.parse({"base": {"seed": a.seed, "device": "cuda" if self.device.type == "cuda" else "cpu"},
                                   "model": {"family": self.arch.family, "id": "tiny", "resolution": a.res},
                                   "train": train})
        AcceleratorState._reset_state(reset_partial_state=True)
        items = archs.cache_items(self.arch, a.bs, a.res, a.tiny)
        self.run = loop.prepare(run_params, items, denoiser=self.model)
        self.model = self.run.accelerator.unwrap_model(self.run.denoiser)
        self.params, self.optimizer, self.step_index = lora.trainable(self.model), self.run.optimizer, 0

    def _setup_baseline(self):
        from diffusers import DDPMScheduler

        args = self.args
        self.vae = archs.build_vae(args.tiny, self.device, self.dtype).requires_grad_(False)
        self.text_encoder = archs.build_text_encoder(args.tiny, self.device, self.dtype).requires_grad_(False)
        # The example's pre-processed batch: pixels in [-1, 1] and token ids; decoding and augmenting
        # images on the host is left out of both ways.
        self.pixels = torch.rand(args.bs, 3, args.res, args.res, device=self.device).mul(2).sub(1).to(self.dtype)
        vocab = self.text_encoder.config.vocab_size
        self.input_ids = torch.randint(0, vocab, (args.bs, 77), device=self.device)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear")
        if args.optimizer == "adamw8bit":  # the example's --use_8bit_adam
            self.optimizer = optim.optimizer("adamw8bit", self.params, 1e-4, 1e-2, self.device)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        # On meta (FLOP counting) the scaler would read its inf flag with .item(); it changes no FLOPs.
        self.scaler = torch.amp.GradScaler(self.device.type if self.device.type != "meta" else "cpu",
                                           enabled=self.dtype == torch.float16 and self.device.type != "meta")

    def compile(self):
        a = self.args
        if a.loop:
            loop.compile_denoiser(self.run)
            return
        # In place, as train.compile does: self.model is the compiled denoiser from here on.
        common.compile_denoiser(self.model, self.arch.blocks if a.compile_scope == "blocks" else None,
                                a.compile_mode)

    def _noised(self, x):
        """(noisy latents, timesteps, target) for the arch's objective, all made on the device."""
        noise = torch.randn_like(x)
        b = x.shape[0]
        if self.arch.objective == "epsilon":
            t = torch.randint(0, 1000, (b,), device=x.device)
            a = self.alphas_cumprod[t].view(b, 1, 1, 1)
            return (a.sqrt() * x + (1 - a).sqrt() * noise).to(x.dtype), t, noise
        # Rectified flow with logit-normal sigmas, as SD3 is trained.
        s = torch.sigmoid(torch.randn(b, device=x.device)).view(b, 1, 1, 1)
        return ((1 - s) * x + s * noise).to(x.dtype), s.flatten() * 1000, noise - x

    def step(self, timer=PhaseTimer(enabled=False)):
        """One optimizer step. Returns the loss, still on the device (no host sync here)."""
        if self.args.baseline:
            return self._baseline_step(timer)
        if self.args.loop:
            with loop.attention(self.backend):  # a kernel the loop's own key cannot force
                loss = loop.train_step(self.run, self.step_index, timer)
            self.step_index += 1
            return loss
        if self.args.compile and self.args.compile_mode in CUDA_GRAPH_MODES:
            # CUDA graphs reuse their output buffers; mark where one step's tensors stop being needed.
            torch.compiler.cudagraph_mark_step_begin()
        # Backward inside the attention choice too: checkpointing recomputes the forward there.
        with loop.attention(self.backend):
            with timer.phase("forward"), self.amp:
                noisy, t, target = self._noised(self.latents)
                noisy = noisy.contiguous(memory_format=self.memory_format)
                pred = self.model(**{self.arch.sample_arg: noisy, "timestep": t}, **self.cond).sample
                loss = F.mse_loss(pred.float(), target.float())
            with timer.phase("backward"):
                loss.backward()
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _baseline_step(self, timer):
        # Mirrors the example's loop body, line for line where it matters for speed.
        with timer.phase("encode"):
            latents = self.vae.encode(self.pixels).latent_dist.sample() * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
            noisy = self.scheduler.add_noise(latents, noise, t)
            text = self.text_encoder(self.input_ids, return_dict=False)[0]
        with loop.attention(self.backend):
            with timer.phase("forward"), self.amp:
                pred = self.model(noisy, t, text, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            if not loss.is_meta:
                loss.item()  # the example logs train_loss += avg_loss.item() every step
            with timer.phase("backward"):
                self.scaler.scale(loss).backward()
        with timer.phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
        return loss.detach()


def count_model_flops(bench) -> dict:
    """FLOPs of one step as its kernels do them (HFU's: recomputation included), and as the model
    needs them (MFU's: without the recompute of gradient checkpointing, counted with it switched
    off, see flops.no_recompute, nor the scores a fused attention backward recomputes)."""
    out = {"flops_dispatched": flops.count_dispatched_flops(bench.step)}
    by_op, with_recompute = flops.count_step_flops_by_op(bench.step, bench.model)
    if with_recompute:
        out["flops_note"] = "out of memory without checkpointing: flops_per_step includes recompute"
    out["flops_per_step"] = sum(by_op.values())
    out["flops_by_kind"] = kernels.by_kind(by_op)
    return out


def run(args, began: float = IMPORTED_AT) -> dict:
    """One configuration, measured. `began`: when its process started importing, or when the
    previous run of a --many process ended."""
    with inductor_config.patch(args.inductor):  # --inductor's options, for this run only
        return _run(args, began)


def _run(args, began: float) -> dict:
    # Where a run's wall time goes, for planning a device call (most of a short eager run is not
    # its timed steps): "startup" is the imports, or in a --many process the clean-up after the last run.
    seconds, clock = {}, began

    def lap(name):
        # One line per part as it ends: a run cut off at its time limit shows in its log how far it
        # got. Indented, so that gpu.sh's summary (the lines that start with a run's name) skips them.
        nonlocal clock
        now = time.perf_counter()
        seconds[name], clock = now - clock, now
        print(f"  {args.name}: {name} took {seconds[name]:.1f} s", flush=True)

    lap("startup")
    bench = Bench(args)
    device = bench.device
    lap("build")
    if args.warm_only:
        return warm(bench, seconds, lap)
    counted = count_model_flops(bench)  # eager, before compiling: FlopCounterMode does not see inside compiled code
    lap("flop_count")
    if device.type == "meta":  # shapes only: FLOPs are all there is to measure
        return {"name": args.name, "arch": args.arch, "res": args.res, "bs": args.bs, **counted}
    if args.compile:
        bench.compile()
    memory.reset_peak(device)
    cached_before = compile_cache_counts()

    # Per-step times: the timer syncs at each step's start and end (and at phase edges with --phases).
    timer = PhaseTimer(device, warmup=args.warmup)
    phase_timer = timer if args.phases else PhaseTimer(device, enabled=False)
    for _ in range(args.warmup):
        timer.step_begin()
        loss = bench.step(phase_timer)
        timer.step_end()
    lap("warmup_steps")  # compiling happens in the first warm-up steps; step_end synced
    for _ in range(args.steps):
        timer.step_begin()
        loss = bench.step(phase_timer)
        timer.step_end()
    lap("timed_steps")
    compile_cache = delta(compile_cache_counts(), cached_before) if args.compile else None
    summary = timer.summary()
    # Back to back with one sync at the end, as the training loop runs: the host queues the next
    # step while the GPU finishes this one. In PIPELINED_BLOCKS blocks of `steps` steps: the median
    # block is the number, the others show its spread.
    blocks = []
    for _ in range(PIPELINED_BLOCKS):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = bench.step()
        sync(device)
        blocks.append((time.perf_counter() - t0) * 1e3 / args.steps)
    lap("pipelined_steps")
    kernel_time = floor = None
    if args.kernels:  # after the timed steps: the profiler's overhead stays out of their times
        try:
            per_kernel, profiled_ms, copies = kernels.time_by_kernel(bench.step, min(args.steps, 3), device)
            kernel_time = kernels.breakdown(per_kernel, counted["flops_by_kind"], profiled_ms, copies=copies)
        except Exception as err:  # the breakdown is a diagnosis: the measured numbers above stand
            kernel_time = {"error": errors.describe(err)}
        lap("kernel_profile")

    peak_mem = memory.peak_memory(device)
    parts = memory.breakdown(bench.model, bench.optimizer)
    if args.kernels:  # after the peak is read: the floor's step runs eagerly, which can hold more
        floor = step_floor(bench, kernel_time)
        lap("floor")
    step_s = summary["step_median_ms"] / 1e3
    peak, peak_source = hardware.peak_tflops(device, DTYPES[args.precision])
    result = {
        "name": args.name, "arch": args.arch, "tiny": args.tiny, "res": args.res, "bs": args.bs,
        "precision": args.precision, "tf32": args.tf32, "baseline": args.baseline, "loop": args.loop,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "compile_scope": args.compile_scope if args.compile else None, "inductor": args.inductor,
        "checkpointing": args.checkpointing, "optimizer": args.optimizer, "rank": args.rank, "nf4": args.nf4,
        "lora_forward": "peft" if args.baseline else args.lora_forward, "autocast": args.precision != "fp32" and not args.no_autocast,
        "attention": args.attention, "channels_last": args.channels_last, "group_norm": args.group_norm,
        "upsample": args.upsample,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "steps": args.steps, "warmup": args.warmup,
        "step_ms": summary["step_median_ms"], "step_ms_mean": summary["step_mean_ms"],
        "step_ms_min": summary["step_min_ms"], "step_ms_max": summary["step_max_ms"],
        "step_ms_pipelined": statistics.median(blocks), "step_ms_pipelined_blocks": blocks,
        "images_per_second": args.bs / step_s,
        "phases": summary["phases"] if args.phases else None, "kernels": kernel_time, "floor": floor,
        "compile_cache": compile_cache,
        "graph_break_reasons": graph_break_reasons() if args.compile else None,
        **counted,
        "achieved_tflops": flops.achieved_tflops(counted["flops_per_step"], step_s),
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu": hardware.mfu(counted["flops_per_step"], step_s, peak),
        "hfu": hardware.mfu(counted["flops_dispatched"], step_s, peak),
        "peak_memory_bytes": peak_mem["peak_bytes"], "memory": peak_mem | parts,
        # Counted on a meta copy: NF4 packs two weights per stored element.
        "params": archs.n_params(archs.build(bench.arch, args.tiny)), "trainable_params": sum(p.numel() for p in bench.params),
        "final_loss": float(loss),
        "device": str(device), "device_name": hardware.device_name(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "seconds": seconds,
    }
    try:
        import diffusers
        import peft
        result["versions"] |= {"diffusers": diffusers.__version__, "peft": peft.__version__}
    except ImportError:
        pass
    return result


def step_floor(bench, kernel_time: dict) -> dict:
    """One eager step of the run counted op by op on its own device (roofline.step_floor, at the
    GEMM ceiling measured there); the kernel breakdown gets its GEMM-like kinds' time over their
    floor ("vs_floor")."""
    floor = roofline.step_floor(bench.step, device=bench.device, lora_params=bench.params,
                                ceiling_tflops=hardware.ceiling_tflops(bench.device, bench.dtype))
    if ratios := roofline.vs_floor(floor, kernel_time):
        kernel_time["vs_floor"] = ratios
    return floor


def warm(bench, seconds: dict, lap) -> dict:
    """--warm-only: compile and run the warm-up steps, so that inductor's on-disk caches (FX graph,
    AOTAutograd, Triton kernels) hold this configuration's compiled code. cuDNN's algorithm timing is
    left off: it changes no compiled code, and would time algorithms on a GPU the tests and other
    warm processes share, whose choices the timed run would not reuse anyway."""
    torch.backends.cudnn.benchmark = False
    if bench.args.compile:
        bench.compile()
    before = compile_cache_counts()
    for _ in range(bench.args.warmup):
        loss = bench.step()
    sync(bench.device)
    lap("warmup_steps")
    return {"name": bench.args.name, "warm_only": True, "final_loss": float(loss), "seconds": seconds,
            "compile_cache": delta(compile_cache_counts(), before), "graph_break_reasons": graph_break_reasons()}


def compile_cache_counts() -> dict[str, int]:
    """Hits and misses of inductor's on-disk caches so far in this process: whether a compile ran
    or was loaded (the compiled graph, and AOTAutograd's forward and backward)."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
            # A whole-model compile is one forward graph (and its backward); each break adds
            # graphs, and on an H100 a break at every LoRA layer cost 1.7x (docs/benchmarks.md).
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            # Graphs inductor compiled without CUDA graphs, though the mode asked for them (a CPU
            # tensor, a mutated input, ...): a -cudagraphs run with skips is not what its name says.
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def graph_break_reasons() -> list[str]:
    """The first line of each distinct reason Dynamo broke a graph for, most frequent first."""
    from torch._dynamo.utils import counters

    return [reason.splitlines()[0] for reason, _ in counters["graph_break"].most_common()]


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def report(args, result: dict) -> dict:
    if args.json:
        io.write_text(args.json, json.dumps(result, indent=1) + "\n")
    if "error" in result:
        print(f"{result['name']}: {result['error']}")
        return result
    if result.get("warm_only"):
        print(f"{result['name']}: warmed in {sum(result['seconds'].values()):.0f} s")
        return result
    if "step_ms" not in result:
        print(f"{result['name']}: {result['flops_per_step'] / 1e12:.4g} TFLOP/step "
              f"({result['flops_dispatched'] / 1e12:.4g} dispatched)")
        return result
    mem_gib = result["peak_memory_bytes"] / 2**30
    if result.get("kernels"):
        print(kernels.table(result["kernels"]))
    if result.get("floor"):
        print(roofline.floor_table(result["floor"], result.get("kernels")))
    cache = result.get("compile_cache")
    cached = f", compiled graphs from the cache {cache['fx_graph_hit']}/{cache['fx_graph_hit'] + cache['fx_graph_miss']}" if cache else ""
    if cache and cache.get("graph_breaks"):
        cached += f", graph breaks {cache['graph_breaks']} ({result['graph_break_reasons'][0]})"
    if cache and cache.get("cudagraph_skips"):
        cached += f", CUDA graphs skipped for {cache['cudagraph_skips']} graph(s)"
    print(f"{result['name']}: {result['step_ms']:.1f} ms/step (pipelined {result['step_ms_pipelined']:.1f}), "
          f"{result['flops_per_step'] / 1e12:.3g} TFLOP/step, MFU {result['mfu']:.1%}, peak {mem_gib:.2f} GiB{cached}")
    return result


class RunTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """RunTimeout once `seconds` have passed (checked between Python bytecodes, so a kernel or a
    sync in progress finishes first; the caller's `timeout` catches a true hang)."""
    def expire(signum, frame):
        # Again a second later: raised inside a finaliser or a callback, the exception is printed
        # and dropped, and a one-shot alarm would leave the run going (a 100,000-step test run did).
        signal.alarm(1)
        raise RunTimeout(f"timed out after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


NEED_S = 40  # the least time a --many run needs when its line does not say


def run_many(path, budget_s: float, start: float | None = None) -> list[dict]:
    """The runs listed in `path`, one per line ("LIMIT_S [NEED_S] ARGS...", shell-quoted), in this
    one process. `budget_s` counts from `start` (default: now).

    Each run's process start-up (imports, CUDA context) is paid once for all of them: for an eager
    run that is most of its wall time. A run that fails or runs past its limit gets a result that
    says so, one that needs more than is left of the budget is not started ("not run: needs N s,
    M s left"), and the next one starts from a clean slate.
    """
    start, results = time.perf_counter() if start is None else start, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        limit, *argv = shlex.split(line)
        need = float(argv.pop(0)) if argv and argv[0].isdigit() else NEED_S
        began = time.perf_counter()
        try:
            args = parse(argv)
        except SystemExit:  # argparse has printed why; the caller stubs the run
            results.append({"name": " ".join(argv), "error": "failed: bad arguments"})
            continue
        left = budget_s - (began - start)
        if left < need:
            error = f"not run: needs {need:.0f} s, {left:.0f} s left"
            results.append(report(args, {"name": args.name, "error": error}))
            continue
        try:
            with time_limit(int(min(float(limit), left))):
                result = run(args, began)
        except Exception as err:  # past its limit, out of memory, a kernel this device lacks: this run only
            result = {"name": args.name,
                      "error": str(err) if isinstance(err, RunTimeout) else f"failed: {errors.describe(err)}"}
            traceback.clear_frames(err.__traceback__)  # the frames hold the failed run's tensors
        results.append(report(args, result))
        # A clean slate: no compiled code or cached blocks of the last run (a --loop run resets
        # accelerate's state itself).
        torch._dynamo.reset()
        memory.reset_peak(args.device if args.device != "meta" else "cpu")
    return results


def main(argv=None):
    # diffusers warns on every .to(dtype) of a model built from a config; nothing to act on here.
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    program = argv is None  # python -m bench.train_step: its budget counts its imports too
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--many"]:
        many = argparse.ArgumentParser(prog="python -m bench.train_step --many")
        many.add_argument("--many", required=True, help="a file of runs, one per line: LIMIT_S [NEED_S] ARGS...")
        many.add_argument("--budget-s", type=float, default=float("inf"),
                          help="seconds from the process's start; a run that needs more than is left is not started")
        opts = many.parse_args(argv)
        return run_many(opts.many, opts.budget_s, IMPORTED_AT if program else None)
    args = parse(argv)
    return report(args, run(args))


if __name__ == "__main__":
    main()
