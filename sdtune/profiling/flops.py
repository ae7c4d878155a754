"""FLOPs of one training step, counted by torch.utils.flop_counter.

FlopCounterMode counts matmuls, convolutions and attention (forward and backward) from the ops
actually dispatched, which is what MFU is defined on; work a kernel redoes instead of storing
it (the attention scores in a fused backward) is left out, as MFU leaves out recomputation.
Elementwise ops, norms and the optimizer update are not counted: they are memory-bound and
small next to the GEMMs.
"""

import contextlib

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from sdtune.profiling import memory


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


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # Model FLOPs: the gradients of Q, K, V and of the scores, four products that together are
    # twice the forward's two. torch's formula adds a fifth, the scores the fused kernels recompute
    # instead of storing, which the math path never does: SDPA cells would count a few percent
    # more work for the same model, the way checkpointing's recompute would (see no_recompute).
    return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_raw(op):
    """The lower-level kernels' backward (padded or nested layouts): torch's count less its
    recomputed scores. Per head and query-key pair the five products cost 3·d_q + 2·d_v, the
    model's four 2·d_q + 2·d_v; the head dims are the last dim in every layout."""
    dispatched = flop_counter.flop_registry[op]

    def formula(grad_out, query, key, value, *args, **kwargs):
        d_q, d_v = query.size(-1), value.size(-1)
        return dispatched(grad_out, query, key, value, *args, **kwargs) * (2 * d_q + 2 * d_v) // (3 * d_q + 2 * d_v)

    formula._get_raw = True  # FlopCounterMode passes the tensors, not their shapes
    return formula


aten = torch.ops.aten
MODEL_FLOPS = {op: _attention_backward for op in (
    aten._scaled_dot_product_efficient_attention_backward, aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_cudnn_attention_backward, aten._scaled_dot_product_flash_attention_for_cpu_backward)}
MODEL_FLOPS |= {op: _attention_backward_raw(op) for op in (aten._flash_attention_backward, aten._efficient_attention_backward)}


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


def count_step_flops_by_op(step, model, *args) -> tuple[dict[str, int], bool]:
    """Model FLOPs of one training step `step(*args)` per aten op, counted with `model`'s gradient
    checkpointing off (no_recompute), and whether they hold its recompute after all: the step without
    checkpointing may not fit where the checkpointed one did, and then that one is counted."""
    try:
        with no_recompute(model):
            return count_flops_by_op(step, *args), False
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not (getattr(model, "is_gradient_checkpointing", False) and memory.out_of_memory(err)):
            raise
    for param in model.parameters():  # what the failed backward had summed
        param.grad = None
    memory.reset_peak(next(model.parameters()).device)  # the failed step's blocks back to the allocator
    return count_flops_by_op(step, *args), True


def count_flops(fn, *args, **kwargs) -> int:
    """Model FLOPs of one call `fn(*args, **kwargs)` (e.g. forward + backward of a training step)."""
    return sum(count_flops_by_op(fn, *args, **kwargs).values())


def count_flops_by_op(fn, *args, **kwargs) -> dict[str, int]:
    """Model FLOPs of one call per aten op ({"aten.convolution": n, ...}): count_flops' parts."""
    with FlopCounterMode(display=False, custom_mapping=MODEL_FLOPS) as counter:
        fn(*args, **kwargs)
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def count_dispatched_flops(fn, *args, **kwargs) -> int:
    """FLOPs the kernels of one call do, as torch's formulas count them, recomputation included
    (the fused attention backward's scores, checkpointing's forward): what HFU is defined on."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def achieved_tflops(flops: int, seconds: float) -> float:
    """TFLOP/s achieved by `flops` of work done in `seconds`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12
