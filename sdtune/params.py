"""Typed params: one model per params.yaml section.

Unknown keys, wrong types and impossible values stop the stage with one line naming the
key and what is allowed. Every field has a default so a params.yaml only says what differs.
"""

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML, YAMLError

from sdtune import io
from sdtune.errors import UserError

FAMILIES = ("sd1", "sd2", "sdxl", "sd3")
DENSITIES = ("logit_normal", "uniform", "mode")     # SD3.x: how training timesteps are drawn
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")      # SD3.x: how the flow-matching loss is weighted
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
CELL_NAME = re.compile(r"[A-Za-z0-9._+-]+")  # a profile cell's name, also part of file names
MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 x MAX_IMAGE_PIXELS); the images' default too


class Section(BaseModel):
    # strict: "16" is not an int and "yes" is not a bool; forbid: a typo'd key is an error;
    # no .inf or .nan: no param means "unbounded" that way, and reports must stay valid JSON.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# A seed torch's and numpy's seeders accept.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def repeated(values: list) -> list:
    """The values listed more than once, each once, in the order they first come."""
    return list(dict.fromkeys(v for v in values if values.count(v) > 1))


def _once_each(values: list) -> list:
    if twice := repeated(values):
        raise ValueError(f"{', '.join(map(str, twice))} listed more than once; list each once")
    return values


# Seeds of images compared as a set (FID, KID): a repeated seed is a repeated image.
Seeds = Annotated[list[Seed], Field(min_length=1), AfterValidator(_once_each)]


class Base(Section):
    seed: Seed = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Data(Section):
    source: str = "gdrive://1capT9kF-zCu2OiNVzm7VG5DQDaAQLl1Q"
    sha256: str | None = None  # pin of the downloaded file (archive or single image)
    max_archive_bytes: int = Field(20 * 10**9, gt=0)
    max_archive_files: int = Field(100_000, gt=0)
    max_pixels: int = Field(MAX_PIXELS, gt=0)  # every image read (checks, captions, cache) obeys it
    too_small: Literal["skip", "upscale"] = "upscale"
    retries: int = Field(4, ge=0)


class Caption(Section):
    model: str = "Salesforce/blip-image-captioning-base"  # "tiny" = random-initialised, offline
    revision: str = "main"
    template: str = "a painting by sargent, {caption}"
    fixed: str | None = None  # one caption for every image (the template still applies)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(30, gt=0)

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v):
        if "{caption}" not in v:
            raise ValueError("must contain {caption}")
        return v


class Model(Section):
    family: Literal[FAMILIES] = "sd1"
    id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # "tiny" = random-initialised, offline
    revision: str = "main"
    resolution: int = Field(512, gt=0, multiple_of=8)
    prediction_type: Literal["default", "epsilon", "v_prediction"] = "default"


class Cache(Section):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    center_crop: bool = True
    buckets: bool = False  # aspect-ratio buckets instead of square crops
    bucket_step: int = Field(64, gt=0, multiple_of=8)  # bucket sides are multiples of this (pixels)

    @property
    def crop_step(self) -> int | None:
        """What cache.prepare crops to: bucket_step with buckets on, None for resolution² squares."""
        return self.bucket_step if self.buckets else None


class Lora(Section):
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)  # None: the family's default
    init: Literal["gaussian", "default", "pissa", "olora"] = "gaussian"
    use_dora: bool = False
    # Each plain LoRA Linear layer adds its product inside a GEMM (sdtune.train.lora.AddmmLora)
    # instead of peft's separate scale and add kernels. false: peft's own forward.
    addmm: bool = True


# Train keys of the loop around the step: they change what is logged, kept or drawn along the
# way, never a step nor the LoRA's weights. A profile cell may not set them, the profile stage
# does not depend on them, and a LoRA's params_sha256 leaves them out (a rerun for one of them
# resumes to the same tensors and writes the same file). A checkpoint is resumed across the
# logging ones, not the validation ones: a resumed run keeps the images of the steps before it.
LOGGING = ("log_every", "checkpoint_every", "keep_checkpoints", "wandb", "wandb_project")
ALONG_THE_WAY = LOGGING + ("validate_every", "validation_prompts", "validation_seeds", "validation_steps")


