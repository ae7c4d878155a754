"""bench/layouts.py: the layouts a compiled step's convolutions run in, from its traced graphs."""

import re

import pytest
import torch
from torch import nn

from bench import layouts, train_step

pytestmark = pytest.mark.usefixtures("keep_threads")  # Bench sets torch's threads

# 128 px: the tiny UNet's innermost maps are 2×2 (1×1 ones read as either layout).
TINY = ["--tiny", "--res", "128", "--bs", "2", "--threads", "1"]


def test_a_channels_last_step_without_inductors_layout_optimisation_has_gradients_cudnn_copies(capsys):
    layouts.main(TINY + ["--channels-last", "--group-norm", "per-channel"])
    out = capsys.readouterr().out
    assert "forward graph: inductor's layout optimisation off (" in out  # in inductor's words
    # The tiny UNet, as SD1.5, has an up-block 3×3 convolution from 128 channels to 64.
    assert re.search(r"k×k convolution weights with at least twice .*\(64, 128, 3, 3\)", out)
    assert "backward graph: inductor's layout optimisation off (no convolution in the graph)" in out
    calls, copied = map(int, re.search(r"backward calls: (\d+); gradient copied by cuDNN first: (\d+)", out).groups())
    assert 0 < copied < calls
    assert "| channels-last | neither (a slice) | yes |" in out  # a channel slice of a skip concatenation's gradient
    assert "| channels-last | channels-last | no |" in out


def test_in_nchw_memory_only_gradient_slices_are_copied_and_a_forced_layout_optimisation_is_seen():
    bench = train_step.Bench(train_step.parse(TINY + ["--device", "cpu", "--precision", "fp32"]))
    convs = sum(type(m) is nn.Conv2d for m in bench.model.modules())
    with torch._inductor.config.patch(force_layout_optimization=True):
        graphs = layouts.traced_graphs(bench)
        assert layouts.layout_optimised(graphs["forward"]) == layouts.layout_optimised(graphs["backward"]) == (True, "")
    assert not layouts.layout_optimised(graphs["forward"])[0]  # the option held inside the patch only
    calls = layouts.convolution_gradients(graphs["backward"])
    # Every convolution but the four before the first LoRA layer (conv_in, the first resnet's two and
    # the first attention block's proj_in), whose inputs need no gradient.
    assert len(calls) == convs - 4
    assert {c["layout"] for c in calls} == {"NCHW"}
    # Dense gradients pass as they are; the slices a skip concatenation's backward makes are copied.
    assert {(c["grad"], c["copied"]) for c in calls} == {("NCHW", False), ("neither (a slice)", True)}
