"""sdtune/train/norms.py: group norm with its statistics per channel first (train.group_norm: per-channel)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from bench import archs, train_step
from conftest import assert_unet_unchanged, tiny_loop_run
from sdtune.train import loop, lora, norms


def _input(shape, dtype, channels_last):
    # Channel means far apart and far from 0: the group's variance is mostly how far its channels'
    # means lie from each other, which a mean of the channels' own variances would miss.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + torch.randn(shape[1], generator=g).view(1, -1, *[1] * (len(shape) - 2)) * 4
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def _errors(fn, x, groups, weight, bias, grad):
    """fn's output and gradients (x, weight, bias), each as its largest distance from float64's F.group_norm."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(leaves[0], groups, leaves[1], leaves[2], 1e-5)
    (out * grad).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expect = F.group_norm(ref[0], groups, ref[1], ref[2], 1e-5)
    (expect * grad.double()).sum().backward()
    return [(out.double() - expect).abs().max().item()] + [
        (a.grad.double() - b.grad).abs().max().item() for a, b in zip(leaves, ref)]


@pytest.mark.parametrize("shape, channels_last", [((2, 64, 8, 8), False), ((2, 64, 8, 8), True), ((2, 64, 50), False)])
def test_per_channel_group_norm_is_group_norm_to_rounding(shape, channels_last):
    groups, c = 32, shape[1]
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    grad = torch.randn(shape, generator=g)
    x = _input(shape, torch.float32, channels_last)
    # float32: as close to float64 as torch's own kernel, output and every gradient.
    ours = _errors(norms.group_norm, x, groups, weight, bias, grad)
    torch_own = _errors(F.group_norm, x, groups, weight, bias, grad)
    assert max(ours) < 1e-4 and all(a <= max(2 * b, 1e-5) for a, b in zip(ours, torch_own)), (ours, torch_own)
    # bf16: the same rounding as torch's kernel, near enough (both take float32 statistics).
    bf16 = [t.bfloat16() for t in (x, weight, bias, grad)]
    ours = _errors(norms.group_norm, bf16[0], groups, *bf16[1:3], bf16[3])
    torch_own = _errors(F.group_norm, bf16[0], groups, *bf16[1:3], bf16[3])
    assert all(a <= 2 * b for a, b in zip(ours, torch_own)), (ours, torch_own)
    # The layout stays: a channels-last input gives a channels-last output (no copy back to NCHW).
    out = norms.group_norm(x, groups, weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_per_channel_stats_swaps_every_group_norm_of_the_unet_in_place():
    model = archs.build(archs.get("sd15"), tiny=True, device="cpu", dtype=torch.float32).eval()
    before = copy.deepcopy(model)
    keys = list(model.state_dict())
    expected = sum(type(m) is torch.nn.GroupNorm for m in model.modules())
    assert norms.per_channel_stats(model) == expected > 0
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, norms.PerChannelGroupNorm) for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert_unet_unchanged(model, before, "sd15", rtol=1e-4, atol=1e-4)


def test_per_channel_group_norm_compiles_into_one_graph_with_eagers_gradients():
    """Compiled as the bench compiles it (channels-last, the backward derived by AOTAutograd), on a
    UNet's resnet block: no graph break (fullgraph), and torch's group norm's gradients."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32, groups=32).to(memory_format=torch.channels_last)
    eager = copy.deepcopy(block)
    norms.per_channel_stats(block)
    x = _input((2, 64, 16, 16), torch.float32, channels_last=True)
    temb = torch.randn(2, 32)
    compiled = torch.compile(block, fullgraph=True)
    grads = []
    for model in (compiled, eager):
        xi = x.clone().requires_grad_()
        model(xi, temb).square().mean().backward()
        grads.append([xi.grad] + [p.grad for p in (model.norm1.weight, model.norm2.bias, model.conv1.weight)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_group_norm_option_is_named_and_refused_where_it_cannot_apply(capsys):
    args = train_step.parse(["--tiny", "--channels-last", "--group-norm", "per-channel"])
    assert args.name.endswith("channels-last per-channel-gn")
    bench = train_step.Bench(args)
    assert any(isinstance(m, norms.PerChannelGroupNorm) for m in bench.model.modules())
    assert torch.isfinite(bench.step())
    for argv, message in ((["--arch", "sd35m"], "--group-norm: sd35m's transformer has no group norms"),
                          (["--baseline"], "--baseline is the SD1.5 diffusers example")):
        with pytest.raises(SystemExit):
            train_step.parse(["--tiny", "--group-norm", "per-channel", *argv])
        assert message in capsys.readouterr().err.splitlines()[-1]


def _trained(group_norm: str) -> tuple[set, dict]:
    """The group norms' classes and the LoRA after three float32 steps of the training loop over
    bench's tiny SD1.5 UNet in channels-last memory."""
    run = tiny_loop_run("sd15", torch.float32, steps=3, channels_last=True, group_norm=group_norm)
    swapped = {type(m) for m in run.denoiser.modules() if isinstance(m, torch.nn.GroupNorm)}
    for step in range(3):
        loop.train_step(run, step)
    return swapped, lora.peft_state(run.accelerator.unwrap_model(run.denoiser))


def test_train_group_norm_per_channel_trains_the_native_loras_lora(capsys):
    (ours_types, ours), (native_types, native) = _trained("per-channel"), _trained("native")
    # Eagerly (no train.compile) it is slower than torch's kernel, and the run says so once.
    assert capsys.readouterr().out.count("train: warning: train.group_norm: per-channel is meant for compiled runs") == 1
    assert ours_types == {norms.PerChannelGroupNorm} and native_types == {torch.nn.GroupNorm}
    assert ours.keys() == native.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], native[key], rtol=1e-4, atol=1e-6, msg=key)

