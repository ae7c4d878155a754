"""Quantized variants of the fine-tuned denoiser, through diffusers' quantization configs.

A variant is a method (bf16, int8 weight-only, NF4, ...) applied with the LoRA either
fused into the weights first or kept as an adapter loaded on top at run time. Each is
saved with save_pretrained (safetensors, with its quantization config) and reloads with
from_pretrained without quantizing again.
"""

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune import families, io
from sdtune.errors import UserError
from sdtune.families import common
from sdtune.profiling import memory

LORA_DIR = Path("models/lora")         # the train stage's LoRA
QUANT_DIR = Path("models/quantized")   # the quantize stage's variants, one folder each
BASE_FILE = "sdtune_base.json"         # in each variant's folder: the model it was made from


@dataclass(frozen=True)
class Method:
    dtype: torch.dtype
    config: object = None  # a callable returning the diffusers quantization config, or None
    needs: str = ""        # "cuda" or "fp8" (compute capability >= 8.9); empty: runs anywhere


def _torchao(name):
    def make():
        from diffusers import TorchAoConfig
        import torchao.quantization as tq

        return TorchAoConfig(getattr(tq, name)())
    return make


def _bnb(**kwargs):
    def make():
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(**kwargs)
    return make


METHODS = {
    "bf16": Method(torch.bfloat16),
    "fp16": Method(torch.float16),
    "int8wo": Method(torch.bfloat16, _torchao("Int8WeightOnlyConfig")),
    "int8dq": Method(torch.bfloat16, _torchao("Int8DynamicActivationInt8WeightConfig")),
    "float8wo": Method(torch.bfloat16, _torchao("Float8WeightOnlyConfig"), needs="fp8"),
    "nf4": Method(torch.bfloat16, _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16), needs="cuda"),
    "int8": Method(torch.float16, _bnb(load_in_8bit=True), needs="cuda"),
}


def variant_name(method: str, mode: str) -> str:
    """A variant's name, and its folder in QUANT_DIR: method-mode, e.g. int8wo-fused."""
    return f"{method}-{mode}"


def variant_parts(name: str) -> tuple[str, str]:
    """(method, mode) of a variant name."""
    method, _, mode = name.partition("-")
    return method, mode


def saved_variants() -> list[str]:
    """The variants the quantize stage saved: the folders in QUANT_DIR."""
    return sorted(p.name for p in QUANT_DIR.iterdir() if p.is_dir()) if QUANT_DIR.is_dir() else []


def pipeline_kwargs(name: str, lora_dir=None) -> dict:
    """pipelines.load() arguments for the variant QUANT_DIR/<name>: its method, and the LoRA to
    load on top: `lora_dir`, or LORA_DIR by default when the variant kept its LoRA as an adapter."""
    method, mode = variant_parts(name)
    if lora_dir is None and mode == "adapter":
        lora_dir = LORA_DIR
    return {"variant_dir": QUANT_DIR / name, "method": method, "lora_dir": lora_dir}


def check_method(variant: str, where: str, fix: str = "") -> None:
    """A saved variant's method, from its folder's name, must be one this sdtune knows (the folder
    may have been made by hand) and this machine runs (nf4 needs CUDA). `where` starts the error (a
    flag, a params key, a report), `fix` ends it."""
    method, _ = variant_parts(variant)
    if method not in METHODS:
        raise UserError(f"{where}: {variant!r} does not start with a known method ({', '.join(METHODS)}){fix}")
    check_supported(method)