class Train(Section):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping (the norm is still measured)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    # With bf16/fp16, false (the default): the frozen base runs in its own dtype throughout, as
    # diffusers' pipelines run it (the norms accumulate in float32 inside their kernels); only LoRA's
    # float32 weights are cast, for the matmuls (the layers on peft's forward, a 4-bit base, DoRA or
    # dropout, under an autocast of their own). true: the forward under torch.autocast, which on CUDA
    # runs every norm and upsampling in float32, between a cast of its input up and of its output
    # down. On an H100 (SD1.5 bs16, eager) true took 8% longer a step and 4.3 GiB (30%) more memory;
    # compiled, the two are the same (docs/benchmarks.md).
    autocast: bool = False
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "math"] = "sdpa"  # math: the unfused reference kernel, for comparison
    channels_last: bool = False  # NHWC memory layout for the UNet's convolutions
    # per-channel: the UNet's group norms take their statistics channel by channel, then per group
    # (sdtune/train/norms.py), which channels-last memory reads in whole rows where torch's reads it in
    # strided pieces; for compiled channels-last runs (SD1.5 bs16 on an H100, with CUDA graphs: 107.0 ->
    # 100.5 ms a step back to back). sd3's transformer has no group norms to change.
    group_norm: Literal["native", "per-channel"] = "native"
    # broadcast: the UNet's ×2 nearest upsamplers repeat each pixel by a broadcast, whose compiled
    # backward is a 2×2 sum where F.interpolate's is an atomic scatter into an NCHW float32 buffer
    # (sdtune/train/upsample.py); for compiled channels-last runs, not yet timed on a GPU.
    upsample: Literal["native", "broadcast"] = "native"
    compile: bool = False  # torch.compile the denoiser (minutes of compile time, then faster steps)
    # reduce-overhead adds CUDA graphs: for small batches, where launching kernels costs more than
    # running them (SD1.5 bs1 on an H200: 107 ms eager, 25 ms compiled with CUDA graphs), and still
    # 10% at SD1.5 bs16 on an H100 (125 -> 112.5 ms a step compiled).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # torch._inductor.config options on top of the mode's, e.g. {cpp_wrapper: true}: on a CPU the C++
    # wrapper made the tiny SD1.5 step 15-30% faster, for about 3x the cold compile time.
    compile_options: dict[str, bool | int | float | str] = {}
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    checkpoint_every: int = Field(250, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    lora: Lora = Lora()
    wandb: Literal["disabled", "offline", "online"] = "offline"
    wandb_project: str = "sdtune"
    deterministic: bool = False
    qlora: bool = False  # the frozen denoiser in 4-bit NF4 (bitsandbytes, CUDA only)
    # Validation images every N steps (None: never), same prompts and seeds each time.
    validate_every: int | None = Field(None, gt=0)
    validation_prompts: list[str] = Field(["a painting by sargent, a portrait of a woman in a white dress"],
                                          min_length=1)
    validation_seeds: Seeds = [0, 1]
    validation_steps: int = Field(25, gt=0)
    # Flow-matching families (SD3.x): how timesteps are drawn and how the loss is weighted.
    timestep_density: Literal[DENSITIES] = "logit_normal"
    # As diffusers' SD3 trainer reads it, over a table that runs from sigma 1 down: above 0 draws
    # cleaner steps (with SD3.5's shift 3, mean sigma 0.52 at 1, 0.86 at -1), the opposite sign of
    # the SD3 paper's m.
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = Field(1.29, ge=-1.0, le=1.75)
    # none: the velocity loss; sigma_sqrt/cosmap: diffusers' weightings of the loss on the implied image
    # (its SD3 trainer also draws timesteps uniformly with them: set timestep_density: uniform to match)
    loss_weighting: Literal[WEIGHTINGS] = "none"

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, steps, info):
        # diffusers' "constant" schedule ignores warmup; say so rather than train without it.
        if steps and info.data.get("lr_scheduler") == "constant":
            raise ValueError(f"{steps} warmup steps need lr_scheduler: constant_with_warmup (constant has none)")
        if "steps" in info.data and steps >= info.data["steps"] > 0:  # the run would end still warming up
            raise ValueError(f"{steps} warmup steps leave none of train.steps ({info.data['steps']}) at train.lr; "
                             f"use fewer")
        return steps

    @field_validator("optimizer")
    @classmethod
    def _prodigy_lr(cls, name, info):
        # Prodigy estimates the step size itself; lr scales that estimate and is meant to be ~1.
        if name == "prodigy" and info.data.get("lr", 1.0) < 0.1:
            raise ValueError(f"prodigy sets its own step size and expects lr around 1.0 "
                             f"(got {info.data['lr']}); set train.lr: 1.0")
        return name

    @field_validator("compile_mode")
    @classmethod
    def _compile_mode(cls, mode, info):
        # compile and grad_accum come earlier in the section, so they are validated by now.
        if mode != "default" and not info.data.get("compile"):
            raise ValueError(f"{mode!r} needs compile: true")
        if mode in CUDA_GRAPH_MODES and info.data.get("grad_accum", 1) > 1:
            # A CUDA graph owns the gradient buffers it writes; the next micro-batch's replay
            # overwrites the gradient being accumulated (pytorch/pytorch#169545).
            raise ValueError(f"{mode!r} uses CUDA graphs, which cannot accumulate gradients; "
                             f"set grad_accum: 1 or compile_mode: default")
        return mode

    @field_validator("compile_options")
    @classmethod
    def _compile_options(cls, options, info):
        if options and not info.data.get("compile"):
            raise ValueError(f"{options} needs compile: true")
        if "triton.cudagraphs" in options:  # the loop prepares CUDA graphs' buffers by the mode alone
            raise ValueError("'triton.cudagraphs': set compile_mode: reduce-overhead instead")
        check_inductor_options(options)
        return options


