"""Validation images during training: fixed prompts and seeds, so steps compare side by side."""

import re
from pathlib import Path

import torch

from sdtune.data import cache as cache_lib
from sdtune.evaluate import generate, report
from sdtune.families import common
from sdtune.train import loop


class Validator:
    """Samples the LoRA being trained every `train.validate_every` steps into reports/validation/.

    The pipeline's encoders and VAE load once, on first use; the denoiser is the one in training.
    The global RNG is saved and restored around sampling, so validating never changes the run.
    With EMA on, the images show the EMA weights (what the published LoRA holds), swapped in for
    the sampling and the trained weights put back after it.
    """

    def __init__(self, params, family, out_dir="reports/validation", log_image=None):
        self.params, self.family, self.out_dir, self.log_image = params, family, Path(out_dir), log_image
        self.pipe = None

    def __call__(self, run):
        acc, p = run.accelerator, self.params.train
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(run.denoiser)
        if self.pipe is None:  # the encoders in the frozen base's dtype
            self.pipe = cache_lib.load_encoders(self.family, self.params.model, acc.device,
                                                loop.weight_dtype(acc.mixed_precision))
            self.pipe.set_progress_bar_config(disable=True)
        self.pipe.register_modules(**{self.family.DENOISER_ATTR: model})
        size = self.params.model.resolution
        weights = run.lora_params
        if run.ema is not None:
            run.ema.store(weights)
            run.ema.copy_to(weights)
        model.eval()
        images = []
        # accelerate hands the prepared denoiser's output back in float32, so the scheduler's step
        # makes the latents float32. Under autocast the next step casts them; without it
        # (train.autocast: false) the bf16 denoiser would meet them, so they go back to its dtype
        # after each step, where a pipeline outside accelerate keeps them.
        extra = {} if p.autocast else {"callback_on_step_end": _latents_in(common.model_dtype(model))}
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []), torch.no_grad(), acc.autocast():
            for prompt in p.validation_prompts:
                for seed in p.validation_seeds:
                    # guidance None: the pipeline's default guidance scale
                    images.append(generate.sample(self.pipe, prompt, seed, steps=p.validation_steps,
                                                  guidance=None, size=size, **extra))
        model.train()
        if run.ema is not None:
            run.ema.restore(weights)
        path = self.out_dir / f"step-{run.step:07d}.png"
        rows = report.row_labels(p.validation_prompts, p.validation_seeds)
        report.grid({f"step {run.step}": images}, path, rows=rows)
        if self.log_image is not None:
            self.log_image(path, run.step)
        return path

    def drop_after(self, step: int) -> None:
        """Remove the images of the steps after `step`, the one the run starts from (0: all).
        The folder persists across DVC runs so that a resumed run keeps the images of the steps
        before it; later ones are the interrupted run's, or another run's."""
        for path in self.out_dir.glob("step-*.png"):
            found = re.fullmatch(r"step-(\d+)\.png", path.name)
            if found and int(found[1]) > step:
                path.unlink()
        for path in self.out_dir.glob(".step-*.tmp"):  # a kill while an image was written: inside a DVC output
            path.unlink()


def _latents_in(dtype):
    """A pipeline's callback_on_step_end that casts each step's latents to `dtype`."""
    def callback(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"].to(dtype)}
    return callback
