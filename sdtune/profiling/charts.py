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


def phase_chart(summary: dict, out_png, title: str = "Time per training step") -> None:
    """Stacked horizontal bars of mean phase times, one bar per config.

    `summary` is one PhaseTimer.summary() or a {config label: summary} mapping. Means are stacked
    because they add up to the mean step; the rest of the step is drawn as "untimed".
    """
    configs = {"run": summary} if "phases" in summary else summary
    names = list(dict.fromkeys(n for s in configs.values() for n in s["phases"]))
    labels = list(configs)
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(labels)))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for name in names + ["untimed"]:
        widths = []
        for i, s in enumerate(configs.values()):
            if name == "untimed":
                widths.append(max(0.0, s["step_mean_ms"] - left[i]))
            else:
                widths.append(s["phases"].get(name, {}).get("mean_ms", 0.0))
        ax.barh(labels, widths, left=left, label=name, color="lightgrey" if name == "untimed" else None)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms (mean over measured steps)")
    ax.set_title(title)
    ax.invert_yaxis()  # first config on top, as listed
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, out_png)


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
    labels = [c["name"] for c in cells]
    parts = {name: key for name, key in MEMORY_PARTS.items() if any(c["memory"].get(key) for c in cells)}
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(labels)))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for name, key in parts.items():
        widths = [(c["memory"].get(key) or 0) / 2**20 for c in cells]
        ax.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    peaks = [(i, c["memory"]["allocated_bytes"] / 2**20) for i, c in enumerate(cells) if "allocated_bytes" in c["memory"]]
    if peaks:
        ax.scatter([p for _, p in peaks], [i for i, _ in peaks], marker="|", s=400, color="black", label="peak allocated")
    ax.set_xlabel("MiB")
    ax.set_title(title)
    ax.invert_yaxis()  # first cell on top, as listed
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, out_png)
