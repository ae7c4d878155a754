"""LoRA on the denoiser through peft, and its state dict in diffusers' keys."""

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from diffusers.utils import convert_state_dict_to_diffusers

from sdtune.errors import UserError

INIT = {"gaussian": "gaussian", "default": True, "pissa": "pissa", "olora": "olora"}
# Inits that take their start B0, A0 out of the base weights (W_res = W - s·B0·A0). Loaders only
# have the original W, so these publish a plain LoRA instead (published_config, plain_lora).
MUTATES_BASE = {"pissa", "olora"}
# Where add() keeps B0, A0 on the denoiser (peft keys, on the host) for the export.
INITIAL = "_sdtune_initial_lora"


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
    if lora.init in MUTATES_BASE:
        setattr(denoiser, INITIAL, {k: v.detach().cpu().clone() for k, v in peft_state(denoiser).items()})
    return cfg


def skip_input_casts(denoiser, lora) -> int:
    """For a denoiser that runs only under autocast (mixed precision): peft casts each LoRA layer's
    input to the adapter's float32, and autocast casts it straight back to bf16/fp16 for the
    matmul. That is two copies of the activation per layer in the forward and two in the backward,
    for the same numbers to the bit (peft's own 4-bit layers skip the cast under autocast too).
    Not with DoRA, which computes its weight norm in the input's dtype (float32 with the cast), nor
    with LoRA dropout, whose 1/(1-p) scale would be rounded to bf16. Returns how many layers skip it."""
    if lora.use_dora or lora.dropout:
        return 0
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def published_config(lora, default_targets) -> LoraConfig:
    """The config of the file we publish: for PiSSA/OLoRA the plain LoRA of twice the rank that
    plain_lora writes, with alpha doubled too so that the scaling alpha/r is unchanged (no rslora
    here), and an init loaders must not re-run on the original weights."""
    cfg = config(lora, default_targets)
    if lora.init in MUTATES_BASE:
        cfg.r, cfg.lora_alpha, cfg.init_lora_weights = 2 * cfg.r, 2 * cfg.lora_alpha, True
    return cfg


def plain_lora(state, initial):
    """PiSSA/OLoRA's trained change relative to the original W: W_res + s·B·A - W = s·(B·A - B0·A0)
    = s·[B, -B0]·[A; A0], a LoRA of rank 2r on W itself. The conversion peft's
    save_pretrained(path_initial_model_for_weight_conversion=...) does, which works on a PeftModel
    only. Other tensors (DoRA's magnitude, set from W_res + s·B0·A0 = W) stay as they are."""
    out = dict(state)
    for key, start in initial.items():
        if ".lora_A." in key:
            out[key] = torch.cat([state[key], start.to(state[key])], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([state[key], -start.to(state[key])], dim=1)
    return out


def trainable(denoiser):
    return [p for p in denoiser.parameters() if p.requires_grad]


def peft_state(denoiser):
    """The adapter's tensors in peft's keys (what checkpoints store)."""
    return get_peft_model_state_dict(denoiser)


def diffusers_state(denoiser):
    """The adapter to publish in diffusers' keys (what pipeline.load_lora_weights reads): for
    PiSSA/OLoRA the plain LoRA that applies to the original base weights."""
    state = get_peft_model_state_dict(denoiser)
    if hasattr(denoiser, INITIAL):
        state = plain_lora(state, getattr(denoiser, INITIAL))
    return convert_state_dict_to_diffusers(state)
