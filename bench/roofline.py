"""The least time a training step could take on a card, kind of kernel by kind.

    python -m bench.roofline --card "H100 SXM" --peak-tflops 801 --arch sd15 --res 512 --bs 16
    python -m bench.roofline ... --measured docs/results/h100-2026-11-26-second-call.json --run sd15-bs16-bf16-compile

One step of the real-size model is counted on the meta device (seconds on a laptop, no GPU), each
op held to its FLOPs at the card's GEMM rate, its bytes at the card's memory bandwidth, or (fused
attention) its exponentials at the card's special-function units' rate
(sdtune.profiling.roofline says how). Summed by kind, beside a measured kernel breakdown
(bench.train_step --kernels), it says which kind runs furthest from what the card allows.

On meta, attention is counted as the fused kernels run it; kernels tiled for 64-wide heads do more
than the FLOPs counted for SD1.5's 40-wide ones, and --head-multiple 64 counts them as such a
kernel does. Meta has no autocast, so the step runs in the compute dtype throughout, LoRA's
weights included, as autocast runs the matmuls: the step without autocast (bench.train_step
--no-autocast). --cuda-autocast counts it with CUDA autocast's casts instead (norms and softmax in
float32, sdtune.profiling.roofline.CudaAutocast), as the eager step runs on a GPU by default.

The first argument not known here and all that follow go to bench.train_step (its --arch,
--res, --bs, --precision, --rank, --baseline, ...), which builds the step; --device is always meta.
"""

import argparse
import json
import sys
from pathlib import Path

from bench import train_step
from sdtune import io
from sdtune.profiling import hardware, roofline

def count(bench, peak_tflops: float, bandwidth_gbs: float, head_multiple: int = 1,
          exp_tera_per_s: float | None = None, cuda_autocast: bool = False) -> roofline.Roofline:
    """One step of a bench.train_step Bench, counted (attention as fused kernels run it, on meta).
    Before the Bench's first step: on meta it sets the LoRA weights' dtype, and the optimizer's
    state follows the weights'."""
    meta = bench.device.type == "meta"
    if meta:
        # No autocast on meta: the LoRA weights (float32 for their updates) would pull every LoRA
        # product, and peft's casts of its inputs, into float32. Autocast runs them in the compute dtype.
        for p in bench.params:
            p.data = p.data.to(bench.dtype)
    return roofline.count(bench.step, peak_tflops=peak_tflops, bandwidth_gbs=bandwidth_gbs, lora_params=bench.params,
                          fused_attention=meta, head_multiple=head_multiple, exp_tera_per_s=exp_tera_per_s,
                          cuda_autocast=bench.dtype if cuda_autocast else None)


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
    return {"run": run, "kinds": roofline.measured_by_kind(breakdown["rows"]), "kernel_ms": breakdown["kernel_ms"],
            "step_ms": found[0].get("step_ms"), "step_ms_pipelined": found[0].get("step_ms_pipelined")}


