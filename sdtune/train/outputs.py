"""What the train stage publishes: the LoRA file(s) and the training report and curve."""

import csv
import io as _io
from pathlib import Path

from safetensors.torch import load_file

from sdtune import io
from sdtune.train import kohya, lora

REPORT, CURVE_CSV, CURVE_PNG = "reports/train.json", "reports/train_loss.csv", "reports/train_loss.png"


def write_lora(directory, run, state_dict, metadata) -> Path:
    directory = Path(directory)
    cfg = lora.config(run.params.train.lora, run.family.LORA_TARGETS)
    adapter_meta = cfg.to_dict()
    adapter_meta["target_modules"] = sorted(adapter_meta["target_modules"])
    with io.atomic_path(directory) as tmp:
        tmp.mkdir()
        path = run.family.save_lora(tmp, state_dict, metadata, adapter_metadata=adapter_meta)
        if kohya.supports(run.params):  # the same LoRA in the keys AUTOMATIC1111 and ComfyUI read
            kohya.write_kohya(tmp, load_file(path), run.params.train.lora.alpha, metadata)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