def check_inductor_options(options: dict) -> None:
    """A ValueError naming the first option that torch._inductor.config lacks or that has a value
    of another type than the option's (torch.compile's own check prints every option it knows)."""
    if not options:
        return
    from torch._inductor import config  # only here: it imports torch, which most params never need

    known = config.get_config_copy()
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"{key!r}: torch._inductor.config has no such option")
        kind = config.get_type(key)
        if not isinstance(kind, type):  # Optional[...] and other generic types: left to torch.compile
            continue
        # isinstance(True, int) holds, but True is no thread count; an int is a float's value though.
        fits = isinstance(value, kind) and isinstance(value, bool) == (kind is bool)
        if not (fits or (kind is float and type(value) is int)):
            raise ValueError(f"{key!r}: expected a value of type {kind.__name__}, as the option is now {known[key]!r} "
                             f"(got {value!r})")


class Quantize(Section):
    variants: Annotated[list[Literal["bf16", "fp16", "int8wo", "int8dq", "float8wo", "nf4", "int8"]],
                        AfterValidator(_once_each)] = ["bf16", "int8wo"]
    # fused: LoRA merged into the weights before quantizing; adapter: LoRA kept on top at run time.
    # At least one: none would make no variant of any method, and remove those made before.
    lora_modes: Annotated[list[Literal["fused", "adapter"]], Field(min_length=1),
                          AfterValidator(_once_each)] = ["fused"]


class Evaluate(Section):
    prompts: str = "prompts/eval.txt"
    seeds: Seeds = [0, 1]
    steps: int = Field(30, gt=0)
    # None: the pipeline's own default, as the validation images use (SD 1.x/2.x 7.5, SDXL 5.0,
    # SD3 7.0); one number for every family drew SDXL and SD3.5 at SD 1.5's scale.
    guidance_scale: float | None = Field(None, ge=0)
    clip_model: str = "openai/clip-vit-base-patch16"  # "tiny" = random-initialised, offline
    clip_revision: str = "main"
    # clip: FID/KID in CLIP image-embedding space (no extra download); inception: the classic
    # FID, needs torch-fidelity's InceptionV3 weights (pip install torch-fidelity).
    fid_extractor: Literal["clip", "inception"] = "clip"
    latency_repeats: int = Field(3, gt=0)
    lora_scale: float = Field(1.0, ge=0)


class Profile(Section):
    steps: int = Field(6, gt=1)   # measured steps per matrix cell
    warmup: int = Field(2, ge=0)  # steps run first and not measured (allocation, autotuning)
    machine_type: str = "g2-standard-8"
    usd_per_hour: float | None = Field(None, gt=0)  # None: the price table's on-demand price
    # The optimization matrix: each cell is a name plus the train keys it changes, and optionally
    # latents: on_the_fly (read, resize and encode the images every step instead of reading the cache).
    matrix: list[dict] = [{"name": "baseline"}]
    # Generation cells: a name plus dtype, attention, channels_last, compile, lora or variant (InferenceCell).
    inference: list[dict] = [{"name": "fp32"}]
    trace: bool = True

    @field_validator("matrix", "inference")
    @classmethod
    def _named(cls, cells):
        if not cells:
            raise ValueError("list at least one cell")
        names = [c.get("name") for c in cells]
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("each cell needs a non-empty 'name'")
        for n in names:  # names become file names (traces, snapshots) and chart labels
            if not CELL_NAME.fullmatch(n):
                raise ValueError(f"cell name {n!r}: use letters, digits, '.', '_', '+' and '-' only")
        if twice := repeated(names):
            raise ValueError(f"cell name {twice[0]!r} is used more than once; names must be unique")
        return cells


class Params(Section):
    base: Base = Base()
    data: Data = Data()
    caption: Caption = Caption()
    model: Model = Model()
    cache: Cache = Cache()
    train: Train = Train()
    quantize: Quantize = Quantize()
    evaluate: Evaluate = Evaluate()
    profile: Profile = Profile()


