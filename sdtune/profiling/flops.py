"""FLOPs of one training step, counted by torch.utils.flop_counter.

FlopCounterMode counts matmuls, convolutions and attention (forward and backward) from the ops
actually dispatched, which is what MFU is defined on. Elementwise ops, norms and the optimizer
update are not counted: they are memory-bound and small next to the GEMMs.
"""

from torch.utils.flop_counter import FlopCounterMode


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
