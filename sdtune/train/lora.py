"""LoRA on the denoiser through peft, and its state dict in diffusers' keys."""

import contextlib
import types

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
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


def unmatched(denoiser, targets) -> list[str]:
    """The names in `targets` that match no module of `denoiser`, by peft's own rule. peft says
    nothing of one while another matches: a typo trained a LoRA on the other modules alone."""
    names = [name for name, _ in denoiser.named_modules()]
    return [t for t in targets
            if not any(check_target_module_exists(LoraConfig(target_modules=[t]), name) for name in names)]


def check(denoiser, lora, targets, key: str = "train.lora") -> None:
    """What peft would take without a word and train wrong: a target matching nothing, and for
    PiSSA/OLoRA a rank above a targeted layer's smaller side (their SVD/QR gives no more vectors
    than that, and the LoRA written said rank r of tensors narrower than r, which no loader takes)."""
    if lora.target_modules and (missing := unmatched(denoiser, lora.target_modules)):
        raise UserError(f"{key}.target_modules: {', '.join(missing)} matches no module of the denoiser")
    if lora.init in MUTATES_BASE:
        targeted = LoraConfig(target_modules=list(targets))
        sides = [min(m.in_features, m.out_features) for name, m in denoiser.named_modules()
                 if isinstance(m, torch.nn.Linear) and check_target_module_exists(targeted, name)]
        if sides and lora.rank > min(sides):
            raise UserError(f"{key}.rank: {lora.rank} is more than {min(sides)}, the smaller side of the narrowest "
                            f"targeted layer; {lora.init} starts from at most that many of its vectors")


def add(denoiser, lora, default_targets) -> LoraConfig:
    """Freeze the denoiser and attach a trainable LoRA adapter to it."""
    denoiser.requires_grad_(False)
    cfg = config(lora, default_targets)
    check(denoiser, lora, cfg.target_modules)
    try:
        denoiser.add_adapter(cfg)
    except ValueError as err:
        reason = str(err).splitlines()[0]
        if lora.init in MUTATES_BASE and "init_lora_weights" in reason:  # peft's message for a conv layer
            raise UserError(f"train.lora.init: {lora.init} starts from linear layers' weights only; "
                            f"train.lora.target_modules names a convolution too ({reason})") from None
        raise UserError(f"train.lora.target_modules: {reason}") from None
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


def _add_product(c, m1, m2, alpha=1.0):
    """c + alpha·m1·m2. Eagerly an addmm into c's own memory: one into a new tensor first copies c
    there (torch's CPU and CUDA kernels alike), a read and a write of the whole output more; not
    addmm_, for which FlopCounterMode has no formula (MFU would lose these FLOPs). Compiled, a
    product and an add: inductor turns either addmm into that copy and a GEMM, but fuses a plain
    add into the kernels around it (the next residual add, the sum of q, k and v's gradients)."""
    if torch.compiler.is_compiling():
        product = m1 @ m2
        return c + (product if alpha == 1 else product * alpha)
    return torch.addmm(c, m1, m2, alpha=alpha, out=c)


