"""What people look at: the prompt x variant image grid and the Markdown table."""

from PIL import Image, ImageDraw

from sdtune import io

LABEL_H = 14
ROW_W = 64      # the least left margin for the row labels (prompt and seed)
MIN_CELL = 128  # wide enough for a variant's name (float8wo-adapter); smaller samples are scaled up


def fit(draw, text: str, width: int) -> str:
    """`text`, cut to `width` rendered pixels."""
    while len(text) > 1 and draw.textlength(text) > width:
        text = text[:-1]
    return text


def row_labels(prompts, seeds) -> list[str]:
    """The label of each row of a prompt x seed grid, in sample_all's order."""
    return [f"prompt {i}\nseed {seed}" for i in range(1, len(prompts) + 1) for seed in seeds]


def prompt_list(prompts) -> str:
    """What the grid's "prompt N" rows are."""
    return "Rows of the sample grid: " + "; ".join(f"prompt {i}: `{p}`" for i, p in enumerate(prompts, 1)) + ".\n"


def grid(columns: dict, out_png, cell: int | None = None, rows: list[str] | None = None) -> tuple[int, int]:
    """columns: {variant: [PIL images, one per prompt x seed]} -> one PNG, a column per variant,
    and with `rows` (row_labels) each row labelled in a left margin."""
    names = list(columns)
    count = len(columns[names[0]])
    cell = cell or max(columns[names[0]][0].size[0], MIN_CELL)
    # The margin fits the longest label: a label cut short (seed 202401 of 20240101) is a wrong one.
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([ROW_W] + [4 + round(measure.textlength(line)) for label in rows for line in label.splitlines()]) \
        if rows else 0
    sheet = Image.new("RGB", (left + cell * len(names), LABEL_H + cell * count), "white")
    draw = ImageDraw.Draw(sheet)
    for r, label in enumerate(rows or []):
        draw.multiline_text((2, LABEL_H + r * cell + 2), label, fill="black")
    for c, name in enumerate(names):
        draw.text((left + c * cell + 2, 1), fit(draw, name, cell - 4), fill="black")
        for r, img in enumerate(columns[name]):
            sheet.paste(img.convert("RGB").resize((cell, cell)), (left + c * cell, LABEL_H + r * cell))
    with io.atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet.size


COLUMNS = [("variant", "{}"), ("dtype", "{}"), ("clip_score", "{:.2f}"), ("fid", "{:.2f}"), ("kid", "{:.4f}"),
           ("style_similarity", "{:.3f}"), ("psnr_to_lora", "{:.1f}"), ("lpips_like_to_lora", "{:.4f}"),
           ("latency_s", "{:.3f}"), ("peak_memory_mib", "{:.0f}"), ("denoiser_mib", "{:.1f}")]


def markdown(records: list[dict], n_fake: int, n_real: int, dim: int, cpu: bool = False) -> str:
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
    if cpu:  # else a smaller quantized denoiser reads as the largest, sampled last
        lines.append("\npeak_memory_mib on a CPU is the process's resident set, which also holds what the "
                     "variants before brought in: compare the variants' sizes by denoiser_mib.")
    return "\n".join(lines) + "\n"
