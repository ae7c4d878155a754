"""The latent and text-embedding cache, keyed by content.

Each item's key hashes everything its tensors depend on: the image bytes, the caption,
the model family, id and the commit its revision resolves to (for a local folder, its files
but the denoiser's), the resolution and crop, the dtype, and the code that encodes (sdtune's
and the libraries' versions). An item whose key is already on disk is reused; stale items
are deleted. So changing one caption re-encodes one item, and changing the resolution or the
encoding code re-encodes all of them, exactly.
"""

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdtune import io
from sdtune.data import images
from sdtune.families import common

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encoder_code(family) -> str:
    """A hash of the code that turns an image and a caption into an item: this module, the image
    reader, the family's module and its shared helpers, and the libraries that decode, resize,
    tokenize and encode (Pillow's Lanczos filter makes the pixels the VAE sees; transformers' fast
    tokenizers run in the `tokenizers` package, a version of its own).
    It is part of every key: DVC re-runs the cache stage when this code changes, and without it
    the re-run would keep every item the old code made."""
    files = [__file__, images.__file__, common.__file__, family.__file__]
    return io.sha256_code(files, ["torch", "pillow", "diffusers", "transformers", "tokenizers"])


def settings(model, cache) -> dict:
    """The params every item's key holds, by their params.yaml names. index.json records them, so
    the train stage can tell a cache built with others (a stage run by hand, not through dvc repro)."""
    return {"model.family": model.family, "model.id": model.id, "model.resolution": model.resolution,
            "cache.center_crop": cache.center_crop, "cache.dtype": cache.dtype, "cache.crop_step": cache.crop_step}


def item_key(row, model, cache, encode_dtype: torch.dtype, code: str, revision: str) -> str:
    """The item's content key. `encode_dtype` is what the encoders ran in (bf16 on CUDA, float32
    elsewhere): the same image encoded on another device gives other latents. `code` is
    encoder_code(family); `revision` is common.resolved_revision: the commit, not "main".
    model.prediction_type is left out: it changes the training target, not what the encoders make."""
    # settings() itself, so that the train stage's check of a cache's params covers the whole key.
    parts = settings(model, cache) | {"code": code, "image": row["sha256"], "caption": row["caption"],
                                      "revision": revision, "encode_dtype": str(encode_dtype)}
    return io.sha256_json(parts)


