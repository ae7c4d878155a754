"""Turn bench.train_step JSON files into one Markdown table plus a targets table.

    python -m bench.table runs/*.json --json bench.json --md bench.md
    python -m bench.table docs/results/h200-2026-11-28.json     # a past call's tables again

A JSON holding {"name", "error"} (what bench/gpu.sh writes for a run that failed, timed out or
was skipped) shows up as a row with its error, so a missing number is never silently dropped.
"""

import argparse
import json
import operator
from pathlib import Path

from sdtune import io
from sdtune.profiling import kernels, roofline

GIB = 2**30

# (what, which runs, key, comparison, threshold, how to show the value). Baseline and tiny runs
# never count towards a target; among the matching runs the best one is judged. A tuple in "which
# runs" is the values allowed.
TARGETS = [
    # MFU only of 16-bit runs: an fp32 run's MFU is against fp32's own, 15x lower peak.
    ("SD1.5 LoRA bs16 512² MFU ≥ 35%", {"arch": "sd15", "bs": 16, "res": 512, "precision": ("bf16", "fp16")},
     "mfu", ">=", 0.35, lambda v: f"{v:.1%}"),
    ("SD1.5 LoRA bs1 512² ≤ 0.06 s/step", {"arch": "sd15", "bs": 1, "res": 512}, "step_ms", "<=", 60,
     lambda v: f"{v / 1e3:.3f} s"),
    ("SD3.5 Medium LoRA bs3 1024² ≤ 0.35 s/step", {"arch": "sd35m", "bs": 3, "res": 1024}, "step_ms", "<=", 350,
     lambda v: f"{v / 1e3:.3f} s"),
    ("SD3.5 Large QLoRA bs1 1024² peak ≤ 20 GiB", {"arch": "sd35l", "bs": 1, "res": 1024, "nf4": True},
     "peak_memory_bytes", "<=", 20 * GIB, lambda v: f"{v / GIB:.1f} GiB"),
]
OPS = {">=": operator.ge, "<=": operator.le}


def load(paths) -> list[dict]:
    """Each file's results: one run's JSON (bench.train_step --json), or a whole call's bench.json
    (its "results"; docs/results/ keeps them), so the tables of past calls can be remade."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"python -m bench.table: {path}: cannot read it as JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            rows += data["results"]
        elif isinstance(data, dict) and "name" in data:
            rows.append(data)
        else:
            raise SystemExit(f"python -m bench.table: {path}: expected a run's JSON (with \"name\") or a "
                             f"bench.json (with \"results\")")
    return rows


def _ok(r) -> bool:
    return "error" not in r


def speedup(r, rows):
    """Step time of the diffusers-example baseline with the same arch/size/batch over this run's."""
    if not _ok(r) or r["baseline"]:
        return None
    same = [b for b in rows if _ok(b) and b["baseline"]
            and all(b[k] == r[k] for k in ("arch", "tiny", "res", "bs"))]
    return min(b["step_ms"] for b in same) / r["step_ms"] if same else None


def _spread(value: float, samples) -> str:
    """A time and the range of its samples, where the run recorded them (runs since 2026-11-26's
    second H100 call)."""
    samples = [x for x in samples if x is not None]
    return f"{value:.1f}" + (f" ({min(samples):.1f}–{max(samples):.1f})" if samples else "")


def results_table(rows) -> str:
    head = ("| run | step ms (min–max) | pipelined ms (blocks' min–max) | img/s | TFLOP/step | MFU | peak GiB "
            "| vs baseline |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if not _ok(r):
            lines.append(f"| {r['name']} | {r['error']} | | | | | | |")
            continue
        s = speedup(r, rows)
        step = _spread(r["step_ms"], [r.get("step_ms_min"), r.get("step_ms_max")])
        pipelined = _spread(r["step_ms_pipelined"], r.get("step_ms_pipelined_blocks", []))
        cache = r.get("compile_cache") or {}
        notes = [f"{cache['graph_breaks']} graph breaks"] if cache.get("graph_breaks") else []
        if cache.get("cudagraph_skips"):  # a -cudagraphs run that ran without them, in part or whole
            notes.append(f"CUDA graphs skipped for {cache['cudagraph_skips']} graph(s)")
        name = f"{r['name']} ({'; '.join(notes)})" if notes else r["name"]
        lines.append(
            f"| {name} | {step} | {pipelined} | {r['images_per_second']:.2f} "
            f"| {r['flops_per_step'] / 1e12:.3g} | {r['mfu']:.1%} | {r['peak_memory_bytes'] / GIB:.2f} "
            f"| {'' if s is None else f'{s:.2f}×'} |")
    return "\n".join(lines)


def judge(rows) -> list[dict]:
    out = []
    for what, match, key, op, threshold, show in TARGETS:
        runs = [r for r in rows if _ok(r) and not r["baseline"] and not r["tiny"]
                and all(r.get(k) in v if isinstance(v, tuple) else r.get(k) == v for k, v in match.items())]
        if not runs:
            out.append({"target": what, "run": None, "value": None, "result": "not run"})
            continue
        pick = max if op == ">=" else min
        best = pick(runs, key=lambda r: r[key])
        ok = OPS[op](best[key], threshold)
        out.append({"target": what, "run": best["name"], "value": best[key], "shown": show(best[key]),
                    "result": "pass" if ok else "FAIL"})
    return out


def targets_table(judged) -> str:
    lines = ["| target | best run | value | result |", "|---|---|---:|---|"]
    for t in judged:
        lines.append(f"| {t['target']} | {t['run'] or '—'} | {t.get('shown', '—')} | {t['result']} |")
    return "\n".join(lines)


def kernel_tables(rows) -> list[str]:
    """Each run's kernel time by kind (bench.train_step --kernels), where it has one, and the floor
    under each kind."""
    out = []
    for r in rows:
        k = r.get("kernels") if _ok(r) else None
        if k:
            out.append(f"**{r['name']}**: kernel time by kind, per step\n\n{kernels.table(k)}")
        if k and r.get("floor"):
            out.append(f"**{r['name']}**: {roofline.floor_table(r['floor'], k)}")
    return out


def render(rows, judged) -> str:
    devices = sorted({r["device_name"] for r in rows if _ok(r)})
    return "\n\n".join([
        f"Device: {', '.join(devices) or 'none'}. Step ms: median of synchronised steps after warm-up, "
        "with the fastest and slowest; pipelined ms: back-to-back steps, one sync at the end, the median of "
        "three blocks with the fastest and slowest block. MFU: FLOPs per step over the run's peak "
        "(datasheet dense peak, else a measured GEMM ceiling); FLOPs are torch's FlopCounterMode count of one "
        "eager step in model FLOPs: attention's backward as 4 matmuls whichever kernel runs it (a fused kernel's "
        "recomputed QKᵀ and gradient checkpointing's recomputed forward are left out; the JSON's HFU keeps them).",
        results_table(rows), targets_table(judged), *kernel_tables(rows)]) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", help="write all results and the judged targets here")
    p.add_argument("--md", help="write the Markdown here")
    args = p.parse_args(argv)
    rows = load(args.paths)
    judged = judge(rows)
    md = render(rows, judged)
    if args.json:
        io.write_text(args.json, json.dumps({"results": rows, "targets": judged}, indent=1) + "\n")
    if args.md:
        io.write_text(args.md, md)
    print(md, end="")
    return md


if __name__ == "__main__":
    main()
