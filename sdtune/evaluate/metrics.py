"""Image metrics for the evaluate stage: CLIP score, FID/KID, style similarity, fidelity, time, memory.

Images come in as a uint8 N×3×H×W tensor or a list of 3×H×W uint8 tensors / PIL images; `as_images`
turns any of these into a list of 3×H×W uint8 tensors at the boundary. A list, because real
images differ in size: the CLIP processor (or Inception's own resize) brings each to the model's size.

`clip` arguments are the (model, processor) pair from `sdtune.evaluate.clip.load_clip`.
"""

import statistics
import time
import warnings
from itertools import groupby

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore

from sdtune.errors import UserError
from sdtune.families import common
from sdtune.profiling import phases

PSNR_CAP_DB = 100.0  # identical images give inf dB, which JSON cannot hold; 100 dB means "identical"
KID_SUBSET_MAX = 50
BATCH = 32


def as_images(images) -> list[Tensor]:
    """A uint8 N×3×H×W tensor, or a list of 3×H×W uint8 tensors / PIL images -> list of 3×H×W uint8."""
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images as N×3×H×W, got shape {tuple(images.shape)}")
        images = list(images)
    out = []
    for img in images:
        if isinstance(img, Image.Image):
            img = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected uint8 3×H×W images, got {img.dtype} {tuple(img.shape)}")
        out.append(img)
    return out


def _batches(images: list[Tensor], size: int = BATCH):
    """Stack runs of same-sized images into N×3×H×W batches of at most `size`."""
    for _, run in groupby(images, key=lambda t: t.shape):
        run = list(run)
        for i in range(0, len(run), size):
            yield torch.stack(run[i : i + size])


def _pooled(out) -> Tensor:
    # transformers 5 returns a ModelOutput from get_*_features (the projection in pooler_output);
    # older versions return the tensor itself.
    return out if isinstance(out, Tensor) else out.pooler_output


def _pixels(images: list[Tensor], clip) -> Tensor:
    model, processor = clip
    pixels = processor(images=[i.cpu() for i in images], return_tensors="pt")["pixel_values"]
    return pixels.to(model.device, model.dtype)


@torch.no_grad()
def image_embeddings(images, clip) -> Tensor:
    """CLIP image embeddings (N×D float32, not normalised)."""
    model, _ = clip
    chunks = [_pooled(model.get_image_features(_pixels(list(b), clip))) for b in _batches(as_images(images))]
    return torch.cat(chunks).float()


class _TensorFeatures(nn.Module):
    """Wraps a CLIPModel so torchmetrics' CLIPScore gets tensors from get_*_features.

    torchmetrics 1.9 calls `.norm()` on what these return, which breaks on transformers 5's
    ModelOutput (Lightning-AI/torchmetrics#3407, fixed after 1.9.0).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, pixel_values):
        return _pooled(self.model.get_image_features(pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return _pooled(self.model.get_text_features(input_ids, attention_mask))


class _TruncatingProcessor:
    """The CLIP processor, cutting text to the model's length with its end-of-text token kept.

    torchmetrics cuts a longer prompt's input_ids at that length itself, which drops the end token
    CLIP pools the text at: the prompt would be scored by another token's features.
    """

    def __init__(self, processor, length: int):
        self.processor, self.length = processor, length

    def __call__(self, *args, text=None, **kwargs):
        if text is not None:
            kwargs |= {"truncation": True, "max_length": self.length}
        return self.processor(*args, text=text, **kwargs)


@torch.no_grad()
def clip_score(images, prompts: list[str], clip) -> float:
    """torchmetrics' CLIPScore: max(100 · mean cosine(image, prompt), 0), in [0, 100]. A prompt
    longer than CLIP's text length is scored by what CLIP reads of it, as the pipelines read it."""
    model, processor = clip
    images = as_images(images)
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    processor = _TruncatingProcessor(processor, model.config.text_config.max_position_embeddings)
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor)).to(model.device)
    for start in range(0, len(images), BATCH):
        # Images on the model's device: torchmetrics moves the model to wherever the images are.
        batch = [i.to(model.device) for i in images[start : start + BATCH]]
        metric.update(batch, prompts[start : start + BATCH])
    return float(metric.compute())


class ClipImageFeatures(nn.Module):
    """A torchmetrics FID/KID `feature=` extractor: uint8 N×3×H×W -> unit-norm CLIP image embeddings.

    Unit-normalised so the distance does not depend on the embedding's scale (CLIP is trained on
    cosines). With the real CLIP this gives a "CLIP-FID"; with the tiny one it works offline.
    """

    def __init__(self, clip):
        super().__init__()
        self.model, self.processor = clip
        self.num_features = self.model.config.projection_dim  # spares torchmetrics a dummy forward

    @torch.no_grad()
    def forward(self, imgs: Tensor) -> Tensor:
        emb = _pooled(self.model.get_image_features(_pixels(list(imgs), (self.model, self.processor))))
        return nn.functional.normalize(emb.float(), dim=-1)


def clip_image_extractor(clip) -> ClipImageFeatures:
    return ClipImageFeatures(clip)


