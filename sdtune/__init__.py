"""sdtune: LoRA fine-tuning of Stable Diffusion as a reproducible, profiled DVC pipeline."""

__version__ = "0.1.0"
