"""Where a step's compute time goes, by kind of kernel, and how fast each kind runs.

The phases say which part of a step is slow; this says which kind of work inside it is: the
device time of every kernel (on a CPU, the self time of every op) summed by kind, and next to it
the FLOPs FlopCounterMode counts for that kind, so each kind's achieved TFLOP/s shows which one
holds MFU down (say, attention kernels at half the speed of the convolutions).

Kinds are read off kernel names: inductor's generated kernels start with "triton_" (GPU) or
"cpp_" (CPU); cuDNN's and cuBLAS's carry fprop/dgrad/wgrad, gemm, nvjet or cutlass; the attention
kernels flash, fmha or sdpa. The first kind whose pattern matches wins, hence the order. A copy
kernel's name says only that it copies, so launched_by follows copies and layout changes to the
op that launched them, with their inputs' shapes and strides.
"""

import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

KINDS = [
    ("fused (inductor)", r"^(triton|cpp)_"),  # torch.compile's generated kernels: Triton on GPUs, C++ on CPUs
    ("attention", r"attention|flash|fmha|sdpa"),
    ("convolution", r"conv|fprop|dgrad|wgrad"),
    ("layout", r"nchwtonhwc|nhwctonchw|transpose"),  # cuDNN's and others' layout changes around convs
    ("matmul", r"gemm|nvjet|cutlass|matmul|(^|[.:_])(add|b|badd)?mm($|[.])"),
    ("copy", r"memcpy|memset|copy"),
]
OTHER = "other (elementwise, norms, optimizer)"
_PATTERNS = [(kind, re.compile(pattern)) for kind, pattern in KINDS]


def kind(name: str) -> str:
    """The kind of a kernel or op, from its name ("aten.convolution.default", "sm90_xmma_fprop_...")."""
    name = name.lower().removeprefix("void ")
    for k, pattern in _PATTERNS:
        if pattern.search(name):
            return k
    return OTHER


def time_by_kernel(fn, steps: int, device) -> tuple[dict[str, float], float, list[dict]]:
    """(milliseconds per call of `fn` by kernel name, wall milliseconds per call, where its copies
    come from: launched_by), over `steps` calls under torch.profiler: each kernel's device time on
    a GPU, each op's self time on a CPU (where ops run their own loops). The wall time is the
    profiled calls' own, the profiler's overhead included, so that the kernels' share of it is a
    share of the same steps."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # record_shapes: the shapes and strides of each op's inputs, which say what a copy copies.
    with profile(activities=activities, record_shapes=True) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - began) * 1e3 / steps
    return per_kernel(prof, steps, cuda), wall_ms, launched_by(prof, steps, cuda)


def per_kernel(prof, steps: int, cuda: bool) -> dict[str, float]:
    """Milliseconds per step by kernel name from a finished torch.profiler run of `steps` steps."""
    totals: dict[str, float] = {}
    for event in prof.events():
        name = event.name
        if cuda:
            # Device events are kernels, copies and the GPU-side spans of record_function labels
            # (user annotations), which would count their kernels twice.
            if event.device_type != DeviceType.CUDA or event.is_user_annotation:
                continue
            us = event.time_range.elapsed_us()
        else:
            if event.is_user_annotation:  # a record_function label's self time is Python between ops
                name = "python between ops"
            us = event.self_cpu_time_total
        totals[name] = totals.get(name, 0.0) + us
    return {name: us / 1e3 / steps for name, us in totals.items()}


def launched_by(prof, steps: int, cuda: bool, kinds=("copy", "layout"), top: int = 8,
                strides: dict[int, list] | None = None, trace=None) -> list[dict]:
    """Where a step's kernels of `kinds` come from: milliseconds per step by the op that launched
    them, busiest first, each with the ops it ran inside (innermost first) and its tensor inputs'
    shapes and strides (where the profile recorded them). A copy kernel's name says only that it
    copies; the op above it (a `contiguous` inside attention's backward, a convolution given
    channels-last input) says why. On a GPU each kernel counts for the op the profiler links it to;
    on a CPU, where ops run their own loops, an op of those kinds counts for itself. `strides`: each
    op's input strides by its id; by default the events' own, or the Chrome trace's where torch's
    events have none (before torch 2.12, as on the GPU box): `trace`, where `prof` has been written
    to one already, else a trace written for it."""
    events = prof.events()
    if strides is None and events and not hasattr(events[0], "structured_input_strides"):
        strides = strides_by_id(prof, trace)
    totals: dict[tuple, float] = {}
    for event in events:
        if event.device_type != DeviceType.CPU or event.is_user_annotation:
            continue
        if cuda:
            us = sum(k.duration for k in event.kernels if kind(k.name) in kinds)
        else:
            us = event.self_cpu_time_total if kind(event.name) in kinds else 0.0
        if us > 0:
            key = (event.name, _callers(event), _inputs(event, strides))
            totals[key] = totals.get(key, 0.0) + us
    busiest = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [{"op": op, "callers": list(callers), "inputs": inputs, "ms": us / 1e3 / steps}
            for (op, callers, inputs), us in busiest]


def _callers(event, depth: int = 3) -> tuple[str, ...]:
    """The names of the ops (or record_function ranges) `event` ran inside, innermost first."""
    names, parent = [], event.cpu_parent
    while parent is not None and len(names) < depth:
        names.append(parent.name)
        parent = parent.cpu_parent
    return tuple(names)


def strides_by_id(prof, trace=None) -> dict[int, list]:
    """Each op's input strides by its id (FunctionEvent.id, the trace's "External id"), read from
    the Chrome trace, which has recorded them longer than torch's events have: `trace`, the file
    `prof` was exported to, or else one exported here."""
    if trace is not None:
        events = json.loads(Path(trace).read_text())["traceEvents"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
    return {e["args"]["External id"]: e["args"]["Input Strides"] for e in events
            if e.get("cat") == "cpu_op" and {"External id", "Input Strides"} <= set(e.get("args", {}))}


def _inputs(event, strides_of: dict[int, list] | None = None) -> str:
    """An op's tensor inputs as "16×320×64×64 (1310720, 1, 20480, 320)": shape, then strides."""
    shapes = event.input_shapes or []
    strides = (strides_of.get(event.id) if strides_of is not None
               else getattr(event, "structured_input_strides", None)) or [None] * len(shapes)
    out = []
    for shape, stride in zip(shapes, strides):
        if not shape or not all(isinstance(n, int) for n in shape):
            continue  # a scalar, a list of tensors or no tensor at all
        text = "×".join(map(str, shape))
        if stride and all(isinstance(n, int) for n in stride):
            text += f" ({', '.join(map(str, stride))})"
        out.append(text)
    return ", ".join(out)


