"""FLOPs of one training step, counted by torch.utils.flop_counter.

FlopCounterMode counts matmuls, convolutions and attention (forward and backward) from the ops
actually dispatched, which is what MFU is defined on. Elementwise ops, norms and the optimizer
update are not counted: they are memory-bound and small next to the GEMMs.
"""

import contextlib

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _register_cpu_attention_flops():
    # FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash kernel,
    # so on CPU attention would count as 0 FLOPs. Same formulas as the CUDA kernels.
    aten = torch.ops.aten
    pairs = [(aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
             (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop)]
    for op, formula in pairs:
        if op not in flop_counter.flop_registry:
            # get_raw: the formula is already wrapped to take shapes.
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


_register_cpu_attention_flops()


@contextlib.contextmanager
def no_recompute(model):
    """Gradient checkpointing off inside the block (and back on after, if it was on).

    MFU is defined on the model's FLOPs, so the forward recomputed by checkpointing must not count:
    count a step inside this block. That step needs the memory checkpointing saves.
    """
    recompute = getattr(model, "is_gradient_checkpointing", False)
    if recompute:
        model.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if recompute:
            model.enable_gradient_checkpointing()


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call `fn(*args, **kwargs)` (e.g. forward + backward of a training step)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def achieved_tflops(flops: int, seconds: float) -> float:
    """TFLOP/s achieved by `flops` of work done in `seconds`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12