def _one_line(err: ValidationError, model: type[BaseModel], where: str, source: str) -> str:
    first = err.errors()[0]
    key = ".".join([where] * bool(where) + [str(p) for p in first["loc"]])
    if first["type"] == "extra_forbidden":
        for part in first["loc"][:-1]:
            model = model.model_fields[part].annotation
        allowed = ", ".join(model.model_fields)
        return f"{source}: unknown key '{key}'; allowed here: {allowed}"
    msg = first["msg"]
    if first["type"] == "value_error":  # our own validators: their text, without pydantic's prefix
        msg = str(first["ctx"]["error"])
    elif first["type"] == "model_type":  # pydantic's "a valid dictionary or instance of Train"
        msg = "expected a mapping of its keys (indented `key: value` lines), or leave the section out"
    value = first.get("input")
    nested = isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, dict) for v in value)
    got = f" (got {value!r})" if not nested else ""  # not a whole section or list of cells again
    return f"{source}: {key}: {msg}{got}"


def validate(model: type[BaseModel], raw: dict, where: str = "", source: str = "params.yaml"):
    """`model` from `raw`, or a one-line UserError naming `where`.key (e.g. profile.matrix.bf16.lr)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise UserError(_one_line(err, model, where, source)) from None


def parse(raw: dict, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level")
    params = validate(Params, raw, source=source)
    # The profile's cells are a train section and a generation setting each: checked here too, so
    # a typo in one stops `dvc repro` at its first stage, not hours later at the profile stage.
    for cell in params.profile.matrix:
        cell_params(params, cell, source)
    for cell in params.profile.inference:
        inference_cell(cell, source)
    return params


def load(path="params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found (run from the repository root)")
    if not path.is_file():
        raise UserError(f"{path}: a folder, not a params file (a YAML file like params.yaml)")
    try:
        raw = YAML(typ="safe", pure=True).load(io.read_text(path))
    except YAMLError as err:
        raise UserError(f"{path}: not valid YAML{_yaml_where(err)}") from None
    return parse(raw, str(path))


def _yaml_where(err: YAMLError) -> str:
    """Where the parser stopped and what it found there ("line 3, column 3: found duplicate key
    ..."), not its first line, which for most errors is only the context ("while parsing ...")."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return f": {str(err).splitlines()[0]}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


# ---- the profile's cells ----

# A profile.matrix cell's keys that are not train keys: its name, and where each step's latents and
# text embeddings come from: the cache (what `dvc repro` trains with) or encoded again every step.
CELL_KEYS = ("name", "latents")
LATENTS = ("cached", "on_the_fly")


def cell_train_keys(cell: dict) -> dict:
    """The train keys a profile.matrix cell changes."""
    return {k: v for k, v in cell.items() if k not in CELL_KEYS}


def cell_latents(cell: dict) -> str:
    return cell.get("latents", "cached")


def cell_params(params: Params, cell: dict, source: str = "params.yaml") -> Params:
    """params with a matrix cell's train keys applied, validated like the train section itself."""
    name = cell["name"]
    overrides = cell_train_keys(cell)
    # A cell times the step alone: one changing a key of the loop around it would measure the
    # baseline under another name.
    if ignored := [k for k in ALONG_THE_WAY if k in overrides]:
        raise UserError(f"{source}: profile.matrix.{name}.{ignored[0]}: a cell times the training step alone, "
                        f"which {ignored[0]} does not change; remove it")
    if cell_latents(cell) not in LATENTS:
        raise UserError(f"{source}: profile.matrix.{name}.latents: expected one of {', '.join(LATENTS)} "
                        f"(got {cell['latents']!r})")
    train = validate(Train, _merged(params.train.model_dump(), overrides), where=f"profile.matrix.{name}",
                     source=source)
    return params.model_copy(update={"train": train})


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key, nested sections included: a cell's
    `lora: {rank: 64}` changes the rank and keeps train.lora's alpha, DoRA and target modules."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


class InferenceCell(Section):
    """A profile.inference cell: how the evaluate stage's sampling is set up (profiling/inference.py)."""
    name: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["sdpa", "math"] = "sdpa"
    channels_last: bool = False
    compile: bool = False
    lora: bool = True
    variant: str | None = None  # a quantized denoiser the quantize stage saved, e.g. nf4-fused


def inference_cell(raw: dict, source: str = "params.yaml") -> InferenceCell:
    where = f"profile.inference.{raw.get('name', '?')}"
    cell = validate(InferenceCell, raw, where=where, source=source)
    clash = sorted({"dtype", "lora"} & raw.keys())
    if cell.variant is not None and clash:
        raise UserError(f"{source}: {where}: a variant brings its own dtype and LoRA; drop {', '.join(clash)}")
    return cell
