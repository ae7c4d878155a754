"""sdtune.train.lora.AddmmLora: a LoRA Linear layer's forward with each sum inside a GEMM, against
peft's own forward (what it saves in a step's memory traffic: tests/test_roofline.py)."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdtune import params
from sdtune.train import lora


def _layer(addmm: bool, bias=True, dtype=torch.float32, size=(48, 40, 4), device="cpu", **lora_keys):
    """One frozen Linear (size: in, out, LoRA rank) with alpha twice the rank (scale 2), B nonzero
    so the product counts, and the LoRA weights float32 as training keeps them."""
    n_in, n_out, rank = size
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=bias)).requires_grad_(False).to(dtype)
    cfg = params.Lora(rank=rank, alpha=2.0 * rank, addmm=addmm, **lora_keys)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               use_dora=cfg.use_dora, target_modules=["0"]), model).to(device)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.1
    lora.skip_input_casts(model, cfg)
    assert lora.addmm_forward(model, cfg) == (addmm and not lora_keys)
    return model


def _run(model, x, autocast=False):
    """Output, and the gradients of x, A and B, of (output · a fixed weight).sum()."""
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=x.device)).sum().backward()
    layer = model[0]
    return out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def check_bf16_against_float64(x, **layer):
    """Under bf16 autocast, AddmmLora's output and gradients for x (bf16) are no further from a
    float64 reference of the same weights than peft's forward's (plus 10%). tests/test_gpu.py
    runs it with cuBLAS."""
    reference = _run(_layer(False, dtype=torch.bfloat16, **layer).double(), x.double())  # the same weights, exactly
    ours = _run(_layer(True, dtype=torch.bfloat16, **layer), x, True)
    theirs = _run(_layer(False, dtype=torch.bfloat16, **layer), x, True)
    for mine, peft_s, ref in zip(ours, theirs, reference):
        assert mine.dtype == peft_s.dtype
        error = lambda t: ((t.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert 0 < error(mine) <= 1.1 * error(peft_s) < 1e-2


@pytest.mark.parametrize("bias", [True, False])
def test_addmm_gives_peft_s_output_and_gradients_in_float32(bias):
    x = torch.randn(3, 7, 48)  # batch × tokens × features, as a denoiser's projections see them
    ours, theirs = _run(_layer(True, bias), x), _run(_layer(False, bias), x)
    for mine, peft_s, what in zip(ours, theirs, ("output", "x's gradient", "A's gradient", "B's gradient")):
        assert mine.shape == peft_s.shape and mine.dtype == peft_s.dtype, what
        torch.testing.assert_close(mine, peft_s, rtol=1e-5, atol=1e-6, msg=what)


def test_under_bf16_autocast_it_is_no_further_from_float64_than_peft():
    """The same products in bf16; only the sums round differently (once, inside the GEMM)."""
    check_bf16_against_float64(torch.randn(256, 48).bfloat16())


def test_x_without_a_gradient_still_trains_a_and_b():
    # Cross-attention's key and value projections read the text embeddings, which need no gradient.
    model = _layer(True)
    model(torch.randn(5, 48)).sum().backward()
    layer = model[0]
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_peft_s_forward_where_addmm_does_not_apply():
    x = torch.randn(4, 48)
    model = _layer(True)
    layer = model[0]
    with torch.no_grad():
        with_lora = model(x)
        layer.enable_adapters(False)
        assert torch.equal(model(x), layer.base_layer(x))
        layer.enable_adapters(True)
        layer.merge()
        torch.testing.assert_close(model(x), with_lora)
    # Dropout and DoRA keep peft's forward, as does train.lora.addmm: false.
    for keys in ({"dropout": 0.1}, {"use_dora": True}):
        _layer(True, **keys)
    assert lora.addmm_forward(_layer(False), params.Lora(addmm=False)) == 0


def test_compiles_into_one_graph_with_the_eager_gradients():
    x = torch.randn(2, 6, 48)
    eager = _run(_layer(True), x)
    compiled = _layer(True)
    torch._dynamo.reset()
    compiled[0] = torch.compile(compiled[0], fullgraph=True)  # a graph break would raise
    for mine, theirs in zip(_run(compiled, x), eager):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def check_whole_unet_compiles_into_one_graph(device, autocast=True):
    """The tiny SD1.5 UNet with LoRA as training runs it (float32 adapter, bf16 autocast, the
    training forward), compiled whole with fullgraph=True: a graph break anywhere in a LoRA layer
    raises. On the H100's torch 2.11 one untraceable call in AddmmLora broke the graph at every
    LoRA layer and made the compiled step 1.7x slower; one layer compiled alone (above) missed it.
    autocast=False: the base in bf16 without autocast, as train.autocast: false runs it."""
    from bench import archs

    arch, cfg = archs.get("sd15"), params.Lora(rank=4, alpha=8.0)
    dtype = torch.float32 if autocast else torch.bfloat16
    torch.manual_seed(0)
    model = archs.build(arch, tiny=True, device=device, dtype=dtype)
    lora.add(model, cfg, arch.lora_targets)
    for p in lora.trainable(model):
        p.data = torch.randn(p.shape, device=p.device) * 0.1  # float32; B nonzero, so A has a gradient to get
    assert lora.training_forward(model, cfg, autocast=autocast) > 0
    latents, cond = archs.inputs(arch, 2, archs.TINY_RES, device, dtype, tiny=True)
    torch._dynamo.reset()
    # aot_eager: Dynamo's graph capture and AOTAutograd's backward without inductor's code, which
    # would take minutes here; a break is Dynamo's, whichever backend.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        out = compiled(latents, torch.tensor([10, 500], device=device), **cond).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in lora.trainable(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[::2])


@pytest.mark.parametrize("autocast", [True, False])
def test_the_whole_unet_compiles_into_one_graph(autocast):
    check_whole_unet_compiles_into_one_graph("cpu", autocast)


class _FullWidthTensors(TorchDispatchMode):
    """Counts the tensors ops make in memory of their own (not a view, not written into an input)
    that are at least `nbytes` large."""

    def __init__(self, nbytes):
        super().__init__()
        self.nbytes, self.made = nbytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and not func.is_view and t.untyped_storage().nbytes() >= self.nbytes
                    and t.untyped_storage().data_ptr() not in inputs):
                self.made += 1
        return out


def test_the_sums_are_written_into_the_gemms_own_outputs():
    """A forward and backward of AddmmLora makes three full-width tensors: the output, the
    incoming gradient (made here) and the input's gradient. peft's forward makes the LoRA's
    product, its scaled copy and the sum too, and their gradients; an addmm into a new tensor
    would copy its C there first, one more each way."""
    x = torch.randn(512, 48, dtype=torch.bfloat16)
    made = {}
    for addmm in (True, False):
        model, leaf = _layer(addmm), x.clone().requires_grad_()
        with _FullWidthTensors(x.shape[0] * 40 * x.element_size()) as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(leaf)
            out.backward(torch.ones_like(out))
        made[addmm] = counter.made
    assert made[True] == 3 and made[False] > 3, made


@pytest.mark.parametrize("lora_keys, message", [
    ({"target_modules": ["no_such_layer"]}, "train.lora.target_modules: no_such_layer matches no module"),
    # peft says nothing while another target matches: the typo trained a LoRA on to_q alone
    ({"target_modules": ["to_q", "to_kk"]}, "train.lora.target_modules: to_kk matches no module of the denoiser"),
    # PiSSA keeps at most min(in, out) singular vectors; the file said r: 1000 of narrower tensors
    ({"init": "pissa", "rank": 1000}, "train.lora.rank: 1000 is more than 32, the smaller side of the narrowest"),
    # peft says "Unknown initialization init_lora_weights='pissa'" of a convolution: the init is what fails.
    ({"init": "pissa", "target_modules": ["to_q", "conv1"]},
     "train.lora.init: pissa starts from linear layers' weights only; train.lora.target_modules names a convolution"),
])
def test_a_lora_that_cannot_be_attached_names_the_key_at_fault(lora_keys, message):
    from sdtune.errors import UserError
    from sdtune.families import get

    family = get("sd1")
    with pytest.raises(UserError) as err:
        lora.add(family.tiny_unet(), params.Lora(**lora_keys), family.LORA_TARGETS)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value
