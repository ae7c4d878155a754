"""Pieces shared by the families: tiny-model seeding, the epsilon/v objective, LoRA files."""

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from sdtune import io, runtime
from sdtune.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
LORA_FILE = "pytorch_lora_weights.safetensors"
# `sdtune generate --scheduler` names -> diffusers classes that sample an epsilon or v model.
NOISE_SAMPLERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


@contextlib.contextmanager
def seeded(seed: int):
    """Build a random-initialised module deterministically without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cast(module, dtype):
    """`module.to(dtype)` for a model built from a config. diffusers' own `to` warns on every dtype
    cast that modules "should be kept in float32" even when it lists none (0.42 checks the list
    against None, not for emptiness); torch's `to` casts the same without the noise."""
    if getattr(module, "_keep_in_fp32_modules", None):  # a real list: let diffusers say so
        return module.to(dtype)
    return torch.nn.Module.to(module, dtype)


def tiny_quantized(module, dtype, quantization_config=None):
    """A tiny model in `dtype`; with a quantization config it goes through a folder so the
    quantizer applies exactly as it does to a real checkpoint."""
    if quantization_config is None:
        return cast(module, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        module.save_pretrained(tmp)
        return type(module).from_pretrained(tmp, dtype=dtype, quantization_config=quantization_config)


def from_hub(model, cls, subfolder=None, **kwargs):
    """`cls.from_pretrained` at the params' id and revision (a component's `subfolder`, or the
    whole pipeline without one); a failure is one clear line."""
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
        return cls.from_pretrained(model.id, revision=model.revision, **kwargs)
    except (OSError, ValueError) as err:
        raise hub_error(model, err) from None


def resolved_revision(model, skip: str | None = None) -> str:
    """What `model.revision` names right now, so that a moved branch ("main") or edited local
    weights change the cache's keys and the checkpoints' fingerprint. A Hub id: the commit the
    revision points to (online, or from the local Hub cache under HF_HUB_OFFLINE=1). A local folder:
    a hash of its files' names, sizes and modification times (hashing gigabytes of weights each run
    would take minutes), linked folders followed, the subfolder `skip` left out (the cache never
    loads the denoiser). The tiny models: their tokenizer's files (the weights are code)."""
    if model.id == "tiny":
        files = sorted((ASSETS / "clip-tokenizer").iterdir())
        return "tiny:" + io.sha256_json([[f.name, io.sha256_file(f)] for f in files])[:16]
    local = Path(model.id)
    if local.is_dir():
        files = [f for f in model_files(local) if f.relative_to(local).parts[0] != skip]
        return "local:" + io.sha256_json([[str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns]
                                          for f in files])
    from huggingface_hub import snapshot_download

    try:  # model_index.json only: the snapshot folder's name is the commit
        folder = snapshot_download(model.id, revision=model.revision, allow_patterns=["model_index.json"])
    except (OSError, ValueError) as err:  # ValueError: not a repo id at all (a path that is not there)
        raise hub_error(model, err) from None
    return Path(folder).name


def model_files(root: Path) -> list[Path]:
    """The files under `root`, linked folders followed (a vae/ that links elsewhere is that
    folder's weights), each real folder once: a link back up would otherwise be walked 2^40 times."""
    files, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        where = os.stat(folder)
        if (where.st_dev, where.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((where.st_dev, where.st_ino))
        dirs.sort()  # the order decides which path a folder linked twice is hashed under
        files += [Path(folder, name) for name in names if Path(folder, name).is_file()]
    return sorted(files)


def load_denoiser(model, cls, subfolder, tiny, dtype, quantization_config=None):
    """The denoiser alone: `tiny()` built from a config, or the hub checkpoint's `subfolder`;
    a quantization config (NF4 for QLoRA, torchao) applies as it loads."""
    if model.id == "tiny":
        return tiny_quantized(tiny(), dtype, quantization_config)
    return from_hub(model, cls, subfolder, dtype=dtype, quantization_config=quantization_config)


def load_tokenizer(model):
    """The first CLIP tokenizer: its 77 tokens are the caption limit where CLIP is the only text
    encoder (sd3 reads longer captions with T5)."""
    if model.id == "tiny":
        return clip_tokenizer()
    from transformers import AutoTokenizer

    # AutoTokenizer, not CLIPTokenizer: with transformers 5 the latter quietly builds an empty
    # tokenizer when the files are missing, instead of failing.
    return from_hub(model, AutoTokenizer, "tokenizer")


def prediction_type(model) -> str:
    """params' model.prediction_type for a scheduler built from scratch: "default" is epsilon."""
    return "epsilon" if model.prediction_type == "default" else model.prediction_type


def tiny_ddpm_scheduler(model):
    """The tiny models' training noise scheduler: DDPM with SD's (and SDXL's) betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1,
                         prediction_type=prediction_type(model))


def load_ddpm_scheduler(model):
    """The training scheduler of the epsilon/v families, with params' prediction type if set."""
    from diffusers import DDPMScheduler

    if model.id == "tiny":
        return tiny_ddpm_scheduler(model)
    # SDXL ships an Euler config; DDPM reads the same betas from it, as diffusers' training scripts do.
    return set_prediction_type(from_hub(model, DDPMScheduler, "scheduler"), model)


def set_prediction_type(scheduler, model):
    """params' model.prediction_type, when not "default", overrides the checkpoint's."""
    if model.prediction_type != "default":
        scheduler.register_to_config(prediction_type=model.prediction_type)
    return scheduler


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    folder = ASSETS / "clip-tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def tokenize(tokenizer, captions, device):
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def hub_error(model, err) -> UserError:
    # An id meant as a folder that is not there: the Hub's complaint about the id would mislead.
    if model.id.startswith(("/", ".", "~")) and not Path(model.id).exists():
        return UserError(f"model.id: no folder {model.id!r} (and a path is not a Hub id)")
    return UserError(f"model.id: could not load {model.id!r} at revision {model.revision!r}: "
                     f"{str(err).splitlines()[0]}")


def compute_dtype(device) -> torch.dtype:
    """What the frozen models compute in: bfloat16 on CUDA, float32 (the reference) elsewhere.
    Here, not in the shared plumbing, because it decides what the cache and evaluate stages write
    (their dvc.yaml deps include sdtune/families)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@torch.no_grad()
def encode_latents(vae, pixels):
    """The VAE's latents of `pixels` ([-1, 1], [B, 3, H, W]), unscaled. A VAE whose config says
    force_upcast (SDXL's overflows in float16; in bfloat16 each latent keeps 8 bits) encodes in
    float32, as diffusers' SDXL trainer keeps it, and is put back afterwards. Callers that encode
    batch after batch load it in float32 once instead (cache.load_encoders(for_encoding=True))."""
    loaded = vae.dtype
    upcast = getattr(vae.config, "force_upcast", False) and loaded != torch.float32
    if upcast:
        cast(vae, torch.float32)
    try:
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            cast(vae, loaded)


def model_dtype(denoiser) -> torch.dtype:
    """The dtype the frozen denoiser computes in (DDP's wrapper looked through). Training casts the
    latents and embeddings it feeds the denoiser to it: without autocast (train.autocast: false)
    its first layers would meet float32 inputs, and under autocast those layers cast them there
    anyway, to the same numbers. It is the first floating-point parameter's, as diffusers' `.dtype`
    says; that property first walks every submodule for layerwise-casting hooks, which sdtune never
    adds: 3 ms a call for SD1.5's UNet on a 2-core CPU, every training step."""
    model = getattr(denoiser, "module", denoiser)
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def quiet_dynamo_on_upsamplers() -> None:
    """diffusers' upsamplers ask an lru_cache'd is_torch_version(); Dynamo traces the function
    under the cache and warns, twice per traced graph. It only compares version strings."""
    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped "
                                              r"function at 'upsampling.py:", category=UserWarning)


def compile_denoiser(denoiser, blocks, mode: str = "default", options: dict | None = None) -> None:
    """torch.compile in place (the pipeline and the state-dict keys keep their modules): the whole
    denoiser, or each module whose class is named in `blocks` (a family's COMPILE_BLOCKS).
    `options`: torch._inductor.config options on top of the mode's (train.compile_options)."""
    quiet_dynamo_on_upsamplers()
    from torch._inductor import list_mode_options  # here: inductor is imported only to compile

    # AOTAutograd's on-disk cache passes over any graph that holds a custom autograd.Function, as
    # train.lora.addmm's LoRA layers do, unless told otherwise; every run then traced and split the
    # joint graph again (with the tiny model on a CPU, half of a compile whose kernels came from
    # inductor's cache). Dynamo traces the Function's forward and backward into the graph the
    # cache keys on, so a change to either is a miss.
    import torch._functorch.config

    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True

    # torch.compile takes a mode or options, not both: with options, the mode's own come first.
    how = {"options": {**list_mode_options(mode), **options}} if options else {"mode": mode}
    if not blocks:
        denoiser.compile(**how)
        return
    for module in denoiser.modules():  # through a DDP wrapper too: it holds the model as a child
        if type(module).__name__ in blocks:
            module.compile(**how)


# The train keys of flow matching (SD3.x): how timesteps are drawn and how the loss is weighted.
FLOW_MATCHING_KEYS = ("timestep_density", "logit_mean", "logit_std", "mode_scale", "loss_weighting")


def check_epsilon_train(train) -> None:
    """The epsilon/v families' check of the train section, run before anything loads or a
    checkpoint is removed: they would ignore the flow-matching keys, so one set is refused."""
    for key in FLOW_MATCHING_KEYS:
        default = type(train).model_fields[key].default
        if getattr(train, key) != default:
            raise UserError(f"train.{key}: is for flow-matching models (model.family: sd3); epsilon/v "
                            f"models would ignore it, so leave it at {default!r}")


def sample_timesteps(scheduler, batch_size, generator, device):
    """Drawn on the host from the step's generator (the same on every device), copied without a sync."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    return runtime.to_device(t, device)


def diffusion_loss(pred, latents, noise, timesteps, scheduler, train):
    """MSE against the scheduler's target (epsilon or v), optionally min-SNR-gamma weighted."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"model.prediction_type: {kind!r} is not trainable here; use epsilon or v_prediction")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if train.snr_gamma is not None:
        # Min-SNR-gamma (Hang et al. 2023): down-weight easy low-noise steps.
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas / (1 - alphas)
        capped = torch.clamp(snr, max=train.snr_gamma)
        if kind == "v_prediction":
            weight = capped / (snr + 1)
        else:  # min(snr, γ)/snr is 1 below γ, at a zero-terminal-SNR schedule's last step too (not 0/0)
            weight = torch.where(snr < train.snr_gamma, torch.ones_like(snr), capped / snr)
        loss = loss * weight
    return loss


def sample_noise(latents, generator, offset: float):
    """Noise like `latents`, in their dtype. The families noise float32 latents: latents cached in
    bf16 (cache.dtype) would make the noising bf16 too, where alphas_cumprod's rounding leaves
    timesteps 0 and 1 with no noise at all, and the loss's SNR weights belong to other levels."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        # Noise offset (Guttenberg 2023): lets the model learn very dark and very bright images.
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    return runtime.to_device(noise, latents.device).to(latents.dtype)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its JSON header in sorted key order.

    safetensors writes the metadata from a hash map, so its order (and the file's bytes) changes
    from process to process; sorted, the same tensors and metadata always give the same bytes.
    The data offsets count from the end of the header, so they stay valid.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def write_lora(directory, tensors: dict, metadata: dict, name: str = LORA_FILE) -> Path:
    """Write a LoRA safetensors file with string metadata, atomically and byte-reproducibly."""
    path = Path(directory) / name
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    io.write_bytes(path, canonical_safetensors(blob))
    return path


def save_lora(pipeline_cls, directory, metadata, **layers_and_adapter_metadata) -> Path:
    """diffusers keys via the pipeline's own LoRA writer, then our provenance merged into its
    metadata. The keyword names the denoiser: unet_lora_layers=... / transformer_lora_layers=..."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_cls.save_lora_weights(tmp, **layers_and_adapter_metadata)
        written = f"{tmp}/{LORA_FILE}"
        tensors = load_file(written)
        meta = io.read_safetensors_metadata(written) | metadata
    return write_lora(directory, tensors, meta)


def lora_path(path) -> Path:
    """The LoRA file given its folder or itself; a clear error when it is not there."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise UserError(f"{path}: no LoRA file here (expected {LORA_FILE}; run the train stage or dvc pull)")
    return path
