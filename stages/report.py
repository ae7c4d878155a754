"""report: reports/REPORT.md, the run's findings on one page (setup, curve, tables, charts, cost).

With train.wandb on, the same findings also go to W&B, in the training run's project: the
profile and evaluation tables as W&B tables, the pictures as images, REPORT.md as a file.
"""

import shutil
from pathlib import Path

from sdtune import io, params as params_lib, report, runtime
from sdtune.errors import main_guard

OUT = "reports/REPORT.md"
LORA = "models/lora/pytorch_lora_weights.safetensors"
PICTURES = ["reports/train_loss.png", "reports/captions.png", "reports/samples/grid.png",
            "reports/profile/phases.png", "reports/profile/step_ms.png", "reports/profile/mfu.png",
            "reports/profile/memory.png", "reports/profile/inference.png"]


def _mib(n):
    return None if n is None else n / 2**20  # None: not counted (a cell whose floor count failed)


def wandb_report(params) -> None:
    """W&B is imported only when it is on, as in the train stage."""
    if params.train.wandb == "disabled":
        return
    import wandb

    profile, evals = io.read_json("reports/profile.json"), io.read_json("reports/eval.json")
    training = wandb.Table(
        columns=["cell", "precision", "step_ms", "images_per_second", "mfu", "peak_mib", "kept_for_backward_mib",
                 "usd_per_1000_steps"],
        data=[[c["name"], c["mixed_precision"], c["step_ms"], c["images_per_second"], c["mfu"],
               _mib(c["memory"]["peak_bytes"]), _mib(c["memory"].get("kept_for_backward_bytes")),
               c["cost"]["usd_per_1000_steps"]] for c in profile["cells"].values()])
    inference = wandb.Table(
        columns=["cell", "seconds_per_image", "mfu", "peak_mib"],
        data=[[c["name"], c["seconds_per_image"], c["mfu"], c["peak_memory_bytes"] / 2**20]
              for c in profile["inference"].values()])
    metrics = list(next(iter(evals.values())))
    evaluation = wandb.Table(columns=["variant", *metrics],
                             data=[[name, *(rec[m] for m in metrics)] for name, rec in evals.items()])
    run = wandb.init(project=params.train.wandb_project, mode=params.train.wandb, job_type="report",
                     config=runtime.wandb_config(params))
    run.log({"profile/training": training, "profile/inference": inference, "eval": evaluation,
             **{f"pictures/{Path(p).stem}": wandb.Image(p) for p in PICTURES if Path(p).exists()}})
    best = profile["cells"][profile["best"]]
    run.summary.update({"best_cell": best["name"], "best_images_per_second": best["images_per_second"],
                        "best_step_ms": best["step_ms"], "best_mfu": best["mfu"]})
    # A copy, not wandb.save's link: an offline run synced later must hold this report, not a newer one.
    shutil.copy2(OUT, Path(run.dir) / Path(OUT).name)
    run.finish()


@main_guard
def main():
    params = params_lib.load()
    runtime.check_wandb(params.train.wandb)
    text = report.build(params, io.read_safetensors_metadata(LORA))
    io.write_text(OUT, text)
    wandb_report(params)
    print(f"report: {OUT}")


if __name__ == "__main__":
    main()