def fid_extractor(name: str, clip):
    """The `feature=` for FID/KID from its params name: "clip" (offline-capable) or "inception"."""
    if name == "clip":
        return clip_image_extractor(clip)
    if name == "inception":
        try:
            import torch_fidelity  # noqa: F401  (torchmetrics' Inception lives there)
        except ImportError:
            raise UserError(
                "evaluate.fid_extractor: 'inception' needs the torch-fidelity package; install it or use 'clip'"
            ) from None
        return 2048  # torchmetrics' own InceptionV3 (torch-fidelity weights, fetched on first use)
    raise UserError(f"evaluate.fid_extractor: expected 'clip' or 'inception', got {name!r}")


def feature_dim(extractor) -> int:
    """How many numbers the FID/KID extractor gives per image."""
    return extractor if isinstance(extractor, int) else extractor.num_features


def check_counts(n_real: int, n_fake: int) -> None:
    """FID and KID need two images a side (a covariance, a pair); the stage asks before sampling."""
    if n_real < 2 or n_fake < 2:
        raise UserError(
            f"fid: needs at least 2 real and 2 generated images, got {n_real} real (data/raw) "
            f"and {n_fake} generated (evaluate.prompts x evaluate.seeds)"
        )


def fid_kid(real, fake, extractor) -> tuple[float, float, float]:
    """(FID, KID mean, KID std) of `fake` against `real`, both through the same feature extractor.

    `extractor` is an nn.Module (e.g. `clip_image_extractor(clip)`) or 2048 for torchmetrics'
    Inception. KID's subset size is min(50, n_real, n_fake); its subsets are drawn with a fixed seed.
    """
    real, fake = as_images(real), as_images(fake)
    check_counts(len(real), len(fake))
    fid = FrechetInceptionDistance(feature=extractor)
    # One network for both metrics: KID takes FID's extractor as its own.
    with warnings.catch_warnings():  # "KID keeps all features in memory": by design, and our sets are small
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        kid = KernelInceptionDistance(feature=fid.inception, subset_size=min(KID_SUBSET_MAX, len(real), len(fake)))
    device = next(fid.inception.parameters()).device
    fid, kid = fid.to(device), kid.to(device)
    for images, is_real in ((real, True), (fake, False)):
        for batch in _batches(images):
            fid.update(batch.to(device), real=is_real)
            kid.update(batch.to(device), real=is_real)
    with common.seeded(0):  # KID samples subsets with torch.randperm
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def style_similarity(fake, real, clip) -> float:
    """Mean cosine of each generated image's CLIP embedding to the centroid of the real embeddings."""
    real_emb = nn.functional.normalize(image_embeddings(real, clip), dim=-1)
    fake_emb = nn.functional.normalize(image_embeddings(fake, clip), dim=-1)
    centroid = nn.functional.normalize(real_emb.mean(0), dim=-1)
    return float((fake_emb @ centroid).mean())


@torch.no_grad()
def _token_distance(a: list[Tensor], b: list[Tensor], clip) -> Tensor:
    """LPIPS-style distance per pair: squared L2 between unit-normalised CLIP patch tokens,
    averaged over tokens and over the vision layers."""
    model, _ = clip
    out = []
    for start in range(0, len(a), BATCH):
        ha = model.vision_model(_pixels(a[start : start + BATCH], clip), output_hidden_states=True).hidden_states
        hb = model.vision_model(_pixels(b[start : start + BATCH], clip), output_hidden_states=True).hidden_states
        # Skip the embedding output (index 0) and the class token: compare what each layer sees per patch.
        per_layer = [
            (nn.functional.normalize(x[:, 1:].float(), dim=-1) - nn.functional.normalize(y[:, 1:].float(), dim=-1))
            .square().sum(-1).mean(-1)
            for x, y in zip(ha[1:], hb[1:])
        ]
        out.append(torch.stack(per_layer).mean(0))
    return torch.cat(out)


def fidelity(images, reference, clip) -> dict:
    """How close each image is to its reference (e.g. a quantized model's output vs full precision).

    psnr: mean per-pair PSNR in dB over 0..255 pixels, each capped at PSNR_CAP_DB (identical -> 100).
    lpips_like: mean CLIP patch-token distance (0 = identical, up to 4); not LPIPS itself, whose
    weights would need a download.
    """
    images, reference = as_images(images), as_images(reference)
    if len(images) != len(reference) or any(a.shape != b.shape for a, b in zip(images, reference)):
        raise ValueError("fidelity: images and reference must pair up one-to-one with the same sizes")
    psnr = [
        min(float(peak_signal_noise_ratio(a.float(), b.float(), data_range=255.0)), PSNR_CAP_DB)
        for a, b in zip(images, reference)
    ]
    return {"psnr": statistics.fmean(psnr), "lpips_like": float(_token_distance(images, reference, clip).mean())}


def time_it(fn, repeats: int, warmup: int = 1, sync=None) -> dict:
    """Wall time of `fn()`: `warmup` untimed calls, then `repeats` timed ones.

    `sync` is the device the work runs on; on CUDA the queue is drained before and after each
    call, so the time covers the kernels and not just their launch.
    """
    if repeats < 1:
        raise ValueError("time_it: repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        phases.sync(sync)
        start = time.perf_counter()
        fn()
        phases.sync(sync)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "all_s": times}
