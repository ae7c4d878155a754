"""train: LoRA fine-tune the denoiser from cache/ only.

Writes models/lora/ (pytorch_lora_weights.safetensors in diffusers keys, with provenance
metadata), checkpoints/ (kept between runs: a rerun resumes), reports/train.json and the
loss curve (reports/train_loss.csv, reports/train_loss.png) and, when train.validate_every is
set, validation images (reports/validation/step-*.png).
"""

from pathlib import Path

from sdtune import families, params as params_lib, runtime
from sdtune.errors import UserError, main_guard
from sdtune.train import checkpoint, loop, outputs, validate as validate_lib

CACHE, LORA_DIR, CKPT, VALIDATION = "cache", "models/lora", "checkpoints", "reports/validation"


def wandb_logger(params):
    """W&B is imported only when it is on; the config holds params, never secrets.

    Returns (run, log a metrics row, log an image file)."""
    if params.train.wandb == "disabled":
        return None, None, None
    import wandb

    run = wandb.init(project=params.train.wandb_project, mode=params.train.wandb,
                     config=runtime.wandb_config(params))
    return (run, lambda row: wandb.log(row, step=row["step"]),
            lambda path, step: wandb.log({"validation": wandb.Image(str(path))}, step=step))


def check_device(params) -> None:
    """A real model on the CPU only when asked for: `auto` falling back to the CPU (a VM whose GPU
    driver failed) would otherwise spend days on a run that takes an hour on an L4."""
    if (params.base.device == "auto" and params.model.id != "tiny"
            and runtime.device(params.base.device).type == "cpu"):
        raise UserError(f"base.device: auto found no CUDA GPU; training {params.model.id} on the CPU would "
                        f"take days. Check nvidia-smi, or set base.device: cpu to train there anyway")


@main_guard
def main():
    params = params_lib.load()
    families.of(params)  # sizes and a checkpoint of another family stop here, as in the other stages
    check_device(params)
    runtime.check_wandb(params.train.wandb)
    with runtime.stage("train"):
        run = loop.setup(params, CACHE)
        wb, log, log_image = wandb_logger(params) if run.accelerator.is_main_process else (None, None, None)
        Path(VALIDATION).mkdir(parents=True, exist_ok=True)  # a DVC output even when validation is off
        validate = validate_lib.Validator(params, run.family, VALIDATION, log_image)
        # The lineage of what this run starts from: code committed or data changed during hours of
        # training is not what it trained with.
        meta = runtime.provenance(params) if run.accelerator.is_main_process else None  # rank 0 writes the LoRA
        stats = loop.train(run, CKPT, CACHE, log=log, validate=validate, on_start=validate.drop_after)
        if run.accelerator.is_main_process:
            meta["base_commit"] = run.base_revision  # what train() resolved the revision to, and resumed by
            outputs.write_lora(LORA_DIR, run, loop.final_lora(run), meta)
            outputs.write_reports(run, stats)
            checkpoint.discard(CKPT, stats["steps"])  # it served a failure after the loop; none came
        if wb is not None:
            wb.finish()
    if run.accelerator.is_main_process:
        print(f"train: {stats['steps']} steps, final loss {stats['final_loss']:.4f} (mean of the last "
              f"{stats['final_loss_steps']} steps), LoRA in {LORA_DIR}/")


if __name__ == "__main__":
    main()