def summary(result: dict) -> str:
    """What the floor means for MFU, fused and unfused, and what attention's exponentials cost."""
    kinds, peak = result["kinds"], result["datasheet_tflops"]
    floor = sum(row["bound_ms"] for row in kinds.values())
    memory = roofline.EMPTY | kinds.get(roofline.MEMORY, {})
    fused = floor - memory["bound_ms"] + memory["fused_ms"]
    mfu = lambda ms: result["model_flops"] / (ms / 1e3) / (peak * 1e12)  # noqa: E731
    text = (f"At the floor the step takes {floor:.1f} ms: {mfu(floor):.1%} MFU of the datasheet's {peak:g} TFLOP/s "
            f"({result['model_flops'] / 1e12:.3g} model TFLOP). With the memory-bound work fused between "
            f"GEMM-like ops ({memory['fused_bytes'] / 1e9:.3g} GB moved, not {memory['bytes'] / 1e9:.3g}), "
            f"{fused:.1f} ms: {mfu(fused):.1%}.")
    if by_norm := memory.get("fused_by_norm"):
        text += " Fused so, " + ", ".join(f"the windows with a {name} move {moved / 1e9:.3g} GB" if name != "other" else
                                         f"the rest {moved / 1e9:.3g} GB" for name, moved in sorted(by_norm.items())) + "."
    text += roofline.exp_note(kinds, result["exp_tera_per_s"])
    text += f" Autograd keeps {result['saved_bytes'] / 2**30:.3g} GiB for the backward (the weights aside)."
    if saved := result.get("compiled_saved"):
        text += (f" Compiled (AOTAutograd's min-cut partition, as inductor splits the step), the forward keeps "
                 f"{saved['bytes'] / 2**30:.3g} GiB, {saved['float32_bytes'] / 2**30:.3g} GiB of it float32.")
    if result.get("measured"):
        # The synced median is what bench.table's MFU divides by; the pipelined step is what training sees.
        m = result["measured"]
        text += f" Measured ({m['run']}): {m['step_ms']:.1f} ms a step, {mfu(m['step_ms']):.1%}"
        if m.get("step_ms_pipelined"):
            text += f"; pipelined {m['step_ms_pipelined']:.1f} ms, {mfu(m['step_ms_pipelined']):.1%}"
        text += "."
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0],
                                epilog="Other arguments go to bench.train_step (--arch, --res, --bs, --precision, ...).")
    p.add_argument("--card", default="H100 SXM", help=f"whose datasheet: {', '.join(hardware.BANDWIDTH_GBS)}")
    p.add_argument("--peak-tflops", type=float, help="the GEMM rate (default: the card's datasheet peak "
                   "for --precision; the H100's measured ceiling is 801 for bf16)")
    p.add_argument("--bandwidth-gbs", type=float, help="the memory bandwidth (default: the card's datasheet)")
    p.add_argument("--exp-tera", type=float, help="exponentials per second, ×10¹², of the special-function units "
                   "(default: the card's: SMs × 16 a clock × the clock of its tensor peak)")
    p.add_argument("--head-multiple", type=int, default=1,
                   help="count attention's FLOPs as a kernel that pads heads to a multiple of this does (64, say)")
    p.add_argument("--cuda-autocast", action="store_true",
                   help="count the step as it runs under CUDA autocast: norms and softmax in float32, their "
                        "inputs and outputs cast (default: the compute dtype throughout, as --no-autocast runs)")
    p.add_argument("--compiled", action="store_true",
                   help="also trace the denoiser as torch.compile would and sum what its forward keeps for the "
                        "backward (AOTAutograd's min-cut partition, as inductor splits it; a minute at real size)")
    p.add_argument("--measured", help="a bench JSON with a --kernels breakdown to set beside the floor")
    p.add_argument("--run", help="which run of --measured (its name)")
    p.add_argument("--json", dest="out", help="write the result here")
    args, rest = p.parse_known_args(argv)
    if "--device" in rest:
        p.error("--device: the roofline always counts on meta")
    if args.head_multiple < 1:
        p.error(f"--head-multiple: expected a whole number of at least 1, got {args.head_multiple}")
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--bandwidth-gbs", args.bandwidth_gbs),
                        ("--exp-tera", args.exp_tera)):
        if value is not None and not value > 0:
            p.error(f"{flag}: expected a rate above 0, got {value:g}")
    attention = argparse.ArgumentParser(add_help=False)
    attention.add_argument("--attention")  # train_step's option, read here as its parser would
    if attention.parse_known_args(rest)[0].attention == "fa4":
        p.error("--attention fa4: the roofline holds every fused attention kernel to one floor (count with "
                "--attention flash); FA4's own time is bench.train_step's, on a GPU")
    step_args = train_step.parse([*rest, "--device", "meta"], prog=p.prog)
    try:
        peaks, bandwidth, exp_rate = hardware.card(args.card)
    except ValueError as err:
        p.error(f"--card: {err}")
    if args.compiled and step_args.baseline:
        p.error("--compiled: the baseline is the diffusers example's eager step")
    if args.cuda_autocast and (step_args.precision == "fp32" or step_args.no_autocast):
        p.error("--cuda-autocast: autocast is for --precision bf16 or fp16, without --no-autocast")
    if step_args.precision not in peaks:  # bf16, fp16 or fp32, as the datasheet table names them
        p.error(f"--card {args.card}: no {step_args.precision} peak in the datasheet table")
    measured = None
    if args.measured:
        try:
            measured = measured_kinds(args.measured, args.run)
        except (OSError, ValueError, KeyError, TypeError) as err:
            p.error(f"--measured: {err}")

    bench = train_step.Bench(step_args)
    datasheet = peaks[step_args.precision]
    peak, bandwidth, exp_rate = args.peak_tflops or datasheet, args.bandwidth_gbs or bandwidth, args.exp_tera or exp_rate
    counted = count(bench, peak, bandwidth, args.head_multiple, exp_rate, args.cuda_autocast)  # first: it sets the LoRA weights' dtype
    model_flops = train_step.count_model_flops(bench)["flops_per_step"]
    result = {"name": step_args.name, "card": args.card, "peak_tflops": peak, "datasheet_tflops": datasheet,
              "bandwidth_gbs": bandwidth, "exp_tera_per_s": exp_rate, "head_multiple": args.head_multiple,
              "cuda_autocast": args.cuda_autocast, "model_flops": model_flops, "saved_bytes": counted.saved_bytes,
              "kinds": roofline.by_kind(counted), "measured": measured,
              "ops": [{"op": op, "kind": kind, "calls": row["calls"], "flops": row["flops"], "bytes": row["bytes"],
                       "exps": row["exps"], "bound_ms": row["bound_seconds"] * 1e3, "serial_ms": row["serial_seconds"] * 1e3}
                      for (op, kind), row in sorted(counted.ops.items(), key=lambda item: -item[1]["bound_seconds"])]}
    if args.compiled:
        noisy, t, _ = bench._noised(bench.latents)
        result["compiled_saved"] = roofline.compiled_saved(
            bench.model, **{bench.arch.sample_arg: noisy, "timestep": t}, **bench.cond,
            cuda_autocast=bench.dtype if args.cuda_autocast else None)
    print(f"{result['name']} on {args.card} ({peak:g} TFLOP/s, {bandwidth:g} GB/s, {exp_rate:.3g} ×10¹² exp/s):")
    print(roofline.table(result["kinds"], measured and measured["kinds"], measured and measured["kernel_ms"]))
    print(summary(result))
    if args.out:
        io.write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
