"""Group norms that take their statistics channel by channel (`train.group_norm: per-channel`,
`bench.train_step --group-norm per-channel`), for a UNet compiled in channels-last memory.

Inductor lowers a group norm to one reduction per (sample, group) over the group's channels and
all pixels. In NCHW memory those are one contiguous run each. In NHWC (channels-last, which spares
cuDNN its layout conversions: 10.3 ms of SD1.5's compiled bs16 step on an H100) each group's
channels are a run of C/G values (20 bytes at SD1.5's 320 channels in bf16) every C values, so
the reduction reads memory in short strided pieces: most likely why inductor's fused kernels
took 33.7 ms a step on the H100 with the layout forced, against 25.9 without (docs/benchmarks.md,
"H100, second call"). Its backward already sums per channel first, then per group.

Here the forward's statistics come from a reduction per (sample, channel) over the pixels, which
in NHWC reads whole rows of channels at a time; each group's mean and variance are then combined
from its channels' exactly (the channels all count the same pixels). Only the order of the sums
changes, so the result is group norm's to rounding. Eagerly it is several kernels where torch's
is one, so it is for compiled runs; not yet timed on a GPU.
"""

import torch
from torch import nn


def group_norm(x, groups: int, weight=None, bias=None, eps: float = 1e-5):
    """F.group_norm(x, groups, weight, bias, eps), its statistics per channel first."""
    n, c = x.shape[:2]
    pixels = tuple(range(2, x.ndim))
    # float32 statistics, as torch's kernels and inductor's decomposition take them
    var_c, mean_c = torch.var_mean(x.float(), dim=pixels, correction=0)
    var_c, mean_c = var_c.view(n, groups, c // groups), mean_c.view(n, groups, c // groups)
    mean = mean_c.mean(-1, keepdim=True)
    # The group's variance: its channels' variances plus how far their means lie from the group's.
    var = (var_c + (mean_c - mean).square()).mean(-1, keepdim=True)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float().view(1, groups, c // groups)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(1, groups, c // groups)
    shape = (n, c) + (1,) * len(pixels)
    return (x * scale.view(shape) + shift.view(shape)).to(x.dtype)


class PerChannelGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with the same parameters and state-dict keys, normalising by group_norm()."""

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def per_channel_stats(model) -> int:
    """Make every nn.GroupNorm in the model a PerChannelGroupNorm, in place (its class only: the
    parameters, hooks and keys stay). Returns how many."""
    norms = [m for m in model.modules() if type(m) is nn.GroupNorm]
    for norm in norms:
        norm.__class__ = PerChannelGroupNorm
    return len(norms)
