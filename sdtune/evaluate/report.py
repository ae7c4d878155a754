"""What people look at: the prompt x variant image grid and the Markdown table."""

from PIL import Image, ImageDraw

from sdtune import io

LABEL_H = 14
MIN_CELL = 128  # wide enough for a variant's name (float8wo-adapter); smaller samples are scaled up


def fit(draw, text: str, width: int) -> str:
    """`text`, cut to `width` rendered pixels."""
    while len(text) > 1 and draw.textlength(text) > width:
        text = text[:-1]
    return text


def grid(columns: dict, out_png, cell: int | None = None) -> tuple[int, int]:
    """columns: {variant: [PIL images, one per prompt x seed]} -> one PNG, a column per variant."""
    names = list(columns)
    rows = len(columns[names[0]])
    cell = cell or max(columns[names[0]][0].size[0], MIN_CELL)
    sheet = Image.new("RGB", (cell * len(names), LABEL_H + cell * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((c * cell + 2, 1), fit(draw, name, cell - 4), fill="black")
        for r, img in enumerate(columns[name]):
            sheet.paste(img.convert("RGB").resize((cell, cell)), (c * cell, LABEL_H + r * cell))
    with io.atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet.size


COLUMNS = [("variant", "{}"), ("dtype", "{}"), ("clip_score", "{:.2f}"), ("fid", "{:.2f}"), ("kid", "{:.4f}"),
           ("style_similarity", "{:.3f}"), ("psnr_to_lora", "{:.1f}"), ("lpips_like_to_lora", "{:.4f}"),
           ("latency_s", "{:.3f}"), ("peak_memory_mib", "{:.0f}"), ("denoiser_mib", "{:.1f}")]


def markdown(records: list[dict], n_fake: int, n_real: int, dim: int) -> str:
    """The table, and under it how many images FID and KID saw: FID's bias grows as the sets
    shrink, and with fewer images than feature dimensions it can outweigh a real difference."""
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    lines = [head, rule]
    for rec in records:
        lines.append("| " + " | ".join(fmt.format(rec[name]) for name, fmt in COLUMNS) + " |")
    lines.append(f"\nFID and KID: {n_fake} generated images per variant against {n_real} real ones, "
                 f"{dim} features each.")
    if min(n_fake, n_real) < dim:
        lines[-1] += (" With fewer images than features FID is biased by more than most differences "
                      "between variants: compare them by KID, which is unbiased.")
    return "\n".join(lines) + "\n"
