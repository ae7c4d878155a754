"""Nearest-neighbour ×2 upsampling as a broadcast (`train.upsample: broadcast`, `bench.train_step
--upsample broadcast`), for a UNet compiled in channels-last memory.

diffusers' Upsample2D doubles a feature map with F.interpolate(mode="nearest"). torch.compile
rewrites that as an index gather (inductor's decompositions), and its backward as an index_put:
every gradient value added by an atomic into a float32 buffer that is zeros first and NCHW, then
cast back. In channels-last memory that NCHW gradient is also what the convolutions before the
upsampler get, and cuDNN copies each into channels-last first: 8 of SD1.5's 94 convolution
gradients (`python -m bench.layouts`, docs/benchmarks.md).

Here each pixel is repeated by broadcasting it over a 2×2 block and reshaping, in the input's own
memory order. The forward is the same copy of values; the backward is a plain sum over each 2×2
block, in the gradient's own layout, with no atomics. Not yet timed on a GPU.
"""

import torch
from diffusers.models.upsampling import Upsample2D


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2.0, mode="nearest") for an (N, C, H, W) tensor, channels-last
    in and out when x is."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c)
        return nhwc.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class BroadcastUpsample2D(Upsample2D):
    """Upsample2D with the same parameters and state-dict keys, upsampling by nearest_2x() where it
    would double the map with F.interpolate; anything else (a size asked for, a transposed
    convolution, a norm first) goes to Upsample2D's own forward."""

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        plain = (self.interpolate and output_size is None and self.norm is None and not self.use_conv_transpose
                 and not args and not kwargs)
        if not plain:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        hidden_states = nearest_2x(hidden_states)
        if not self.use_conv:
            return hidden_states
        return self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)


def broadcast_upsamplers(model) -> int:
    """Make every Upsample2D in the model a BroadcastUpsample2D, in place (its class only: the
    parameters, hooks and keys stay). Returns how many."""
    layers = [m for m in model.modules() if type(m) is Upsample2D]
    for layer in layers:
        layer.__class__ = BroadcastUpsample2D
    return len(layers)
