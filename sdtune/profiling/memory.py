"""Where the bytes go: peak memory, a weights/gradients/optimizer/activations breakdown, CUDA snapshots."""

import contextlib
import ctypes
import gc
import re
import resource
import sys
from pathlib import Path

import torch

from sdtune.io import atomic_path


# Linux keeps a process's peak resident set (VmHWM) and resets it to the current RSS when "5" is
# written here: the CPU counterpart of torch.cuda.reset_peak_memory_stats.
CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")
_rss_was_reset = False  # some sandboxes refuse the write: then the peak is the process's lifetime one


def bytes_of(tensors) -> int:
    """Bytes the tensors really occupy, looking inside quantized tensor subclasses (torchao) and at
    the scales bitsandbytes keeps beside its weights: for 4-bit ones absmax, the NF4 code, and their
    own quantization's (3% more than the packed weights at NF4's block of 64); for 8-bit ones a
    float32 scale per output row (SCB; its CB is the weight itself)."""
    def size(t):
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    parts = []  # all held till the end, so that no id() below is a freed tensor's
    for t in tensors:
        parts.append(t)
        state = getattr(t, "quant_state", None)
        if state is not None:  # as bitsandbytes saves them, less the packed entry describing them
            parts += [v for k, v in state.as_dict(packed=True).items() if not k.startswith("quant_state.")]
        if getattr(t, "SCB", None) is not None:
            parts.append(t.SCB)
    unique = {id(t): t for t in parts}  # a tensor shared by several layers (the NF4 code) counts once
    return sum(size(t) for t in unique.values())


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the allocator's: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def reset_peak(device) -> None:
    """Start a fresh peak, so that each profile cell or evaluated variant reports its own.

    Garbage is collected first: a deleted pipeline caught in a reference cycle still holds its
    tensors. CUDA: the allocator's cache is emptied too, so the reserved peak is also that of what
    follows (a FLOP count without checkpointing, say, would otherwise leave its blocks reserved).
    CPU: freed heap pages go back to the OS (glibc's malloc_trim), then the peak RSS is reset.
    Where that cannot be done (not Linux), the CPU peak stays the process's lifetime peak.
    """
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed pages may stay resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    global _rss_was_reset
    try:
        CLEAR_REFS.write_text("5")
        _rss_was_reset = True
    except OSError:
        _rss_was_reset = False


def peak_memory(device) -> dict:
    """Peak memory since the last reset_peak. `peak_bytes` is the number to compare across runs.

    CUDA: tensors allocated (max_memory_allocated) and held by the caching allocator (reserved).
    CPU: the process's peak resident set, which includes Python, libraries and the weights loaded
    before the reset, not only what the measured work allocated.
    """
    device = torch.device(device)
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        return {
            "peak_bytes": allocated,
            "allocated_bytes": allocated,
            "reserved_bytes": torch.cuda.max_memory_reserved(device),
            "source": "torch.cuda.max_memory_allocated",
        }
    with contextlib.suppress(OSError):
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
        if hwm:
            rss = int(hwm.group(1)) * 1024
            since = "since reset_peak" if _rss_was_reset else "of the process"
            return {"peak_bytes": rss, "rss_bytes": rss, "source": f"peak RSS {since} (VmHWM)"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux but bytes on macOS.
    rss = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_bytes": rss, "rss_bytes": rss, "source": "getrusage peak RSS (process lifetime)"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def breakdown(model: torch.nn.Module, optimizer=None) -> dict:
    """Bytes of parameters (all / trainable), of their gradients and of the optimizer state.

    Buffers are not counted as weights. Counted from the tensors themselves, so it holds for any
    dtype mix (e.g. a bf16 frozen base with float32 LoRA adapters). Gradients are counted from the
    trainable parameters, whose shapes and dtypes they share: the training step ends with
    zero_grad(set_to_none=True), so after it no .grad is left to count, yet each step held them all.
    """
    params = list(model.parameters())
    # Each storage once: bitsandbytes' 8-bit AdamW shares its quantization maps across parameters.
    storages = {}
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    optimizer_bytes = sum(storages.values())
    trainable = sum(_nbytes(p) for p in params if p.requires_grad)
    return {
        "weights_bytes": bytes_of(params),  # a QLoRA base's 4-bit scales included
        "trainable_bytes": trainable,
        "gradients_bytes": trainable,
        "optimizer_bytes": optimizer_bytes,
    }


def weight_bytes(pipe) -> int:
    """Bytes of the parameters of a pipeline's modules (e.g. the VAE and text encoders)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return bytes_of([p for m in modules for p in m.parameters()])


def activations(parts: dict, peak: dict, device) -> dict:
    """Activation bytes estimated as peak allocated minus weights (the encoders' too, when a cell
    encodes every step), gradients and optimizer state.

    Only on CUDA, where the peak counts tensors alone; the estimate also holds temporaries such as
    workspaces. On CPU the peak is a process RSS, so subtracting tensor bytes would mean nothing.
    """
    if torch.device(device).type != "cuda":
        return {"activations_bytes": None, "activations_note": "not measured on CPU: peak RSS is not a tensor count"}
    rest = (parts["weights_bytes"] + parts.get("encoder_weights_bytes", 0) + parts["gradients_bytes"]
            + parts["optimizer_bytes"])
    return {
        "activations_bytes": max(0, peak["allocated_bytes"] - rest),
        "activations_note": "peak allocated minus weights, gradients and optimizer state",
    }


def kept(step_floor: dict, compiled: bool) -> dict:
    """What autograd kept from a step's forward for its backward, the weights aside, as the floor's
    count of that step found it (roofline.step_floor): counted from the tensors, the same number on
    a CPU as on a GPU, and the memory that gradient checkpointing and the precision change. None
    where the count failed, and for a compiled step: the floor's dispatch mode runs it eagerly, and
    with saved-tensor hooks alone Dynamo compiles it again and breaks its graph at them."""
    if compiled:
        return {"kept_for_backward_bytes": None, "kept_for_backward_error": "not counted for a compiled step"}
    return {"kept_for_backward_bytes": step_floor.get("saved_bytes")}


@contextlib.contextmanager
def snapshot(path, device, max_entries: int = 100_000):
    """Record CUDA allocator history inside the block and dump it to `path` (a pickle for
    https://pytorch.org/memory_viz). A no-op on CPU, so callers need not check the device."""
    if torch.device(device).type != "cuda":
        yield
        return
    # max_entries bounds the ring buffer: the default is unbounded and grows with every alloc.
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield
        with atomic_path(path) as tmp:
            torch.cuda.memory._dump_snapshot(str(tmp))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
