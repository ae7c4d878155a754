"""Image checks: one verdict per file in the raw folder, and one way to load an image.

Every later stage reads images through `load_rgb`, so an image kept here is an image the
cache and the evaluation can open. A bad file becomes a verdict with a reason, never a traceback.
"""

import contextlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

try:
    from PIL import ImageCms  # LittleCMS: in Pillow's standard wheels, optional in source builds
    SRGB = ImageCms.createProfile("sRGB")
except ImportError:
    ImageCms = None

from sdtune.data.links import link_problem
from sdtune.errors import UserError
from sdtune.io import sha256_file
from sdtune.params import MAX_PIXELS  # data.max_pixels' default, defined once

SIDECARS = (".txt", ".caption")  # caption files beside an image; captions reads them in this order
WHITE = (255, 255, 255)


class BadImage(UserError):
    """A file that cannot be used as a training image; `reason` is the bare why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


@contextlib.contextmanager
def _own_bomb_check():
    # Pillow raises its own DecompressionBombError inside Image.open at a fixed limit; we check
    # the header size against `max_pixels` ourselves, so the user's limit is the only one.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# Magic numbers of the common formats, to tell a damaged image from something that never was one.
MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"GIF8": "GIF", b"II*\0": "TIFF", b"MM\0*": "TIFF"}


def _why_unidentified(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, fmt in MAGIC.items():
        if head.startswith(magic):
            return f"truncated or corrupt {fmt} header"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypheim", b"ftypheis"):
        return "HEIC/HEIF photo, which Pillow does not read: convert it to JPEG or PNG"
    head = head.lstrip().lower()
    if b"<svg" in head:
        return "SVG (vector graphics), which is not read: export it as PNG"
    if head.startswith(b"<"):
        return f"not an image: looks like an HTML/XML page saved as '{path.suffix}' (a failed download?)"
    try:
        head.decode("utf-8")
        return f"not an image: looks like a text file saved as '{path.suffix}'"
    except UnicodeDecodeError:
        return "not an image: Pillow cannot identify the format"


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _kind(err: Exception, otherwise: str) -> str:
    return "truncated" if "truncated" in str(err).lower() else otherwise


def _eight_bit(im: Image.Image) -> Image.Image:
    # 16/32-bit integer and float greyscale: Pillow's convert() clips instead of scaling. The scale
    # comes from the bit depth, never from the brightest pixel: a dark image must stay dark.
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if im.mode == "F":
        # Floats carry no range. Values within [0, 1] are taken as the usual normalised range;
        # anything brighter as already on the 0-255 scale and clipped, as Pillow's convert("L") does.
        arr = arr * 255 if arr.max(initial=0) <= 1 else arr
    elif im.mode == "I" and arr.max(initial=0) > 65535:
        arr = arr / ((2**31 - 1) / 255)  # "I" is signed 32-bit: full range
    else:
        arr = arr / 257  # I;16* and "I" (how Pillow may open a 16-bit file): 65535 -> 255
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")


def _to_srgb(im: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    """Pixels described by an embedded ICC profile (Adobe RGB, a CMYK press profile, ...) in sRGB."""
    if ImageCms is None:
        notes.append("ICC colour profile not applied (Pillow built without LittleCMS)")
        return im
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, source, SRGB, outputMode="RGBA" if im.mode == "RGBA" else "RGB")
    except Exception as err:  # noqa: BLE001 - a broken profile or one that does not fit the mode
        notes.append(f"ICC colour profile ignored ({_one_line(err)})")
        return im


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")  # read first: _eight_bit makes a new image without it
    if im.mode == "LAB":  # Pillow's convert() takes L*a*b* for RGB: a neutral grey comes out blue
        raise ValueError("L*a*b* colour is not converted here; save the image as RGB")
    if im.mode.startswith("I") or im.mode == "F":
        key = im.info.get("transparency")
        grey = _eight_bit(im)
        if key is not None:  # tRNS names one grey value transparent; the 8-bit image lost it
            alpha = Image.fromarray(((np.asarray(im) != key) * 255).astype(np.uint8), "L")
            grey = Image.merge("LA", (grey, alpha))
        im = grey
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        im = im.convert("RGBA")
    elif im.mode not in ("RGB", "L", "CMYK"):  # the modes the profile transform takes as they are
        im = im.convert("L" if im.mode == "1" else "RGB")
    if icc:
        im = _to_srgb(im, icc, notes)
    if has_alpha:
        if im.getextrema()[3][0] < 255:  # some pixel is not fully opaque
            notes.append("transparency composited on white")
        background = Image.new("RGBA", im.size, WHITE + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _decode(path: Path, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """Open, check the header size, decode and normalise; every failure is a BadImage."""
    notes = []
    with _own_bomb_check():
        try:
            im = Image.open(path)  # reads the header only
        except Image.UnidentifiedImageError:
            raise BadImage(path, _why_unidentified(path)) from None
        except Exception as err:  # noqa: BLE001 - any decoder error is a verdict, not a crash
            raise BadImage(path, f"{_kind(err, 'unreadable image header')}: {_one_line(err)}") from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(path, f"too many pixels: {w}x{h} = {w * h:,} > max_pixels {max_pixels:,} "
                                     "(possible decompression bomb; not decoded)")
            try:
                frames = getattr(im, "n_frames", 1)
                im.load()  # the first frame of an animation
            except Exception as err:  # noqa: BLE001
                raise BadImage(path, f"{_kind(err, 'corrupt image data')}: {_one_line(err)}") from None
            if frames > 1:
                notes.append(f"animated ({frames} frames): first frame used")
            try:
                rgb = _to_rgb(ImageOps.exif_transpose(im), notes)
            except Exception as err:  # noqa: BLE001
                raise BadImage(path, f"cannot convert {im.mode} image to RGB: {_one_line(err)}") from None
    return rgb, notes


def load_rgb(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and normalise: EXIF orientation applied, first frame of animations, 8-bit RGB
    (CMYK, palette incl. transparency, LA/RGBA alpha composited on white, 16-bit scaled, greyscale),
    converted to sRGB from an embedded ICC profile.

    Raises BadImage (a UserError naming the file) for anything that is not a usable image.
    """
    return _decode(Path(path), max_pixels)[0]