class AddmmLora(torch.autograd.Function):
    """A frozen linear layer and its LoRA, y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, with each sum done by a GEMM
    as it writes its output (addmm). peft's forward writes the LoRA's full-width product out,
    scales it and adds it to the base output in kernels of their own, and autograd then scales the
    incoming gradient and sums the two input gradients in more; at SD1.5's batch 16 that is 19 GB a
    step of memory traffic this does without (bench.roofline, docs/benchmarks.md). The same products
    in the same dtype (autocast's, or the weight's), so only the rounding of the sums differs. Under
    torch.compile the sums are plain adds for inductor to fuse (_add_product); the backward still
    scales the rank-wide gradient, not the full-width one as peft's does."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        ctx.scale, ctx.dtypes = scale, (x.dtype, lora_a.dtype, lora_b.dtype)
        kind = x.device.type
        # Not torch.amp.is_autocast_available: Dynamo before torch 2.13 cannot trace it and breaks
        # the graph at every LoRA layer (85 graphs for SD1.5, 1.7x slower on an H100). Of the
        # devices sdtune runs on only meta has no autocast state to ask.
        autocast = kind != "meta" and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else weight.dtype
        # Cast here, once, so autocast (still on in here) finds every operand in its dtype already.
        x, weight, a, b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        base = F.linear(x, weight, None if bias is None else bias.to(dtype))
        h = F.linear(x, a)
        y = _add_product(base.view(-1, base.shape[-1]), h.view(-1, h.shape[-1]), b.t(), scale).view(base.shape)
        ctx.save_for_backward(x, h, weight, a, b)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, h, weight, a, b = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad.to(h.dtype).reshape(-1, grad.shape[-1])
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_h = (g @ b).mul_(ctx.scale)  # (tokens, rank): small
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _add_product(g @ weight, grad_h, a).view(x.shape).to(x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_h.t() @ x2).to(a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h2).mul_(ctx.scale).to(b_dtype)
        return grad_x, None, None, grad_a, grad_b, None


def _addmm_forward(self, x, *args, **kwargs):
    """forward for a peft LoRA Linear: AddmmLora for the plain case, peft's own for the rest."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    base = self.base_layer
    trains_base = base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
    if self.disable_adapters or self.merged or args or kwargs or len(names) != 1 or trains_base:
        return _peft_forward(self, x, *args, **kwargs)
    name = names[0]
    return AddmmLora.apply(x, base.weight, base.bias,
                           self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


def addmm_forward(denoiser, lora) -> int:
    """With lora.addmm, give each plain LoRA Linear layer (an nn.Linear base, no dropout, no DoRA)
    AddmmLora's forward. Returns how many layers take it."""
    if not lora.addmm or lora.use_dora or lora.dropout:
        return 0
    layers = [m for m in denoiser.modules() if isinstance(m, LoraLinear) and type(m.base_layer) is torch.nn.Linear]
    for layer in layers:
        layer.forward = types.MethodType(_addmm_forward, layer)
    return len(layers)


AUTOCAST = "sdtune_autocast_dtype"  # a LoRA layer's own autocast dtype (training_forward)


def _peft_forward(self, x, *args, **kwargs):
    """peft's own forward for this layer, under an autocast of its own where training_forward gave
    it one."""
    dtype = getattr(self, AUTOCAST, None)
    with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        return type(self).forward(self, x, *args, **kwargs)


def training_forward(denoiser, lora, autocast: bool, own_autocast: torch.dtype | None = None) -> int:
    """What training changes in peft's LoRA forward (the loop's and the bench's steps alike): under
    autocast no input casts (skip_input_casts), and with lora.addmm the sums inside GEMMs. Returns
    how many layers take AddmmLora's forward.

    own_autocast: the bf16/fp16 base's dtype, for a step without autocast (train.autocast: false).
    The layers that keep peft's forward (a 4-bit base, DoRA, LoRA dropout) then run it under an
    autocast of their own, as under the step's: without one peft would run each adapter in its
    float32 on a float32 copy of the layer's input, which autograd keeps (17% more memory kept for
    the backward with DoRA on the tiny UNet), and train another LoRA than the autocast step."""
    if autocast or own_autocast:
        skip_input_casts(denoiser, lora)
    n = addmm_forward(denoiser, lora)
    if own_autocast:
        for layer in denoiser.modules():
            if isinstance(layer, BaseTunerLayer):
                setattr(layer, AUTOCAST, own_autocast)
                if getattr(layer.forward, "__func__", None) is not _addmm_forward:
                    layer.forward = types.MethodType(_peft_forward, layer)
    return n


def published_config(lora, default_targets) -> LoraConfig:
    """The config of the file we publish: for PiSSA/OLoRA the plain LoRA of twice the rank that
    plain_lora writes, with alpha doubled too so that the scaling alpha/r is unchanged (no rslora
    here), and an init loaders must not re-run on the original weights. No dropout: it regularises
    training only, and loaders that read it would drop LoRA activations while sampling."""
    cfg = config(lora, default_targets)
    cfg.lora_dropout = 0.0
    if lora.init in MUTATES_BASE:
        cfg.r, cfg.lora_alpha, cfg.init_lora_weights = 2 * cfg.r, 2 * cfg.lora_alpha, True
    return cfg


def adapter_metadata(lora, default_targets) -> dict:
    """published_config as the JSON a LoRA file carries (diffusers' lora_adapter_metadata): where
    loaders read lora_alpha, so that the file is applied at alpha/rank."""
    meta = published_config(lora, default_targets).to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return meta


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
