"""PNG charts for the profile report.

Uses matplotlib's object API (Figure + Agg canvas) rather than pyplot: no global figure state and
no display backend to pick, so it runs the same headless, in threads and in tests.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sdtune.io import atomic_path


def _save(fig: Figure, out_png) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        # The temporary name has no .png suffix, so the format is given explicitly.
        fig.savefig(tmp, format="png", dpi=120)


def _stacked_bars(labels, parts: dict, out_png, title: str, xlabel: str, colors=None, peaks=(), notes=()) -> None:
    """One horizontal bar per label, stacked from `parts` ({name: a width per label}), first label
    on top; `peaks` ((bar index, value), ...) are drawn as black ticks, `notes` ((bar index, text),
    ...) written after their bars."""
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(labels)))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for name, widths in parts.items():
        ax.barh(labels, widths, left=left, label=name, color=(colors or {}).get(name))
        left = [a + b for a, b in zip(left, widths)]
    if peaks:
        ax.scatter([v for _, v in peaks], [i for i, _ in peaks], marker="|", s=400, color="black", label="peak allocated")
    for i, text in notes:
        ax.annotate(text, (left[i], i), xytext=(4, 0), textcoords="offset points", va="center", fontsize="x-small")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # tick labels that do not run together
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()  # first bar on top, as listed
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, out_png)


def phase_chart(configs: dict, out_png, title: str = "Time per training step") -> None:
    """Stacked horizontal bars of median phase times, one bar per config.

    `configs` is a {config label: PhaseTimer.summary()} mapping (any label, "phases" too). Medians,
    as the tables beside the chart print them: one stalled step would stretch a mean's bar. The
    rest of the median step is drawn as "untimed".
    """
    names = list(dict.fromkeys(n for s in configs.values() for n in s["phases"]))
    parts = {name: [s["phases"].get(name, {}).get("median_ms", 0.0) for s in configs.values()] for name in names}
    timed = [sum(widths) for widths in zip(*parts.values())] or [0.0] * len(configs)
    parts["untimed"] = [max(0.0, s["step_median_ms"] - t) for s, t in zip(configs.values(), timed)]
    _stacked_bars(list(configs), parts, out_png, title, "ms (median over measured steps)",
                  colors={"untimed": "lightgrey"})


def number(v: float) -> str:
    """A bar's value as people read it: 1,181 ms, not 1.18e+03."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def bar_chart(rows, key: str, out_png, title: str, label: str = "name", fmt=number) -> None:
    """One horizontal bar per matrix cell, first on top: `row[key]` against `row[label]`, each bar
    and the axis labelled by `fmt(value)`. A missing value shows as "n/a".
    Horizontal, as the stacked charts are, so long cell names sit beside their own bars."""
    labels = [str(r.get(label, i)) for i, r in enumerate(rows)]
    values = [r.get(key) for r in rows]
    fig = Figure(figsize=(8, 1.2 + 0.4 * max(len(rows), 1)))
    ax = fig.add_subplot()
    if not rows:  # every cell failed: say so rather than draw empty axes
        ax.text(0.5, 0.5, "no cell ran (see the failed cells in the table)", ha="center", va="center")
        ax.set_axis_off()
    else:
        bars = ax.barh(labels, [v or 0 for v in values])
        ax.bar_label(bars, labels=["n/a" if v is None else fmt(v) for v in values], fontsize="small", padding=2)
        ax.xaxis.set_major_formatter(lambda v, _: fmt(v))  # the axis in the bars' units (e.g. %)
        ax.margins(x=0.15)  # room for the last bar's label
        ax.invert_yaxis()
        ax.set_xlabel(key)
    ax.set_title(title)
    _save(fig, out_png)


MEMORY_PARTS = {"weights": "weights_bytes", "encoders": "encoder_weights_bytes", "gradients": "gradients_bytes",
                "optimizer state": "optimizer_bytes", "kept for backward": "kept_for_backward_bytes"}


def memory_chart(cells, out_png, title: str = "Memory of a training step") -> None:
    """Stacked horizontal bars of each cell's memory by part (counted from the tensors), in MiB or
    GiB, with the measured peak as a black tick where it is a count of tensors too (CUDA's allocated
    peak; a CPU's resident set also holds the interpreter and its libraries). A compiled step's
    memory kept for the backward is not counted (the count runs the step eagerly): said at its bar,
    which would otherwise read as keeping nothing."""
    peaks = [(i, c["memory"]["allocated_bytes"]) for i, c in enumerate(cells) if "allocated_bytes" in c["memory"]]
    largest = max([sum(c["memory"].get(k) or 0 for k in MEMORY_PARTS.values()) for c in cells]
                  + [v for _, v in peaks] + [0])
    unit, scale = ("GiB", 2**30) if largest > 4 * 2**30 else ("MiB", 2**20)
    parts = {name: [(c["memory"].get(key) or 0) / scale for c in cells]
             for name, key in MEMORY_PARTS.items() if any(c["memory"].get(key) for c in cells)}
    uncounted = [i for i, c in enumerate(cells) if c["memory"].get("kept_for_backward_bytes", 0) is None]
    _stacked_bars([c["name"] for c in cells], parts, out_png, title, unit, peaks=[(i, v / scale) for i, v in peaks],
                  notes=[(i, "kept for backward: not counted (compiled)") for i in uncounted])
