"""The least time a training step could take on a card, kind of kernel by kind.

    python -m bench.roofline --card "H100 SXM" --peak-tflops 801 --arch sd15 --res 512 --bs 16
    python -m bench.roofline ... --measured docs/results/h100-2026-11-26-second-call.json --run sd15-bs16-bf16-compile

Each op of one step (forward, backward and optimizer, on the meta device at real sizes: seconds on
a laptop) is held to the roofline: its FLOPs at the card's GEMM rate or its bytes at the card's
memory bandwidth, whichever takes longer. Summed by kind (bench.train_step --kernels' kinds),
next to a measured kernel breakdown, it says which kind runs furthest from what the card allows.

How it counts:
- FLOPs: torch's flop_counter formulas, as the kernels do them (a fused attention backward's
  recomputed scores included: the kernel does that work).
- Bytes: each op reads its tensor inputs and writes its outputs once. That is the floor for a
  matmul, a convolution or an attention kernel. For everything else (norms, activations, residual
  adds, copies) it is what eager moves op by op, unfused: fusion (inductor's) skips the
  intermediates, so that row is an upper figure, not a floor. Views and allocations move nothing.
- Attention: on meta, SDPA runs its math path (the scores written out), so the step's
  scaled_dot_product_attention calls are counted as the fused kernels run them instead: Q, K, V
  and the output (and its log-sum-exp) in the forward; those, the output's gradient and Q, K, V's
  gradients in the backward. Kernels tiled for 64-wide heads do more than the FLOPs counted for
  SD1.5's 40-wide ones, so its attention floor is lower than any kernel we know reaches;
  --head-multiple 64 counts attention as such a kernel does it.
- LoRA: the products through the adapters' weights, and through what those products made (the
  rank-wide x·Aᵀ and its gradient), are counted apart within matmul.
- Dtypes: meta has no autocast, so the step runs in the compute dtype throughout, LoRA's weights
  included, as autocast runs the matmuls; autocast's float32 norms are not modelled.

The first argument not known here and all that follow go to bench.train_step (its --arch,
--res, --bs, --precision, --rank, --baseline, ...), which builds the step; --device is always meta.
"""

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench import train_step
from sdtune import io
from sdtune.profiling import hardware, kernels

aten = torch.ops.aten
LORA = "matmul: LoRA"
MEMORY = "memory-bound (norms, activations, residuals, copies)"
# The GEMM-like kinds keep their kernels' names; every other measured kind is memory-bound work.
COMPUTE = ("convolution", "matmul", "attention")
FREE = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided, aten.new_empty_strided,
        aten._unsafe_view, aten.detach, aten.lift_fresh, aten.alias}
WRITE_ONLY = {aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_full,
              aten.zeros, aten.ones, aten.full, aten.randn_like, aten.rand_like, aten.randint}


def nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel must touch to read or write `t`: its elements, or its storage where that is
    smaller (an expanded tensor repeats elements)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class Roofline(TorchDispatchMode):
    """Counts every op dispatched inside it: {(op, kind): [calls, flops, bytes, bound seconds]}."""

    def __init__(self, peak_tflops: float, bandwidth_gbs: float, lora_params=()):
        super().__init__()
        self.flop_rate, self.byte_rate = peak_tflops * 1e12, bandwidth_gbs * 1e9
        self.ops = collections.defaultdict(lambda: [0, 0, 0, 0.0])
        # Storages that are LoRA's: its weights, then the rank-wide products made from them. The
        # storages themselves are held, so that a freed one's address is never taken for another.
        self.lora = {_key(p): p.untyped_storage() for p in lora_params}

    def add(self, op: str, kind: str, n_flops: int, n_bytes: int) -> None:
        row = self.ops[(op, kind)]
        row[0] += 1
        row[1] += n_flops
        row[2] += n_bytes
        row[3] += max(n_flops / self.flop_rate, n_bytes / self.byte_rate)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.is_view or packet in FREE:
            return out
        ins = list({id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}.values())
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        n_bytes = sum(map(nbytes, outs)) + (0 if packet in WRITE_ONLY else sum(map(nbytes, ins)))
        formula = flop_counter.flop_registry.get(packet)
        n_flops = formula(*args, **kwargs, out_val=out) if formula else 0
        kind = kernels.kind(str(packet))
        if kind == "matmul" and any(_key(t) in self.lora for t in ins):
            kind = LORA
            self.lora |= {_key(t): t.untyped_storage() for t in outs}
        self.add(str(packet), kind, n_flops, n_bytes)
        return out


