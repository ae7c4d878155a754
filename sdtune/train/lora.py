"""LoRA on the denoiser through peft, and its state dict in diffusers' keys."""

from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from diffusers.utils import convert_state_dict_to_diffusers

from sdtune.errors import UserError

INIT = {"gaussian": "gaussian", "default": True, "pissa": "pissa", "olora": "olora"}


def config(lora, default_targets) -> LoraConfig:
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        init_lora_weights=INIT[lora.init],
        target_modules=list(lora.target_modules or default_targets),
        use_dora=lora.use_dora,
    )


def add(denoiser, lora, default_targets) -> LoraConfig:
    """Freeze the denoiser and attach a trainable LoRA adapter to it."""
    denoiser.requires_grad_(False)
    cfg = config(lora, default_targets)
    try:
        denoiser.add_adapter(cfg)
    except ValueError as err:
        raise UserError(f"train.lora.target_modules: {str(err).splitlines()[0]}") from None
    return cfg


def trainable(denoiser):
    return [p for p in denoiser.parameters() if p.requires_grad]


def peft_state(denoiser):
    """The adapter's tensors in peft's keys (what checkpoints store)."""
    return get_peft_model_state_dict(denoiser)


def diffusers_state(denoiser):
    """The adapter's tensors in diffusers' keys (what pipeline.load_lora_weights reads)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
