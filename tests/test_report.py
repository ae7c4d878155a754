"""REPORT.md's findings: what each profile cell is measured against."""

from sdtune import report


def cell(name, images_per_second, spread=0.01, **spec):
    """A profile.json cell with only what the findings read: two images a step, its steps within
    `spread` of the median."""
    step_ms = 2000 / images_per_second
    return {"name": name, "spec": {"name": name, **spec}, "images_per_second": images_per_second,
            "step_ms": step_ms, "images_per_step": 2, "mfu": 0.1, "memory": {"peak_bytes": 2**30},
            "phases": {"phases": {"encode": {"median_ms": 5.0}}, "step_min_ms": step_ms * (1 - spread),
                       "step_max_ms": step_ms * (1 + spread)}}


def findings(cells, best):
    return report.findings({}, {"cells": {c["name"]: c for c in cells}, "best": best})


def test_a_difference_inside_the_spread_of_the_steps_is_no_verdict():
    """A 1.14× median gain whose steps overlap the reference's is noise (on the demo's busy CPU,
    checkpointing, which only adds work, "helped" so); the same medians with tight steps are not."""
    noisy = findings([cell("baseline", 10, spread=0.3), cell("checkpointing", 11.4, spread=0.3,
                                                               gradient_checkpointing=True)], "checkpointing")
    assert noisy[0].startswith("- `checkpointing` made no clear difference (its steps took 61.4–114.0 ms per "
                               "image, those of `baseline` 70.0–130.0): 1.14× the speed of `baseline`")
    tight = findings([cell("baseline", 10), cell("checkpointing", 11.4, gradient_checkpointing=True)], "checkpointing")
    assert tight[0].startswith("- `checkpointing` helped: 1.14× the speed")
    fly = findings([cell("fly", 10, spread=0.3, latents="on_the_fly"), cell("cached", 11.4, spread=0.3)], "cached")
    assert fly[0].startswith("- Caching latents and text embeddings made no clear difference (its steps took")
    fastest = findings([cell("fly", 10, spread=0.3, latents="on_the_fly"), cell("cached", 11, spread=0.3),
                        cell("bf16", 11.4, spread=0.3, mixed_precision="bf16")], "bf16")
    assert fastest[-1].endswith("(11.40 vs 10.00 images/s); not a clear difference: its steps took 61.4–114.0 ms "
                                "per image, those of `fly` 70.0–130.0.")


def test_a_first_on_the_fly_cell_is_the_caching_sentence_not_a_reference():
    """The cached cell was measured against the on-the-fly one before it, "the cell it changes by
    nothing (the same train keys)", and credited with what the cache bought."""
    lines = findings([cell("on-the-fly", 10, latents="on_the_fly"), cell("cached", 15),
                      cell("bf16", 20, mixed_precision="bf16")], "bf16")
    assert lines[0] == ("- Caching latents and text embeddings helped: `cached` reads the cache and ran 1.50× the "
                        "speed of `on-the-fly`, which reads, resizes and encodes its images every step (200.0 vs "
                        "133.3 ms/step; 5.0 ms of it decoding and encoding).")
    assert lines[1].startswith("- `bf16` helped: 1.33× the speed of `cached`, the cell it changes by "
                               "mixed_precision: bf16 (")
    assert lines[2].startswith("- The fastest cell, `bf16`, ran 2.00× the speed of `on-the-fly`")
    assert len(lines) == 3 and not any("nothing (the same train keys)" in line for line in lines)


def test_latents_is_a_change_and_an_on_the_fly_cell_without_a_twin_says_what_else_differs():
    fly, cached = cell("fp32-on-the-fly", 10, latents="on_the_fly"), cell("bf16", 20, mixed_precision="bf16")
    assert report.changes(fly, cell("fp32", 15)) == {"latents": "on_the_fly"}
    assert report.changes(cell("cached", 15, latents="cached"), cell("fp32", 15)) == {}
    (line, _) = findings([fly, cached], "bf16")
    assert line.startswith("- Caching latents and text embeddings helped: `bf16` reads the cache (and differs by "
                           "mixed_precision: bf16) and ran 2.00× the speed of `fp32-on-the-fly`")
    assert findings([fly], "fp32-on-the-fly") == []  # nothing read the cache: nothing to set it against
