"""What the train stage publishes: the LoRA file(s) and the training report and curve."""

import csv
import io as _io
from pathlib import Path

from safetensors.torch import load_file

from sdtune import io
from sdtune.train import kohya, lora, loop

REPORT, CURVE_CSV, CURVE_PNG = "reports/train.json", "reports/train_loss.csv", "reports/train_loss.png"


def write_lora(directory, run, state_dict, metadata) -> Path:
    directory = Path(directory)
    adapter_meta = lora.adapter_metadata(run.params.train.lora, run.family.LORA_TARGETS)
    with io.atomic_path(directory) as tmp:
        tmp.mkdir()
        path = run.family.save_lora(tmp, state_dict, metadata, adapter_metadata=adapter_meta)
        if kohya.supports(run.params):  # the same LoRA in the keys AUTOMATIC1111 and ComfyUI read
            kohya.write_kohya(tmp, load_file(path), adapter_meta["lora_alpha"], metadata)
    return directory / path.name


def write_reports(run, stats) -> None:
    io.write_json(REPORT, stats)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "grad_norm"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(run.history)
    io.write_text(CURVE_CSV, buf.getvalue())
    loss_plot(run.history, CURVE_PNG)


def loss_plot(history, out_png) -> None:
    """Each step's loss, faint, and its running mean over smoothing_window steps: a diffusion
    loss is noisy from step to step (each step draws its own timesteps), the trend is what to read."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    window = loop.smoothing_window(len(losses))
    mean = running_mean(losses, window)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marker = "o" if len(steps) < 3 else None  # a line through one point draws nothing
    ax.plot(steps, losses, lw=0.8, alpha=0.35, marker=marker, label="per step")
    ax.plot(steps, mean, lw=1.8, marker=marker, label=f"mean of the last {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with io.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")


def running_mean(values, window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]
