"""Which memory layouts a compiled UNet step runs its convolutions in, read from the graphs
torch.compile traces, on a CPU: whether inductor's layout optimisation takes the forward and the
backward graph, and which convolution backward calls get a gradient cuDNN must first copy.

    python -m bench.layouts --arch sd15 --res 128 --bs 2 --channels-last --group-norm per-channel

Inductor lays a graph out in channels-last memory itself only when its heuristics say so
(GraphLowering.decide_layout_opt). Otherwise every op it cannot lower keeps the strides the
traced graph gave it, which are eager's, and a convolution's backward (an aten call) gets its
gradient in them. cuDNN runs a convolution in channels-last memory when its input or weight is
channels-last, and copies a gradient not dense in that layout first: on a GPU that is a
`direct_copy` kernel of the step's, found here without one. The step is traced on the CPU, whose
convolutions pick their layout by the same rule; the graphs go to no compiler, so nothing is timed.
Layouts do not depend on the size, so a small --res answers for 512².
"""

import argparse
import collections
import logging
import sys

import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.graph import GraphLowering

from bench import archs, train_step
from sdtune.families import common

CONV_BACKWARD = torch.ops.aten.convolution_backward.default


def traced_graphs(bench) -> dict:
    """The forward and backward graphs of one step of `bench`'s denoiser, as inductor would get
    them (its decompositions and partitioner), run eagerly instead of compiled."""
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           decompositions=select_decomp_table(), partition_fn=min_cut_rematerialization_partition)
    common.quiet_dynamo_on_upsamplers()
    torch._dynamo.reset()  # trace afresh: an earlier compile in this process may hold the graphs
    bench.model = torch.compile(bench.model, backend=backend, fullgraph=True)
    bench.step()
    return graphs


def layout_optimised(gm) -> tuple[bool, str]:
    """Inductor's own decision for this graph on a GPU (torch._inductor.config options included),
    and why not, in its words where it logs them. On a CPU with mkldnn it always says yes, so
    mkldnn is off while it decides."""
    said = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: said.append(record.getMessage())
    log = logging.getLogger("torch._inductor.graph")
    kept = log.level, log.propagate, torch.backends.mkldnn.enabled
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = torch.backends.mkldnn.enabled = False  # to our handler only, not torch's stderr
    try:
        on = GraphLowering.decide_layout_opt(gm, is_inference=False)
    finally:
        log.removeHandler(handler)
        log.level, log.propagate, torch.backends.mkldnn.enabled = kept
    if on:
        return True, ""
    has_conv = any(n.target is torch.ops.aten.convolution.default for n in gm.graph.nodes)
    return False, said[-1] if said else ("" if has_conv else "no convolution in the graph")


def _layout(t) -> str:
    # suggest_memory_format, as cuDNN asks it: a 1×1 weight made channels-last reads as such.
    return "channels-last" if torch._prims_common.suggest_memory_format(t) == torch.channels_last else "NCHW"


def _dense_in(t) -> str:
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels-last"
    return "NCHW" if t.is_contiguous() else "neither (a slice)"


def convolution_gradients(gm) -> list[dict]:
    """Each convolution backward call: the layout cuDNN runs it in (channels-last if the input or
    the weight is) and whether its gradient is dense in that layout (if not, cuDNN copies it)."""
    calls = []
    for node in gm.graph.nodes:
        if node.target is not CONV_BACKWARD:
            continue
        grad, x, w = (a.meta["val"] for a in node.args[:3])
        layout = "channels-last" if "channels-last" in (_layout(x), _layout(w)) else "NCHW"
        fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
        calls.append({"shape": tuple(grad.shape), "layout": layout, "grad": _dense_in(grad),
                      "copied": not grad.is_contiguous(memory_format=fmt),
                      "bytes": grad.numel() * grad.element_size()})
    return calls


def report(args, graphs: dict) -> str:
    lines, optimised = [], {}
    for name in ("forward", "backward"):
        on, why = layout_optimised(graphs[name])
        optimised[name] = on
        lines.append(f"{name} graph: inductor's layout optimisation {'on' if on else 'off'}"
                     + (f" ({why})" if why else ""))
    convs = [n.args[1].meta["val"] for n in graphs["forward"].graph.nodes
             if n.target is torch.ops.aten.convolution.default]
    narrowing = sorted({tuple(w.shape) for w in convs if w.size(0) * 2 <= w.size(1) and w.size(2) > 1})
    if narrowing and not optimised["forward"]:  # what "smaller out_channel" means: k×k, in ≥ 2 × out
        lines.append(f"  k×k convolution weights with at least twice as many input channels as output ones: "
                     f"{', '.join(map(str, narrowing))}")
    calls = convolution_gradients(graphs["backward"])
    copied = [c for c in calls if c["copied"]]
    gb = sum(c["bytes"] for c in copied) / 1e9
    if optimised["backward"]:  # inductor then hands convolution_backward its own layouts, not the traced ones
        lines.append(f"convolution backward calls: {len(calls)}; inductor lays their gradients out itself, so "
                     f"the traced layouts below (eager's) do not say which cuDNN copies")
    else:
        lines.append(f"convolution backward calls: {len(calls)}; gradient copied by cuDNN first: {len(copied)} "
                     f"({gb:.4g} GB at {args.res}² bs{args.bs}, read once and written once)")
    kinds = collections.Counter((c["layout"], c["grad"], c["copied"]) for c in calls)
    lines += ["", "| convolution runs in | its gradient dense in | copied | calls |", "|---|---|---|---:|"]
    lines += [f"| {lay} | {grad} | {'yes' if copied else 'no'} | {n} |"
              for (lay, grad, copied), n in sorted(kinds.items())]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__.splitlines()[0],
                                epilog="The other options are bench.train_step's (--arch, --tiny, --channels-last, "
                                       "--group-norm, --upsample, --inductor KEY=VALUE, ...): the step traced is that one, "
                                       "compiled, on the CPU.")
    p.add_argument("--res", type=int, default=128, help="image side in pixels (layouts do not depend on it)")
    p.add_argument("--bs", type=int, default=2)
    a, rest = p.parse_known_args(argv)
    args = train_step.parse([*rest, "--res", str(a.res), "--bs", str(a.bs), "--compile", "--device", "cpu"],
                            prog=p.prog)
    if archs.get(args.arch).family == "sd3":
        p.error(f"--arch: {args.arch}'s transformer has no convolutions to lay out")
    with torch._inductor.config.patch(args.inductor):
        graphs = traced_graphs(train_step.Bench(args))
        print(report(args, graphs))


if __name__ == "__main__":
    sys.exit(main())
