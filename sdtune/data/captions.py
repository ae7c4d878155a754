"""Captions for the kept images: a fixed caption, else a sidecar file, else a captioning model;
then the template, then the text encoder's token limit.

The template applies to every caption, whichever way it was made, so a trigger phrase such as
"a painting by sargent" is in all of them; use "{caption}" for none.
"""

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from sdtune.data.images import MAX_PIXELS, SIDECARS, load_rgb
from sdtune.errors import UserError
from sdtune.io import atomic_path

TINY = "tiny"
TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-captioner"


@dataclass(frozen=True)
class Kind:
    """How to run one family of captioners; keyed by the model_type in the model's config.json."""
    model_class: str  # a transformers class, looked up only when loading (keeps imports light)
    prompt: str | None = None  # text sent with every image


KINDS = {
    "blip": Kind("BlipForConditionalGeneration"),
    "blip-2": Kind("Blip2ForConditionalGeneration"),
    "florence2": Kind("Florence2ForConditionalGeneration", prompt="<CAPTION>"),  # its task token
}


def _names(folder: Path) -> dict:
    """Casefolded file name -> path, for the files in one folder (the first by sorted name wins a tie)."""
    names = {}
    for entry in sorted(folder.iterdir()):
        names.setdefault(entry.name.casefold(), entry)
    return names