def _files(raw_dir: Path):
    """(relative posix path, path) for every entry that is not a folder, sorted; folder
    symlinks are listed (and later skipped) rather than followed."""
    def unlistable(err):
        raise UserError(f"{err.filename}: cannot list folder ({err.strerror})")

    found = []
    for top, dirs, files in os.walk(raw_dir, onerror=unlistable):
        paths = [Path(top) / n for n in files] + [Path(top) / n for n in dirs if (Path(top) / n).is_symlink()]
        found += [(p.relative_to(raw_dir).as_posix(), p) for p in paths]
    return sorted(found)


def _is_sidecar_or_manifest(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(SIDECARS) or lower == "manifest.json" or lower.endswith(".manifest.json")


def bucket_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """Aspect-ratio bucketing: the (width, height) in multiples of `step`, at most resolution²
    pixels, whose aspect is the image's (clipped to 1:2 .. 2:1)."""
    aspect = min(max(width / height, 0.5), 2.0)
    area = resolution * resolution
    w = max(step, int((area * aspect) ** 0.5) // step * step)
    h = max(step, int((area / aspect) ** 0.5) // step * step)
    return w, h


def _check_one(raw_dir: Path, path: Path, verdict: dict, seen: dict, *, min_side, bucket_step, too_small, max_pixels):
    """Fill `verdict` in place; return the reason to skip, or None to keep."""
    problem = link_problem(path, raw_dir)
    if problem == "outside":
        return f"symlink pointing outside the raw folder (-> {os.readlink(path)}); not followed"
    if problem in ("symlink loop", "broken symlink"):
        return f"{problem} (-> {os.readlink(path)})"
    if problem == "symlink to a folder":
        return "symlink to a folder; not followed"
    if problem:
        return problem  # "not a regular file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    verdict["sha256"] = sha256_file(path)
    if verdict["sha256"] in seen:
        return f"exact duplicate of {seen[verdict['sha256']]}"
    try:
        img, notes = _decode(path, max_pixels)
    except BadImage as bad:
        return bad.reason
    verdict["width"], verdict["height"] = img.size
    verdict["warnings"].extend(notes)
    w, h = img.size
    if bucket_step:  # too small for its own aspect-ratio bucket, not for a square
        tw, th = bucket_size(w, h, min_side, bucket_step)
        small = f"{w}x{h} px < its bucket {tw}x{th}" if w < tw or h < th else None
    else:
        small = f"short side {min(w, h)} px < min_side {min_side}" if min(w, h) < min_side else None
    if small:
        if too_small == "skip":
            return f"too small: {small}"
        verdict["warnings"].append(f"{small}; will be upscaled")
    seen[verdict["sha256"]] = verdict["file"]
    return None


def check_folder(raw_dir: Path, *, min_side: int, bucket_step: int | None = None, too_small: str = "upscale",
                 max_pixels: int = MAX_PIXELS) -> list[dict]:
    """One verdict per file in raw_dir (recursive, sorted by relative posix path), skipping sidecar
    .txt/.caption files and the manifest. `min_side` is the training resolution; with `bucket_step`
    (cache.buckets on) an image is too small when it is smaller than its bucket (bucket_size):
    {"file", "sha256", "status": "kept"|"skipped", "reason": str|None, "width", "height", "warnings": [..]}
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir}: not a folder (expected the fetched raw images)")
    if too_small not in ("skip", "upscale"):
        raise UserError(f"too_small: expected 'skip' or 'upscale' (got {too_small!r})")
    seen = {}  # sha256 -> first kept file
    verdicts = []
    for rel, path in _files(raw_dir):
        if _is_sidecar_or_manifest(path.name):
            continue
        verdict = {"file": rel, "sha256": None, "status": "kept", "reason": None,
                   "width": None, "height": None, "warnings": []}
        try:
            reason = _check_one(raw_dir, path, verdict, seen, min_side=min_side, bucket_step=bucket_step,
                                too_small=too_small, max_pixels=max_pixels)
        except OSError as err:  # permissions, a file vanishing mid-run
            reason = f"cannot read: {_one_line(err)}"
        if reason is not None:
            verdict.update(status="skipped", reason=reason)
        verdicts.append(verdict)
    return verdicts
