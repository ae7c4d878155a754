"""Optimizers and LR schedules by name."""

import torch
from diffusers.optimization import get_scheduler

from sdtune.errors import UserError


def optimizer(name: str, params, lr: float, weight_decay: float, device):
    if name == "adamw":
        # The fused update is one kernel for all parameters, on CUDA and on CPU alike, and needs
        # no host sync (the per-tensor path reads each step counter back with .item()). The meta
        # device, where the bench counts FLOPs, has no fused kernel.
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise UserError(f"train.optimizer: adamw8bit needs bitsandbytes ({err})") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"train.optimizer: unknown optimizer {name!r}")


def scheduler(name: str, optim, warmup_steps: int, total_steps: int):
    return get_scheduler(name, optim, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