def check_supported(name: str) -> None:
    need = METHODS[name].needs
    if need and not torch.cuda.is_available():
        raise UserError(f"quantize.variants: {name!r} needs a CUDA GPU (bitsandbytes/float8 kernels); "
                        f"none is available here, so drop it from quantize.variants or run on the GPU VM")
    if need == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise UserError(f"quantize.variants: {name!r} needs compute capability >= 8.9 (L4, H100); "
                        f"this GPU has {torch.cuda.get_device_capability()}")


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers really occupy: see memory.bytes_of."""
    return memory.bytes_of([*module.parameters(), *module.buffers()])


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def parent(family, model, lora_dir, fuse: bool, lora_scale: float = 1.0):
    """The float32 denoiser a variant is made from: base, with the LoRA fused in at `lora_scale`
    when asked (evaluate.lora_scale, the strength the adapter variants are run at)."""
    denoiser = family.load_denoiser(model, dtype=torch.float32)
    if fuse:
        # The folder and the file's name, as generate.add_lora loads it: given the file's path alone,
        # diffusers skips the file's adapter metadata, so alpha/rank is lost and the LoRA is fused
        # at scaling 1 (wrong whenever train.lora.alpha differs from the rank).
        path = common.lora_path(lora_dir)
        denoiser.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=family.DENOISER_ATTR)
        denoiser.fuse_lora(lora_scale=lora_scale)
        denoiser.unload_lora()
    return denoiser


def make_variant(family, model, lora_dir, name: str, mode: str, out_dir, lora_scale: float = 1.0) -> dict:
    """Quantize, save to `out_dir`, reload from disk, and measure. Returns a report row."""
    check_supported(name)
    method = METHODS[name]
    with tempfile.TemporaryDirectory() as tmp:
        src = parent(family, model, lora_dir, fuse=(mode == "fused"), lora_scale=lora_scale)
        src.save_pretrained(tmp, safe_serialization=True)
        del src
        t0 = time.perf_counter()
        q = family.DENOISER.from_pretrained(tmp, dtype=method.dtype,
                                quantization_config=method.config() if method.config else None)
        quantize_s = time.perf_counter() - t0
        q.save_pretrained(out_dir, safe_serialization=True)
        del q
    t0 = time.perf_counter()
    reloaded = load_variant(family, out_dir, name)
    load_s = time.perf_counter() - t0
    row = {"variant": variant_name(name, mode), "method": name, "lora": mode, "dtype": str(method.dtype).split(".")[-1],
           "disk_bytes": folder_bytes(out_dir), "memory_bytes": tensor_bytes(reloaded),
           "quantize_seconds": quantize_s, "load_seconds": load_s}
    # after disk_bytes: the weights' bytes alone. A fused variant also names the LoRA it holds.
    fused = {"lora_sha256": io.sha256_file(common.lora_path(lora_dir))} if mode == "fused" else {}
    io.write_json(Path(out_dir) / BASE_FILE, base_of(model) | fused)
    return row


def base_of(model) -> dict:
    return {"family": model.family, "id": model.id, "revision": model.revision}


def _same_id(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _said(base: dict) -> str:
    return f"{base['family']} {base['id']!r} (revision {base['revision']})"


def check_base(variant_dir, model) -> None:
    """A variant's denoiser fits only the pipeline of the model it was made from: with another
    (sdtune generate --family or --model-id) it failed deep in diffusers, or drew nonsense."""
    saved = Path(variant_dir) / BASE_FILE
    if not saved.is_file():  # made before variants recorded their base
        return
    made, now = io.read_json(saved), base_of(model)
    # The same model however it is spelled: sd1 and sd2 are one family module, a folder may be
    # named relatively or not; the revision is not compared (--model-id resets it to main).
    if families.get(made["family"]) is not families.get(now["family"]) or not _same_id(made["id"], now["id"]):
        raise UserError(f"{variant_dir}: made from {_said(made)}; this run's model is {_said(now)}: "
                        f"sample it with that model, or run the quantize stage again")
    lora = LORA_DIR / common.LORA_FILE
    if made.get("lora_sha256") and lora.is_file() and io.sha256_file(lora) != made["lora_sha256"]:
        # Not an error: the variant is still a model; but not the LoRA trained since.
        print(f"{variant_dir}: warning: it holds another LoRA than {lora} (trained since the quantize stage "
              f"ran); run `dvc repro quantize` to make it again", file=sys.stderr)


def load_variant(family, path, name: str):
    """Reload a saved variant: its quantization config comes from its own config.json."""
    try:
        return family.DENOISER.from_pretrained(str(path), dtype=METHODS[name].dtype)
    except (OSError, ValueError) as err:  # a folder copied in part, or emptied
        raise UserError(f"{path}: not a complete {name} variant ({str(err).strip().splitlines()[0]}); "
                        f"run the quantize stage again or dvc pull it") from None
    except RuntimeError as err:  # its quantizer cannot run here (bitsandbytes: "No GPU found"), or bad weights
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: cannot load this {name} variant ({reason}); load it where its method runs "
                        f"(quantize.variants), or run the quantize stage again") from None
