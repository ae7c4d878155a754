"""profile: where the training step's time and memory go, for each optimization-matrix cell,
and what generation costs for each inference cell.

Writes reports/profile.json (phase times, FLOPs, MFU, memory, cost per cell),
reports/profile.md (the tables), reports/profile/ (phase and bar charts),
reports/profile_cells.json (DVC plots) and reports/traces/ (Chrome traces of the baseline
and of the fastest cell and, on CUDA, their allocator snapshots; kept apart from the plots,
which DVC reads as data).
"""

from pathlib import Path

from tqdm import tqdm

from sdtune import io, params as params_lib, runtime
from sdtune.errors import main_guard
from sdtune.profiling import charts, inference, run as prof

CACHE, LORA_DIR, OUT_DIR, TRACES = "cache", "models/lora", Path("reports/profile"), Path("reports/traces")
REPORT, TABLE, PLOT = "reports/profile.json", "reports/profile.md", "reports/profile_cells.json"


def table(cells) -> str:
    lines = ["| cell | precision | step ms | images/s | TFLOP/s | MFU | peak MiB | $/1000 steps | phases cover |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['name']} | {c['mixed_precision']} | {c['step_ms']:.1f} | {c['images_per_second']:.2f} "
                     f"| {c['achieved_tflops']:.4f} | {c['mfu']:.1%} | {c['memory']['peak_bytes'] / 2**20:.0f} "
                     f"| {c['cost']['usd_per_1000_steps']:.4f} | {c['coverage']:.1%} |")
    phase_names = list(dict.fromkeys(n for c in cells for n in c["phases"]["phases"]))
    lines += ["", "| cell | " + " | ".join(f"{n} ms" for n in phase_names) + " |",
              "|---|" + "---|" * len(phase_names)]
    for c in cells:
        ph = c["phases"]["phases"]
        lines.append(f"| {c['name']} | " + " | ".join(f"{ph.get(n, {}).get('median_ms', 0):.1f}" for n in phase_names) + " |")
    return "\n".join(lines) + "\n"


@main_guard
def main():
    params = params_lib.load()
    p = params.profile
    with runtime.stage("profile"):
        with io.atomic_path(OUT_DIR) as tmp, io.atomic_path(TRACES) as traces:
            tmp.mkdir()
            traces.mkdir()
            cells = []
            for i, spec in enumerate(tqdm(p.matrix, desc="profile", unit="cell")):
                trace = traces / f"trace-{spec['name']}.json" if p.trace and i == 0 else None
                cells.append(prof.profile_cell(params, spec, CACHE, trace))
            best = min(cells, key=lambda c: c["step_ms"])
            if p.trace and best is not cells[0]:  # the fastest cell's trace, to compare with the baseline's
                prof.trace_cell(params, best["spec"], CACHE, traces / f"trace-{best['name']}.json")
            charts.phase_chart({c["name"]: c["phases"] for c in cells}, tmp / "phases.png")
            charts.bar_chart(cells, "step_ms", tmp / "step_ms.png", "Training step time (ms, median)")
            charts.bar_chart(cells, "mfu", tmp / "mfu.png", "Model FLOPs utilisation")
            gen = [inference.profile_cell(params, spec, LORA_DIR, cells[0]["device"])
                   for spec in tqdm(p.inference, desc="inference", unit="cell")]
            charts.bar_chart(gen, "seconds_per_image", tmp / "inference.png", "Generation time (s per image, median)")
        io.write_json(REPORT, {"best": best["name"], "cells": {c["name"]: c for c in cells},
                               "inference": {c["name"]: c for c in gen}})
        io.write_json(PLOT, [{"cell": c["name"], "step_ms": c["step_ms"], "mfu": c["mfu"],
                              "peak_mib": c["memory"]["peak_bytes"] / 2**20} for c in cells])
        io.write_text(TABLE, table(cells) + "\n" + inference.table(gen))
    print(table(cells) + "\n" + inference.table(gen))


if __name__ == "__main__":
    main()
