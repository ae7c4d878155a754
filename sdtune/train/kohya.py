"""The LoRA in kohya sd-scripts keys, the format AUTOMATIC1111's webui and ComfyUI load.

diffusers (our file)                                    kohya
unet.down_blocks.1.attentions.0.transformer_blocks.0    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0
  .attn1.to_q.lora_A.weight      (or .lora.down.weight)   _attn1_to_q.lora_down.weight
  .attn1.to_q.lora_B.weight      (or .lora.up.weight)     _attn1_to_q.lora_up.weight
  (alpha: one value, in the adapter config)               _attn1_to_q.alpha   (a scalar per module)

The tensors are the same; only the names change, and the scale alpha/rank moves from the
adapter config into the file. kohya trains SD 1.x/2.x on diffusers' own UNet, so its module
names are diffusers' with every "." flattened to "_". (SDXL kohya files use the sgm block
names, input_blocks_4_1_..., which this module does not write.)

diffusers has `convert_state_dict_to_kohya`, but it writes alpha = rank (scale 1, wrong for
any alpha != rank) and has no inverse that gives our keys back, so the mapping is written
out here; tests check our names against it and load our file with diffusers' kohya reader.
"""

from pathlib import Path

import torch

from sdtune import families
from sdtune.errors import UserError
from sdtune.families import common

KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
PREFIX, KOHYA_PREFIX = "unet.", "lora_unet_"
# Spellings of a module's two LoRA matrices in diffusers files: peft's (lora_A/B), which our files
# use, and diffusers' older one (lora.down/up). from_kohya gives back the first.
DOWN, UP = ".lora_A.weight", ".lora_B.weight"
SUFFIXES = {DOWN: ".lora_down.weight", ".lora.down.weight": ".lora_down.weight",
            UP: ".lora_up.weight", ".lora.up.weight": ".lora_up.weight"}
# Parts of diffusers UNet module paths that hold a "_" themselves; kohya's flattening loses the
# difference between these and a ".", so from_kohya puts them back from this list.
COMPOUND = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding",
}


def flat(module: str) -> str:
    """A module's name as kohya's keys spell it: dots become underscores."""
    return module.replace(".", "_")


def _dotted(flat: str) -> str:
    """The inverse of flat for diffusers UNet names: rejoin known compounds, the rest are dots."""
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for n in (3, 2, 1):  # the longest compound first (time_emb_proj has three parts)
            word = "_".join(parts[i:i + n])
            if n == 1 or word in COMPOUND:
                out.append(word)
                i += n
                break
    return ".".join(out)


def _split(key: str):
    """(module, kohya suffix) of a diffusers LoRA key; a key we cannot export is one clear line."""
    for suffix, kohya_suffix in SUFFIXES.items():
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], kohya_suffix
    raise UserError(f"kohya export: cannot map LoRA key {key!r}; only the UNet's LoRA "
                    f"down/up matrices are exported (no text encoder, no DoRA)")


def to_kohya(diffusers_state: dict, alpha: float) -> dict:
    """diffusers/peft keys -> kohya keys, with `alpha` as a scalar per module (as kohya stores it)."""
    out = {}
    for key, tensor in diffusers_state.items():
        module, suffix = _split(key)
        name = KOHYA_PREFIX + flat(module)
        if _dotted(flat(module)) != module:
            # Writing it would give a file from_kohya (and A1111's own name mapping) reads wrongly.
            raise UserError(f"kohya export: module name {module!r} does not survive kohya's '.' -> '_' "
                            f"flattening; add its '_' parts to sdtune.train.kohya.COMPOUND")
        out[name + suffix] = tensor
        # float32 like sd-scripts; loaders read it with .item().
        out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def from_kohya(kohya_state: dict) -> tuple[dict, float]:
    """kohya keys -> (diffusers keys, alpha). A module without an .alpha has alpha = its rank
    (sd-scripts' rule); all modules must share one alpha, as our adapters do."""
    state, alphas, ranks = {}, {}, {}
    for key, tensor in kohya_state.items():
        name, _, rest = key.partition(".")
        if not name.startswith(KOHYA_PREFIX) or rest not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise UserError(f"kohya import: unsupported key {key!r}; only lora_unet_* lora_down/lora_up/alpha "
                            f"are read (no text encoder, LoCon/LoHa or DoRA)")
        module = PREFIX + _dotted(name[len(KOHYA_PREFIX):])
        if rest == "alpha":
            alphas[module] = float(tensor.item())
        elif rest == "lora_down.weight":
            state[module + DOWN] = tensor
            ranks[module] = tensor.shape[0]
        else:
            state[module + UP] = tensor
    downs = {k[:-len(DOWN)] for k in state if k.endswith(DOWN)}
    ups = {k[:-len(UP)] for k in state if k.endswith(UP)}
    if not downs or downs != ups:
        raise UserError(f"kohya import: every module needs both lora_down and lora_up; "
                        f"unpaired: {sorted(downs ^ ups)[:3] or 'no LoRA tensors at all'}")
    values = {alphas.get(m, float(r)) for m, r in ranks.items()}
    if len(values) != 1:
        raise UserError(f"kohya import: expected one alpha for every module, found {sorted(values)}")
    return state, values.pop()


def supports(params) -> bool:
    """Whether the train stage can write the kohya file: SD 1.x/2.x UNet names, plain LoRA.
    (SDXL kohya files use sgm block names; DoRA's magnitude has no settled kohya layout.)"""
    return _version(params.model.family) is not None and not params.train.lora.use_dora


def _version(family) -> str | None:
    """ss_base_model_version for a family (the family module's KOHYA_VERSIONS), or None."""
    return families.get(family).KOHYA_VERSIONS.get(family) if family in families.MODULES else None


def kohya_metadata(kohya_state: dict, alpha: float, metadata: dict) -> dict:
    """Our provenance plus the ss_* keys sd-scripts writes and A1111 reads."""
    family = metadata.get("model_family")
    version = _version(family)
    if version is None:
        # A1111 takes a file without ss_base_model_version for SD 1.x: never write one for another family.
        exported = [name for name in families.MODULES if _version(name)]
        raise UserError(f"kohya export: model_family {family!r} is not supported; only {', '.join(exported)}")
    ranks = {t.shape[0] for k, t in kohya_state.items() if k.endswith(".lora_down.weight")}
    # The peft adapter config describes the diffusers file; here alpha lives in the tensors.
    meta = {"format": "pt"} | {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    meta |= {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
             "ss_network_alpha": str(float(alpha)),
             # A1111 reads both to tell SD versions apart.
             "ss_base_model_version": version, "ss_v2": str(version == "sd_v2")}
    return meta


def write_kohya(directory, diffusers_state: dict, alpha: float, metadata: dict) -> Path:
    """Write <directory>/pytorch_lora_weights_kohya.safetensors atomically."""
    tensors = to_kohya(diffusers_state, alpha)
    meta = kohya_metadata(tensors, alpha, metadata)
    return common.write_lora(directory, tensors, meta, name=KOHYA_FILE)