class _FlashAttention(torch.autograd.Function):
    """SDPA as a fused kernel does it, counted into the active Roofline; the outputs are empty
    (on meta there are no values)."""

    @staticmethod
    def forward(ctx, mode, q, k, v):
        ctx.mode, roofline = mode, mode.roofline
        ctx.save_for_backward(q, k, v)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.out_bytes = nbytes(out)
        lse = q.numel() // q.shape[-1] * 4  # float32, one per query and head
        n_flops = flop_counter.sdpa_flop_count(*map(mode.padded, (q.shape, k.shape, v.shape)))
        roofline.add("attention (forward)", "attention", n_flops, sum(map(nbytes, (q, k, v, out))) + lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        lse = q.numel() // q.shape[-1] * 4
        n_flops = flop_counter.sdpa_backward_flop_count(*map(ctx.mode.padded, (grad_out.shape, q.shape, k.shape, v.shape)))
        # Reads Q, K, V, the output, its gradient and the log-sum-exp; writes Q's, K's and V's gradients.
        n_bytes = 2 * sum(map(nbytes, (q, k, v))) + ctx.out_bytes + nbytes(grad_out) + lse
        ctx.mode.roofline.add("attention (backward)", "attention", n_flops, n_bytes)
        return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention without a mask, dropout or causality (as the denoisers
    call it) to _FlashAttention, whose counts go to `roofline`; other calls (a text encoder's causal
    mask) run and are counted as the math path's ops. With `head_multiple` its FLOPs are those of a
    kernel that pads each head to a multiple of that many (64: SD1.5's 40-wide heads cost as 64)."""

    def __init__(self, roofline: Roofline, head_multiple: int = 1):
        super().__init__()
        self.roofline, self.head_multiple = roofline, head_multiple

    def padded(self, shape):
        m = self.head_multiple
        return (*shape[:-1], -(-shape[-1] // m) * m)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = len(args) == 3 and not any(kwargs.get(k) for k in ("attn_mask", "dropout_p", "is_causal", "enable_gqa"))
        if func is F.scaled_dot_product_attention and plain:
            return _FlashAttention.apply(self, *args)
        return func(*args, **kwargs)


def by_kind(roofline: Roofline) -> dict[str, dict]:
    """{kind: {flops, bytes, bound_ms, memory_bound_ms}}: memory_bound_ms is the part of bound_ms
    from ops whose bytes, not their FLOPs, set their time."""
    out = collections.defaultdict(lambda: {"flops": 0, "bytes": 0, "bound_ms": 0.0, "memory_bound_ms": 0.0})
    for (_, kind), (_, n_flops, n_bytes, seconds) in roofline.ops.items():
        row = out[kind if kind in (*COMPUTE, LORA) else MEMORY]
        row["flops"] += n_flops
        row["bytes"] += n_bytes
        row["bound_ms"] += seconds * 1e3
        if n_bytes / roofline.byte_rate >= n_flops / roofline.flop_rate:
            row["memory_bound_ms"] += seconds * 1e3
    return dict(out)


def count(bench, peak_tflops: float, bandwidth_gbs: float, head_multiple: int = 1) -> Roofline:
    """One step of a bench.train_step Bench, counted (attention as fused kernels run it, on meta).
    Before the Bench's first step: on meta it sets the LoRA weights' dtype, and the optimizer's
    state follows the weights'."""
    if bench.device.type == "meta":
        # No autocast on meta: the LoRA weights (float32 for their updates) would pull every LoRA
        # product, and peft's casts of its inputs, into float32. Autocast runs them in the compute dtype.
        for p in bench.params:
            p.data = p.data.to(bench.dtype)
    roofline = Roofline(peak_tflops, bandwidth_gbs, bench.params)
    with FusedAttention(roofline, head_multiple) if bench.device.type == "meta" else contextlib.nullcontext(), roofline:
        bench.step()
    return roofline


def measured_kinds(path: str, run: str | None) -> dict:
    """The kernel breakdown (ms per step by kind) of one run in a bench JSON: one run's, or
    bench.table's {"results": [...]}; `run` picks by name where it holds several."""
    data = json.loads(Path(path).read_text())
    rows = data["results"] if isinstance(data, dict) and "results" in data else [data] if isinstance(data, dict) else data
    names = [r.get("name") for r in rows]
    if run is None and len(rows) == 1:
        run = names[0]
    found = [r for r in rows if r.get("name") == run]
    if not found:
        raise ValueError(f"{path}: no run named {run!r} (it holds: {', '.join(map(str, names))})")
    breakdown = found[0].get("kernels")
    if not breakdown or "rows" not in breakdown:
        raise ValueError(f"{path}: run {run!r} has no kernel breakdown (bench.train_step --kernels makes one)")
    ms = collections.Counter()
    for row in breakdown["rows"]:
        ms[row["kind"] if row["kind"] in COMPUTE else MEMORY] += row["ms"]
    return {"run": run, "kinds": dict(ms), "kernel_ms": breakdown["kernel_ms"],
            "step_ms": found[0].get("step_ms_pipelined") or found[0].get("step_ms")}


def table(result: dict) -> str:
    kinds, measured = result["kinds"], result.get("measured")
    got = measured["kinds"] if measured else {}
    lines = ["| kind | TFLOP | GB moved | floor ms | of it memory-bound | measured ms | measured / floor |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def line(name, row, ms=None):
        ratio = f"{ms / row['bound_ms']:.1f}×" if ms and row["bound_ms"] else ""
        lines.append(f"| {name} | {row['flops'] / 1e12:.3g} | {row['bytes'] / 1e9:.3g} | {row['bound_ms']:.2f} "
                     f"| {row['memory_bound_ms']:.2f} | {'' if ms is None else f'{ms:.2f}'} | {ratio} |")

    empty = {"flops": 0, "bytes": 0, "bound_ms": 0.0, "memory_bound_ms": 0.0}
    matmul = {k: kinds.get("matmul", empty)[k] + kinds.get(LORA, empty)[k] for k in empty}
    for kind in ("convolution", "matmul", "attention"):
        line(kind, matmul if kind == "matmul" else kinds.get(kind, empty), got.get(kind) if measured else None)
        if kind == "matmul" and LORA in kinds:
            line("  of which LoRA", kinds[LORA])
    line(MEMORY + ", unfused", kinds.get(MEMORY, empty), got.get(MEMORY) if measured else None)
    total = {k: sum(row[k] for row in kinds.values()) for k in empty}
    line("all kernels", total, measured["kernel_ms"] if measured else None)
    return "\n".join(lines)


def summary(result: dict) -> str:
    """What the floor means for MFU, in two lines."""
    kinds, peak = result["kinds"], result["datasheet_tflops"]
    floor = sum(row["bound_ms"] for row in kinds.values())
    gemm = sum(row["bound_ms"] for kind, row in kinds.items() if kind != MEMORY)
    mfu = lambda ms: result["model_flops"] / (ms / 1e3) / (peak * 1e12)  # noqa: E731
    text = (f"At the floor the step takes {floor:.1f} ms: {mfu(floor):.1%} MFU of the datasheet's {peak:g} TFLOP/s "
            f"({result['model_flops'] / 1e12:.3g} model TFLOP). With the memory-bound work fused away entirely, "
            f"{gemm:.1f} ms: {mfu(gemm):.1%}.")
    if result.get("measured"):
        step = result["measured"]["step_ms"]
        text += f" Measured ({result['measured']['run']}): {step:.1f} ms a step, {mfu(step):.1%}."
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0],
                                epilog="Other arguments go to bench.train_step (--arch, --res, --bs, --precision, ...).")
    p.add_argument("--card", default="H100 SXM", help=f"whose datasheet: {', '.join(hardware.BANDWIDTH_GBS)}")
    p.add_argument("--peak-tflops", type=float, help="the GEMM rate (default: the card's datasheet peak "
                   "for --precision; the H100's measured ceiling is 801 for bf16)")
    p.add_argument("--bandwidth-gbs", type=float, help="the memory bandwidth (default: the card's datasheet)")
    p.add_argument("--head-multiple", type=int, default=1,
                   help="count attention's FLOPs as a kernel that pads heads to a multiple of this does (64, say)")
    p.add_argument("--measured", help="a bench JSON with a --kernels breakdown to set beside the floor")
    p.add_argument("--run", help="which run of --measured (its name)")
    p.add_argument("--json", dest="out", help="write the result here")
    args, rest = p.parse_known_args(argv)
    if "--device" in rest:
        p.error("--device: the roofline always counts on meta")
    if args.head_multiple < 1:
        p.error(f"--head-multiple: expected a whole number of at least 1, got {args.head_multiple}")
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--bandwidth-gbs", args.bandwidth_gbs)):
        if value is not None and not value > 0:
            p.error(f"{flag}: expected a rate above 0, got {value:g}")
    step_args = train_step.parse([*rest, "--device", "meta"])
    try:
        peaks, bandwidth = hardware.card(args.card)
    except ValueError as err:
        p.error(f"--card: {err}")
    key = step_args.precision  # bf16, fp16 or fp32, as the datasheet table names them
    if key not in peaks:
        p.error(f"--card {args.card}: no {step_args.precision} peak in the datasheet table")
    measured = None
    if args.measured:
        try:
            measured = measured_kinds(args.measured, args.run)
        except (OSError, ValueError, KeyError, TypeError) as err:
            p.error(f"--measured: {err}")

    bench = train_step.Bench(step_args)
    peak, bandwidth = args.peak_tflops or peaks[key], args.bandwidth_gbs or bandwidth
    roofline = count(bench, peak, bandwidth, args.head_multiple)  # first: it sets the LoRA weights' dtype
    model_flops = train_step.count_model_flops(bench)["flops_per_step"]
    result = {"name": step_args.name, "card": args.card, "peak_tflops": peak, "datasheet_tflops": peaks[key],
              "bandwidth_gbs": bandwidth, "head_multiple": args.head_multiple, "model_flops": model_flops,
              "kinds": by_kind(roofline), "measured": measured,
              "ops": [{"op": op, "kind": kind, "calls": n, "flops": f, "bytes": b, "bound_ms": s * 1e3}
                      for (op, kind), (n, f, b, s) in sorted(roofline.ops.items(), key=lambda item: -item[1][3])]}
    print(f"{result['name']} on {args.card} ({peak:g} TFLOP/s, {bandwidth:g} GB/s):")
    print(table(result))
    print(summary(result))
    if args.out:
        io.write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