def _is_file(path: Path) -> bool:
    """Path.is_file, False also for a name too long to be a file here (an image named with 254
    bytes has no 258-byte .caption beside it; is_file raises for it)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _read_sidecar(image_path: Path, notes, names: dict | None) -> tuple[str | None, Path | None]:
    """(caption, the sidecar it came from), or (None, None); see read_sidecar."""
    names = _names(image_path.parent) if names is None else names
    for suffix in SIDECARS:
        # the exact name first; then case-insensitive: cameras and Windows tools write a.JPG with a.TXT
        side = image_path.with_suffix(suffix)
        side = side if _is_file(side) else names.get((image_path.stem + suffix).casefold())
        if side is None or not _is_file(side):
            continue
        try:
            text = side.read_bytes().decode("utf-8-sig")  # -sig: editors on Windows add a BOM
        except UnicodeDecodeError as err:
            _note(notes, f"{side.name}: not valid UTF-8 (byte {err.start}); sidecar ignored")
            continue
        except OSError as err:
            _note(notes, f"{side.name}: cannot read ({err.strerror}); sidecar ignored")
            continue
        text = " ".join(text.split())
        if text:
            return text, side
        _note(notes, f"{side.name}: empty; sidecar ignored")
    return None, None


def read_sidecar(image_path, notes: list | None = None) -> str | None:
    """The caption in `<stem>.txt` or `<stem>.caption` (SIDECARS, first found wins) beside the image,
    the name matched case-insensitively, whitespace collapsed.

    An unreadable, non-UTF-8 or empty sidecar counts as none; why is appended to `notes`.
    """
    return _read_sidecar(Path(image_path), notes, None)[0]


def _note(notes, message):
    if notes is not None:
        notes.append(message)


def _count(tokenizer, text: str) -> int:
    # verbose=False: no "Token indices sequence length is longer than..." line from transformers for
    # the probes of an overlong caption (tokenize() logs it too); the stage warns in its own words.
    return len(tokenizer(text, verbose=False).input_ids)


def truncate(text: str, tokenizer, max_tokens: int) -> tuple[str, bool]:
    """The longest prefix of `text` that fits `max_tokens` (BOS/EOS included), cut at a word."""
    if _count(tokenizer, text) <= max_tokens:
        return text, False
    lo, hi = 0, len(text)  # binary search on the prefix length in characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    if lo < len(text) and not text[lo].isspace() and " " in cut:
        cut = cut.rsplit(" ", 1)[0]  # do not end on half a word
    return cut.rstrip(" ,;:-"), True


def apply_template(template: str, caption: str) -> str:
    if "{caption}" not in template:
        raise UserError(f"caption.template: must contain {{caption}} (got {template!r})")
    return template.replace("{caption}", caption)  # not str.format: captions may hold braces


@dataclass
class Captioner:
    model: object
    processor: object
    kind: Kind
    device: str
    dtype: object
    generate_kwargs: dict = field(default_factory=dict)

    def __call__(self, images: list[Image.Image], max_new_tokens: int) -> list[str]:
        import torch

        inputs = {"images": images, "return_tensors": "pt"}
        if self.kind.prompt is not None:
            inputs["text"] = [self.kind.prompt] * len(images)
        batch = self.processor(**inputs).to(self.device, dtype=self.dtype)  # casts floats only
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      **self.generate_kwargs)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _kind_of(model_id: str, revision: str) -> Kind:
    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(model_id, revision=revision)
    except OSError as err:
        raise UserError(f"caption.model: cannot read the config of {model_id!r} at revision {revision!r}: "
                        f"{str(err).strip().splitlines()[0]}") from None
    if not config:
        raise UserError(f"caption.model: cannot read the config of {model_id!r}: no config.json there")
    if "auto_map" in config:
        raise UserError(f"caption.model: {model_id!r} needs its own remote code (auto_map in config.json), "
                        "which sdtune does not run; for Florence-2 use florence-community/Florence-2-base "
                        "or -large (the same weights, native in transformers)")
    kind = KINDS.get(config.get("model_type"))
    if kind is None:
        raise UserError(f"caption.model: {model_id!r} has model_type {config.get('model_type')!r}; "
                        f"supported: {', '.join(KINDS)} (BLIP, BLIP-2, Florence-2) or 'tiny'")
    return kind


def _tiny(seed: int):
    """A random-initialised BLIP small enough for CPU tests: its words come from the shipped vocab."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessorPil, BlipProcessor)

    tokenizer = BertTokenizer.from_pretrained(TINY_DIR, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    # 5x the usual init scale, so that the random captions differ from one image to the next
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  initializer_range=0.1)
    config = BlipConfig(
        initializer_factor=5.0,
        vision_config=dict(**layers, image_size=32, patch_size=8),
        text_config=dict(**layers, vocab_size=len(tokenizer), encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    # Random weights may pick a special token or stop at once; keep the output a few plain words.
    special = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    banned = sorted(set(special) - {tokenizer.sep_token_id})
    return model, processor, dict(min_new_tokens=3, suppress_tokens=banned, no_repeat_ngram_size=1)


def load_captioner(model_id: str, revision: str, *, seed: int = 0, device: str = "auto") -> Captioner:
    """A captioner by model id ('tiny' for the offline one); fp16 on CUDA, float32 on CPU."""
    import torch
    import transformers

    from sdtune import runtime  # runtime imports torch: loaded only when captioning

    chosen = runtime.device(device)
    dtype = torch.float16 if chosen.type == "cuda" else torch.float32
    device = str(chosen)
    if model_id == TINY:
        model, processor, extra = _tiny(seed)
        model, kind = model.to(dtype), KINDS["blip"]
    else:
        kind = _kind_of(model_id, revision)
        try:
            model = getattr(transformers, kind.model_class).from_pretrained(model_id, revision=revision, dtype=dtype)
            processor = transformers.AutoProcessor.from_pretrained(model_id, revision=revision)
        except OSError as err:
            raise UserError(f"caption.model: cannot load {model_id!r} at revision {revision!r}: "
                            f"{str(err).strip().splitlines()[0]}") from None
        extra = {}
    # .to(device) only: from_pretrained already set the dtype, and kept BLIP-2's Q-Former in fp32 on purpose
    return Captioner(model.to(device).eval(), processor, kind, device, dtype, extra)


def caption_folder(raw_dir, verdicts, *, model_id, revision, template, fixed=None, batch_size=8,
                   max_new_tokens=30, tokenizer_for_limit=None, seed=0, device="auto",
                   max_pixels=MAX_PIXELS) -> list[dict]:
    """One row per kept image, in verdict order:
    {"file", "sha256", "caption", "how": "sidecar"|"model"|"fixed", "model", "revision", "warnings": [..]}

    The model is loaded only if some image has neither a fixed caption nor a sidecar.
    `tokenizer_for_limit` (e.g. the CLIP tokenizer) caps each caption at its model_max_length.
    """
    raw_dir = Path(raw_dir)
    apply_template(template, "")  # a bad template fails before any model is loaded
    rows, need = [], []
    listing = functools.cache(_names)  # each folder listed once per call, not once per image
    users = {}  # sidecar -> the rows that took their caption from it
    for v in verdicts:
        if v["status"] != "kept":
            continue
        row = {"file": v["file"], "sha256": v["sha256"], "caption": fixed, "how": "fixed",
               "model": None, "revision": None, "warnings": []}
        if fixed is None:
            image = raw_dir / v["file"]
            row["caption"], side = _read_sidecar(image, row["warnings"], listing(image.parent))
            row["how"] = "sidecar"
            if row["caption"] is None:
                need.append(row)
            else:
                users.setdefault(side, []).append(row)
        rows.append(row)
    for side, sharing in users.items():
        if len(sharing) > 1:  # c.jpg and c.png: one caption for two pictures, likely meant for one
            files = ", ".join(r["file"] for r in sharing)
            for row in sharing:
                row["warnings"].append(f"{side.name}: sidecar shared by {files}")
    if need:
        captioner = load_captioner(model_id, revision, seed=seed, device=device)
        with tqdm(total=len(need), desc="caption", unit="image") as bar:
            for start in range(0, len(need), batch_size):
                batch = need[start:start + batch_size]
                texts = captioner([load_rgb(raw_dir / r["file"], max_pixels) for r in batch], max_new_tokens)
                for row, text in zip(batch, texts):
                    row.update(caption=text, how="model", model=model_id,
                               revision=None if model_id == TINY else revision)
                    if not text:
                        row["warnings"].append("the model returned an empty caption")
                bar.update(len(batch))
    for row in rows:
        row["caption"] = apply_template(template, row["caption"])
        if tokenizer_for_limit is not None:
            limit = tokenizer_for_limit.model_max_length
            row["caption"], cut = truncate(row["caption"], tokenizer_for_limit, limit)
            if cut:
                row["warnings"].append(f"caption truncated to the text encoder's {limit} tokens")
    return rows


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap by rendered width; a word wider than a line is split by characters."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        line = word
        while len(line) > 1 and draw.textlength(line, font=font) > width:
            k = len(line) - 1
            while k > 1 and draw.textlength(line[:k], font=font) > width:
                k -= 1
            lines.append(line[:k])
            line = line[k:]
    return lines + [line] if line else lines


def contact_sheet(raw_dir, rows, out_png, n: int = 12, *, thumb: int = 192, cols: int = 4,
                  text_lines: int = 4, max_pixels: int = MAX_PIXELS) -> Path:
    """A PNG grid of up to n thumbnails, each with its caption under it, to check captions by eye.

    Size: min(cols, count) * (thumb + 2*pad) wide, ceil(count / cols) * cell height high.
    """
    rows = list(rows)[:n]
    font = ImageFont.load_default(size=13)
    pad, line_h = 8, 16
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + text_lines * line_h
    cols = max(1, min(cols, len(rows)))
    sheet = Image.new("RGB", (cols * cell_w, max(1, math.ceil(len(rows) / cols)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((pad, pad), "no captioned images", fill="black", font=font)
    for i, row in enumerate(rows):
        x, y = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        img = load_rgb(Path(raw_dir) / row["file"], max_pixels)
        img.thumbnail((thumb, thumb))
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        lines = _wrap(draw, row["caption"], font, thumb)
        if len(lines) > text_lines:
            lines = lines[:text_lines]
            lines[-1] = lines[-1][:-3] + "..."
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + pad + j * line_h), line, fill="black", font=font)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
