"""profile: where the training step's time and memory go, for each optimization-matrix cell,
and what generation costs for each inference cell.

Writes reports/profile.json (phase times, FLOPs, MFU, memory, cost and each kind of kernel's
floor per cell; for the traced cells, kernel time by kind next to each kind's FLOPs and floor),
reports/profile.md (the tables), reports/profile/ (phase, bar and memory charts),
reports/profile_cells.json (DVC plots) and reports/traces/ (Chrome traces of the baseline and of
the fastest cell and, on CUDA, their allocator snapshots; kept apart from the plots, which DVC
reads as data).
"""

import gc
import sys
from pathlib import Path

from tqdm import tqdm

from sdtune import families, io, params as params_lib, runtime
from sdtune.errors import UserError, main_guard
from sdtune.profiling import charts, cost, inference, run as prof, tables

CACHE, LORA_DIR, OUT_DIR, TRACES = "cache", "models/lora", Path("reports/profile"), Path("reports/traces")
REPORT, TABLE, PLOT = "reports/profile.json", "reports/profile.md", "reports/profile_cells.json"


def measure_each(specs, measure, what: str):
    """(results, failures): each cell measured in turn. A cell that fails at run time (out of
    memory, a kernel or package this machine lacks) is recorded with its reason and the others
    still run, so one cell cannot throw away the minutes spent measuring the rest."""
    done, failed = [], {}
    for spec in tqdm(specs, desc=what, unit="cell"):
        try:
            done.append(measure(spec))
        except Exception as err:  # noqa: BLE001 -- reported in profile.json and profile.md
            text = str(err).strip().splitlines()
            reason = text[0] if isinstance(err, UserError) else f"{type(err).__name__}: {text[0] if text else ''}"
            failed[spec["name"]] = {"spec": spec, "reason": reason}
            tqdm.write(f"profile: {what} cell {spec['name']!r} did not run: {reason}", file=sys.stderr)
        gc.collect()  # a failed cell's model is garbage now; free it before the next one loads
    return done, failed


@main_guard
def main():
    params = params_lib.load()
    p = params.profile
    family = families.of(params)
    for spec in p.matrix:  # a key the family refuses stops here, before minutes of measuring (typos stopped at load)
        family.check_train(params_lib.cell_params(params, spec).train)
    prof.check_lora_targets(params, family, p.matrix)
    for spec in p.inference:
        inference.check_variant(params_lib.inference_cell(spec))
    cost.hourly_usd(p)  # an unpriced machine type stops here too, not in every cell after it was measured
    with runtime.stage("profile"):
        with io.atomic_path(OUT_DIR) as tmp, io.atomic_path(TRACES) as traces:
            tmp.mkdir()
            traces.mkdir()
            traced = False

            def train_cell(spec):  # the first cell that runs is the baseline: its trace is kept
                nonlocal traced
                trace = traces / f"trace-{spec['name']}.json" if p.trace and not traced else None
                cell = prof.profile_cell(params, spec, CACHE, trace)
                traced = traced or trace is not None
                return cell
            cells, failed = measure_each(p.matrix, train_cell, "profile")
            if not cells:
                name, first = next(iter(failed.items()))
                raise UserError(f"profile.matrix: no cell ran; the first, {name!r}, failed with: {first['reason']}")
            best, trace_failed = prof.fastest(cells), {}
            if p.trace and best is not cells[0]:  # the fastest cell's trace, to compare with the baseline's
                # Set up anew, it can fail (out of memory, say) where its measuring did not: noted, not fatal.
                traced, trace_failed = measure_each(
                    [best["spec"]], lambda spec: prof.trace_cell(params, spec, CACHE, traces / f"trace-{spec['name']}.json"),
                    "trace")
                if traced:
                    best["kernels"] = prof.kernel_breakdown(best, traced[0])
            charts.phase_chart({c["name"]: c["phases"] for c in cells}, tmp / "phases.png")
            charts.bar_chart(cells, "step_ms", tmp / "step_ms.png", "Training step time (ms, median)")
            charts.bar_chart(cells, "mfu", tmp / "mfu.png", "Model FLOPs utilisation", fmt="{:.1%}".format)
            charts.memory_chart(cells, tmp / "memory.png")
            gen, gen_failed = measure_each(
                p.inference, lambda spec: inference.profile_cell(params, spec, LORA_DIR, cells[0]["device"]), "inference")
            charts.bar_chart(gen, "seconds_per_image", tmp / "inference.png", "Generation time (s per image, median)")
            # The reports before the folders are swapped in: one that cannot be written leaves the
            # last run's folders, not new charts beside old numbers.
            failed = {"matrix": failed, "trace": trace_failed, "inference": gen_failed}
            io.write_json(REPORT, {"best": best["name"], "cells": {c["name"]: c for c in cells},
                                   "inference": {c["name"]: c for c in gen}, "failed": failed})
            io.write_json(PLOT, [{"cell": c["name"], "step_ms": c["step_ms"], "mfu": c["mfu"],
                                  "peak_mib": c["memory"]["peak_bytes"] / 2**20} for c in cells])
            text = "\n".join(filter(None, [tables.header(cells, p), tables.table(cells), tables.memory_table(cells),
                                            tables.kernel_tables(cells), inference.table(gen),
                                            tables.failed_list(failed)]))
            io.write_text(TABLE, text)
    print(text)


if __name__ == "__main__":
    main()
