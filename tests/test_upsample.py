"""sdtune/train/upsample.py: ×2 nearest upsampling as a broadcast (train.upsample: broadcast)."""

import copy
import collections

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D

from bench import archs, layouts, train_step
from conftest import assert_unet_unchanged, tiny_loop_run
from sdtune.train import loop, lora, upsample

pytestmark = pytest.mark.usefixtures("keep_threads")  # Bench sets torch's threads


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_nearest_2x_is_interpolate_forward_and_backward_in_the_inputs_layout(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 3, generator=g).contiguous(memory_format=fmt)
    grad = torch.randn(2, 8, 10, 6, generator=g)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = upsample.nearest_2x(ours)
    expect = F.interpolate(theirs, scale_factor=2.0, mode="nearest")
    assert torch.equal(out, expect)  # the same values copied
    assert out.is_contiguous(memory_format=fmt)
    out.backward(grad)
    expect.backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad)  # each 2×2 block's sum, in another order
    assert ours.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_broadcast_upsamplers_swaps_every_upsampler_and_the_unet_computes_the_same(arch):
    model = archs.build(archs.get(arch), tiny=True, device="cpu", dtype=torch.float32).eval()
    before, keys = copy.deepcopy(model), list(model.state_dict())
    expected = sum(type(m) is Upsample2D for m in model.modules())
    assert upsample.broadcast_upsamplers(model) == expected > 0
    assert list(model.state_dict()) == keys
    assert_unet_unchanged(model, before, arch, rtol=0, atol=0)  # the same values upsampled


def test_a_size_asked_for_goes_to_upsample2ds_own_forward():
    layer = Upsample2D(4, use_conv=True)
    upsample.broadcast_upsamplers(layer)
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        out = layer(x, output_size=(7, 5))  # not ×2: F.interpolate to that size, as diffusers does
    assert out.shape == (1, 4, 7, 5)


def test_compiled_backward_has_no_scatter_and_cudnn_copies_no_nchw_gradient():
    """The point of it: traced as torch.compile traces it, in channels-last memory, the
    upsamplers' backward is no index_put, and no convolution gets an NCHW gradient (bench.layouts);
    the skip concatenations' channel slices are all that is left to copy."""
    argv = ["--tiny", "--res", "128", "--bs", "2", "--threads", "1", "--device", "cpu", "--channels-last",
            "--group-norm", "per-channel"]
    counts = {}
    for how in ("native", "broadcast"):
        graphs = layouts.traced_graphs(train_step.Bench(train_step.parse(argv + ["--upsample", how])))
        backward = graphs["backward"]
        scatters = sum(n.target is torch.ops.aten.index_put.default for n in backward.graph.nodes)
        counts[how] = scatters, collections.Counter(c["grad"] for c in layouts.convolution_gradients(backward)
                                                    if c["copied"])
    assert counts["native"][0] > 0 and counts["native"][1]["NCHW"] > 0  # what it is for
    assert counts["broadcast"] == (0, collections.Counter({"neither (a slice)": counts["native"][1]["neither (a slice)"]}))


def test_train_upsample_broadcast_trains_the_native_loras_lora():
    trained = {}
    for how in ("broadcast", "native"):
        run = tiny_loop_run("sd15", torch.float32, steps=3, channels_last=True, upsample=how)
        kinds = {type(m) for m in run.denoiser.modules() if isinstance(m, Upsample2D)}
        assert kinds == {upsample.BroadcastUpsample2D if how == "broadcast" else Upsample2D}
        for step in range(3):
            loop.train_step(run, step)
        trained[how] = lora.peft_state(run.accelerator.unwrap_model(run.denoiser))
    assert trained["broadcast"].keys() == trained["native"].keys()
    # The same LoRA to rounding: the gradients differ in the order of each block's sum, and three
    # Adam steps of 1e-4 carry that to about 2e-7 at most.
    for key in trained["native"]:
        torch.testing.assert_close(trained["broadcast"][key], trained["native"][key], rtol=1e-4, atol=1e-6, msg=key)


def test_upsample_option_is_named_and_refused_where_it_cannot_apply(capsys):
    assert train_step.parse(["--tiny", "--upsample", "broadcast"]).name.endswith("broadcast-upsample")
    for argv, message in ((["--arch", "sd35m"], "--upsample: sd35m's transformer has no upsamplers"),
                          (["--baseline"], "--baseline is the SD1.5 diffusers example")):
        with pytest.raises(SystemExit):
            train_step.parse(["--tiny", "--upsample", "broadcast", *argv])
        assert message in capsys.readouterr().err.splitlines()[-1]
