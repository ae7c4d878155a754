"""PNG charts for the profile report.

Uses matplotlib's object API (Figure + Agg canvas) rather than pyplot: no global figure state and
no display backend to pick, so it runs the same headless, in threads and in tests.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdtune.io import atomic_path


def _save(fig: Figure, out_png) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        # The temporary name has no .png suffix, so the format is given explicitly.
        fig.savefig(tmp, format="png", dpi=120)


def _stacked_bars(labels, parts: dict, out_png, title: str, xlabel: str, colors=None, peaks=()) -> None:
    """One horizontal bar per label, stacked from `parts` ({name: a width per label}), first label
    on top; `peaks` ((bar index, value), ...) are drawn as black ticks."""
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(labels)))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for name, widths in parts.items():
        ax.barh(labels, widths, left=left, label=name, color=(colors or {}).get(name))
        left = [a + b for a, b in zip(left, widths)]
    if peaks:
        ax.scatter([v for _, v in peaks], [i for i, _ in peaks], marker="|", s=400, color="black", label="peak allocated")
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


def bar_chart(rows, key: str, out_png, title: str, label: str = "name", fmt: str = "{:.3g}") -> None:
    """One bar per matrix cell: `row[key]` against `row[label]`, each bar labelled with `fmt`.
    A missing value shows as "n/a"."""
    labels = [str(r.get(label, i)) for i, r in enumerate(rows)]
    values = [r.get(key) for r in rows]
    fig = Figure(figsize=(max(4, 1 + 0.8 * len(rows)), 4))
    ax = fig.add_subplot()
    bars = ax.bar(labels, [v or 0 for v in values])
    ax.bar_label(bars, labels=["n/a" if v is None else fmt.format(v) for v in values], fontsize="small")
    ax.yaxis.set_major_formatter(lambda v, _: fmt.format(v))  # the axis in the bars' units (e.g. %)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    _save(fig, out_png)


MEMORY_PARTS = {"weights": "weights_bytes", "encoders": "encoder_weights_bytes", "gradients": "gradients_bytes",
                "optimizer state": "optimizer_bytes", "kept for backward": "kept_for_backward_bytes"}


def memory_chart(cells, out_png, title: str = "Memory of a training step") -> None:
    """Stacked horizontal bars of each cell's memory by part (counted from the tensors), in MiB,
    with the measured peak as a black tick where it is a count of tensors too (CUDA's allocated
    peak; a CPU's resident set also holds the interpreter and its libraries)."""
    parts = {name: [(c["memory"].get(key) or 0) / 2**20 for c in cells]
             for name, key in MEMORY_PARTS.items() if any(c["memory"].get(key) for c in cells)}
    peaks = [(i, c["memory"]["allocated_bytes"] / 2**20) for i, c in enumerate(cells) if "allocated_bytes" in c["memory"]]
    _stacked_bars([c["name"] for c in cells], parts, out_png, title, "MiB", peaks=peaks)