def prepare(path, resolution: int, center_crop: bool, bucket_step: int | None = None, *,
            max_pixels: int = images.MAX_PIXELS):
    """Resize to cover the target and crop it; pixels in [-1, 1].

    The target is a resolution² square, or with `bucket_step` the image's aspect-ratio bucket.
    `max_pixels` is data.max_pixels, the limit the image checks kept the image under.
    Returns the tensor and the original size and crop offset (SDXL conditions on both).
    """
    img = images.load_rgb(path, max_pixels)
    w, h = img.size
    tw, th = images.bucket_size(w, h, resolution, bucket_step) if bucket_step else (resolution, resolution)
    scale = max(tw / w, th / h)
    new = (max(tw, round(w * scale)), max(th, round(h * scale)))
    left = (new[0] - tw) // 2 if center_crop else 0
    top = (new[1] - th) // 2 if center_crop else 0
    # Resize only the crop's source box: resizing the whole image first would build an
    # intermediate of new[0] x new[1] pixels, 4 GB for an 8 x 30000 strip at 512.
    sx, sy = new[0] / w, new[1] / h
    box = (left / sx, top / sy, (left + tw) / sx, (top + th) / sy)
    img = img.resize((tw, th), Image.Resampling.LANCZOS, box=box)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(th, tw, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    meta = {"original_size": (h, w), "crop_top_left": (top, left)}
    return pixels, meta


def load_encoders(family, model, device, dtype=None, *, for_encoding=False):
    """The pipeline without its denoiser (for SD3.5 Large that alone is 16 GB): VAE, tokenizers
    and text encoders, in `dtype` (default: bf16 on CUDA and float32 elsewhere). for_encoding: a VAE
    that asks for float32 (force_upcast) is put in float32 for good, so that encoding batch after
    batch (common.encode_latents) casts nothing; a pipeline that decodes keeps it in `dtype`."""
    dtype = dtype or common.compute_dtype(device)
    pipe = family.load_pipeline(model, dtype, **{family.DENOISER_ATTR: None}).to(device)
    if for_encoding and getattr(pipe.vae.config, "force_upcast", False):
        common.cast(pipe.vae, torch.float32)
    return pipe


def encode(family, pipe, prepared, captions, dtype, device, out_device="cpu") -> list[dict]:
    """Encode same-size images (from `prepare`) and their captions: one dict of tensors on
    `out_device` per item (the host, to be saved; the GPU when a step uses them straight away).
    Only floating tensors take `dtype`; integer ones (SDXL's sizes and crops) stay exact."""
    pixels = torch.stack([pix for pix, _ in prepared]).to(device)
    tensors = family.encode_images(pipe, pixels, [meta for _, meta in prepared])
    tensors |= family.encode_prompts(pipe, captions)
    return [{name: t[j].detach().to(out_device, dtype if t.is_floating_point() else t.dtype).contiguous()
             for name, t in tensors.items()} for j in range(len(prepared))]


def build(rows, raw_dir, out_dir, family, model, cache, device="cpu", *, max_pixels: int = images.MAX_PIXELS) -> dict:
    """Bring `out_dir` up to date with `rows` (from captions.jsonl). Returns counts.
    `max_pixels` (data.max_pixels) only bounds reading the images: it is not part of the keys."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    items = out_dir / "items"
    items.mkdir(parents=True, exist_ok=True)
    # The denoiser's folder is left out of a local model's revision: the cache never loads it.
    code, revision = encoder_code(family), common.resolved_revision(model, skip=family.DENOISER_ATTR)
    encode_dtype = common.compute_dtype(device)
    keys = [item_key(r, model, cache, encode_dtype, code, revision) for r in rows]
    todo = [(r, k) for r, k in zip(rows, keys) if not (items / f"{k}.safetensors").exists()]
    dtype = DTYPES[cache.dtype]

    if todo:
        pipe = load_encoders(family, model, device, encode_dtype, for_encoding=True)
        # One image at a time: a batched kernel rounds with the batch's size and company, and an
        # item must not depend on which images were encoded beside it, or an item rebuilt alone
        # (one caption changed) would differ from a fresh build's, and so would the LoRA.
        for row, key in tqdm(todo, desc="cache", unit="image"):
            prepared = prepare(raw_dir / row["file"], model.resolution, cache.center_crop, cache.crop_step,
                               max_pixels=max_pixels)
            (one,) = encode(family, pipe, [prepared], [row["caption"]], dtype, device)
            with io.atomic_path(items / f"{key}.safetensors") as tmp:
                save_file(one, str(tmp))  # no file name in it: a renamed image keeps its item's bytes
        del pipe

    wanted = {f"{k}.safetensors" for k in keys}
    stale = [p for p in items.iterdir() if p.name not in wanted]
    for p in stale:
        p.unlink()
    index = [{"file": r["file"], "caption": r["caption"], "key": k} for r, k in zip(rows, keys)]
    io.write_json(out_dir / "index.json", {"code": code, "model": model.id, "revision": model.revision,
                                           "resolved_revision": revision, "settings": settings(model, cache),
                                           "items": index})
    return {"items": len(rows), "encoded": len(todo), "reused": len(rows) - len(todo), "removed": len(stale)}


def load(out_dir, device="cpu") -> list[dict]:
    """All cached items, in index order, as dicts of tensors."""
    out_dir = Path(out_dir)
    index = io.read_json(out_dir / "index.json", required=("items",))
    return [load_file(str(out_dir / "items" / f"{it['key']}.safetensors"), device=device)
            for it in index["items"]]
