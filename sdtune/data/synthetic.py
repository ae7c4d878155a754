"""A small procedurally drawn image set for the offline demo and the tests.

No copyrighted images: each picture is a few coloured shapes on a gradient, drawn from
a seeded generator, so the same `n` always gives the same files (and the same hashes).
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70),
    "gold": (220, 180, 40), "violet": (130, 60, 170), "teal": (30, 150, 150),
}
SHAPES = ("circle", "square", "triangle")


def _draw(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    top, bottom = rng.sample(list(COLOURS.values()), 2)
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):  # vertical gradient background
        t = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    name = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[name])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[name])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[name])
    return img, f"a {name} {shape} on a gradient"


def generate(dest, n: int, size: int = 96, seed: int = 0) -> list[Path]:
    """Write `n` PNG images into `dest`; two of every three get a sidecar .txt caption."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for i in range(n):
        img, caption = _draw(rng, size)
        path = dest / f"synthetic_{i:03d}.png"
        img.save(path, format="PNG")
        written.append(path)
        if i % 3 != 2:  # leave some without a sidecar so the captioning model runs too
            (dest / f"synthetic_{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
            written.append(path.with_suffix(".txt"))
    return written