def traced_step_ms(prof) -> float:
    """Mean wall milliseconds of the `step_<i>` ranges phases.trace wraps each traced step in."""
    spans = [e.time_range.elapsed_us() for e in prof.events()
             if re.fullmatch(r"step_\d+", e.name) and e.device_type == DeviceType.CPU]
    return sum(spans) / len(spans) / 1e3


def by_kind(values: dict) -> dict:
    """Sum a mapping keyed by kernel or op name ({kernel: ms}, or FlopCounterMode's {op: flops}) by kind."""
    out = Counter()
    for name, value in values.items():
        out[kind(str(name))] += value
    return dict(out)


def breakdown(per_kernel: dict[str, float], flops: dict[str, int], step_ms: float, top: int = 12,
              copies: list[dict] | None = None) -> dict:
    """One row per kind, busiest first: ms per step, share of the summed kernel time, FLOPs and
    achieved TFLOP/s (where FLOPs are counted); how much of the (profiled) step the kernels fill
    (on a GPU the rest is time no kernel ran; on a CPU, with ops timed by their self time, about
    all of it); the `top` busiest kernels by name, which say what a kind's time is made of; and
    the ops that launched the copies and layout changes (launched_by), where given."""
    ms = by_kind(per_kernel)
    total = sum(ms.values())
    rows = []
    for k in sorted(set(ms) | set(flops), key=lambda k: -ms.get(k, 0.0)):
        t, f = ms.get(k, 0.0), flops.get(k, 0)
        rows.append({"kind": k, "ms": t, "share": t / total if total else 0.0, "tflop": f / 1e12,
                     "tflops": f / (t / 1e3) / 1e12 if f and t else None})
    busiest = sorted(per_kernel.items(), key=lambda item: -item[1])[:top]
    return {"rows": rows, "kernel_ms": total, "step_ms": step_ms,
            "busy": total / step_ms if step_ms > 0 else None,
            "top": [{"name": name, "kind": kind(name), "ms": t} for name, t in busiest],
            "copies": copies or []}


def table(result: dict) -> str:
    """The breakdown as Markdown, with a last row for all kinds together, then the busiest kernels
    (or the line saying why there is none: {"error": ...})."""
    if "error" in result:
        return f"kernel breakdown failed: {result['error']}"
    lines = ["| kind | ms/step | share | model TFLOP/step | model TFLOP/s |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        tflop = f"{r['tflop']:.3g}" if r["tflop"] else ""
        tflops = "" if r["tflops"] is None else f"{r['tflops']:.0f}" if r["tflops"] >= 10 else f"{r['tflops']:.2g}"
        lines.append(f"| {r['kind']} | {r['ms']:.2f} | {r['share']:.0%} | {tflop} | {tflops} |")
    busy = "" if result["busy"] is None else f"{result['busy']:.0%} of the {result['step_ms']:.1f} ms profiled step"
    lines.append(f"| all kernels | {result['kernel_ms']:.2f} | {busy} | | |")
    if result.get("top"):
        lines += ["", "| busiest kernels | kind | ms/step |", "|---|---|---:|"]
        for k in result["top"]:
            name = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
            lines.append(f"| `{name.replace('|', '/')}` | {k['kind']} | {k['ms']:.2f} |")
    if result.get("copies"):
        lines += ["", "| copies and layout changes, launched by | inside | inputs: shape (strides) | ms/step |",
                  "|---|---|---|---:|"]
        for c in result["copies"]:
            inside = " ← ".join(c["callers"])
            lines.append(f"| `{c['op']}` | {inside.replace('|', '/')} | {c['inputs']} | {c['ms']:.2f} |")
    return "\n".join(lines)
