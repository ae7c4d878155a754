"""Peak TFLOP/s of the device, and MFU against it.

On a known GPU the peak is the vendor datasheet's dense (no 2:4 sparsity) tensor-core number;
elsewhere (CPU, an unknown GPU) it is a GEMM ceiling measured on the spot, which is a fairer
denominator than any nominal number for hardware we cannot look up.
"""

import functools
import platform
import re
import time
from pathlib import Path

import torch

from sdtune.profiling.phases import sync

# Dense TFLOP/s from NVIDIA datasheets. Ordered: the first regex that matches the upper-cased
# torch.cuda.get_device_name() wins. fp32 is the non-tensor-core rate; tf32 applies when fp32
# matmuls or convolutions are allowed to use TF32 (see _tf32_enabled). NVL variants are left out on purpose:
# their clocks differ, and an unknown name falls back to a measured ceiling.
PEAKS = [
    (r"\bL4\b", "L4", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    (r"\bL40S\b", "L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    (r"\bA100\b", "A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    (r"\bH100\b.*PCIE", "H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    (r"\bH100\b.*(SXM|HBM3)", "H100 SXM", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"\bH200\b(?!.*NVL)", "H200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"\bT4\b", "T4", {"fp16": 65, "fp32": 8.1}),
]
CARDS = {name: peaks for _, name, peaks in PEAKS}  # the same, by the table's name
# Memory bandwidth in GB/s from the same datasheets (A100: the 80 GB SXM card's; the 40 GB has 1,555),
# for the roofline's memory-bound floor on a card we are not on (bench.roofline).
BANDWIDTH_GBS = {"L4": 300, "L40S": 864, "A100": 2039, "H100 PCIe": 2000, "H100 SXM": 3350, "H200": 4800,
                 "T4": 320}
# A fused attention kernel takes one exponential per query-key pair (and again in the backward,
# which recomputes the scores), on the SMs' special-function units: 16 a clock per SM on all of
# these cards (the CUDA guide's arithmetic-throughput table), far fewer than the tensor cores' FMAs.
# (SMs, GHz): the clock is the one each card's tensor-core peak above is quoted at.
SMS_AND_CLOCK = {"L4": (58, 2.04), "L40S": (142, 2.52), "A100": (108, 1.41), "H100 PCIe": (114, 1.62),
                 "H100 SXM": (132, 1.83), "H200": (132, 1.83), "T4": (40, 1.59)}
EXP_TERA_PER_S = {name: sms * 16 * ghz / 1e3 for name, (sms, ghz) in SMS_AND_CLOCK.items()}

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _tf32_enabled() -> bool:
    """Whether float32 work runs on TF32 tensor cores: matmuls (off by default) or cuDNN's
    convolutions (on by default, half of a UNet's FLOPs). Either one counts: held to the plain-fp32
    peak, a step whose convolutions use TF32 can show an MFU over 100%; against TF32's peak it errs
    low instead. The fp32_precision getters reflect the legacy flags too, and unlike those do not
    raise once the two APIs have been mixed."""
    return "tf32" in (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


def card_name(device_name: str) -> str | None:
    """The table's name for a GPU's name (torch.cuda.get_device_name), or None when not in it."""
    upper = device_name.upper()
    return next((name for pattern, name, _ in PEAKS if re.search(pattern, upper)), None)


def datasheet_peak(device_name: str, dtype: torch.dtype):
    """(tflops, table name) for a GPU name and dtype, or None when not in the table."""
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32" and _tf32_enabled():
        key = "tf32"
    name = card_name(device_name)
    peaks = CARDS.get(name, {})
    return (peaks[key], name) if key in peaks else None


def card(name: str) -> tuple[dict, float, float]:
    """({dtype key: TFLOP/s}, GB/s, exponentials per second ×10¹²) of a card by its table name ("H100 SXM")."""
    if name not in CARDS:
        raise ValueError(f"unknown card {name!r}: expected one of {', '.join(CARDS)}")
    return CARDS[name], float(BANDWIDTH_GBS[name]), EXP_TERA_PER_S[name]


def exp_tera_per_s(device) -> float | None:
    """The special-function units' exponentials per second (×10¹²) on a GPU in the table; None
    elsewhere: a CPU computes its exponentials on the same vector units as everything else, and an
    unknown GPU's rate is not measured (a plain exp kernel is bound by memory, not by the units)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = card_name(torch.cuda.get_device_name(device))
    return EXP_TERA_PER_S.get(name)


def device_name(device) -> str:
    """What the numbers were measured on, in words: the GPU's name, or the CPU's model and threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else None
    model = found.group(1).strip() if found else (platform.processor() or platform.machine())
    return f"{model} CPU, {torch.get_num_threads()} threads"


def _matmul_seconds(a, b, repeats: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync(device)
    return time.perf_counter() - t0


def measured_matmul_tflops(device="cpu", dtype=torch.float32, sizes=None, trials=5, seconds=0.05) -> float:
    """The best TFLOP/s of n×n @ n×n matmuls on `device` over `sizes`: a practical ceiling.

    CUDA: 8192, 20 products a trial. CPU: 128 to 1024, as many products a trial as take about
    `seconds`, stopping after the first size whose one product takes longer. Best over sizes,
    because a kernel's rate peaks at a size of its own: on a CPU without fp16 arithmetic torch's
    fallback fp16 GEMM is fastest on small matrices (an AMD EPYC, 2026-11-27: 0.004 TFLOP/s at
    128, 0.001 at 1024), where a 1024-only ceiling put the tiny model's fp16 step above 100%.
    Best of `trials` too, because a slower trial means interference (another process, a clock
    ramp), not a lower ceiling.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    best = 0.0
    for n in sizes or ((8192,) if cuda else (128, 256, 512, 1024)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        one = _matmul_seconds(a, b, 1, device)  # also the warm-up: library init, thread pool, cuBLAS handles
        repeats = 20 if cuda else max(1, round(seconds / max(one, 1e-6)))
        best = max(best, 2 * n**3 * repeats / min(_matmul_seconds(a, b, repeats, device) for _ in range(trials)) / 1e12)
        if not cuda and one > seconds:
            break
    return best


def measured_bandwidth_gbs(device="cpu", mib=256, repeats=None, trials=5) -> float:
    """Best-of-`trials` GB/s of copying `mib` MiB into another tensor on `device` (each byte read
    once and written once): the memory-bound kernels' practical ceiling, as the GEMM one is for
    matmuls. 256 MiB is past the last cache of the CPUs and GPUs we know, and small beside a
    training cell's own memory; `repeats` copies a trial, 4 on CPU and 10 on CUDA by default."""
    device = torch.device(device)
    n = mib * 2**20
    repeats = repeats or (10 if device.type == "cuda" else 4)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def seconds(k):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            dst.copy_(src)
        sync(device)
        return time.perf_counter() - t0

    seconds(1)
    return 2 * n * repeats / min(seconds(repeats) for _ in range(trials)) / 1e9


@functools.cache
def _ceiling(device: str, dtype: torch.dtype) -> float:
    return measured_matmul_tflops(device, dtype)


def ceiling_tflops(device="cpu", dtype=torch.float32) -> float:
    """The GEMM ceiling measured on `device` in `dtype` (once per process): real GEMMs reach less
    than the datasheet, so MFU against this says how close a step is to what the card can do."""
    return _ceiling(str(torch.device(device)), dtype)


@functools.cache
def _bandwidth(device: str) -> float:
    return measured_bandwidth_gbs(device)


def bandwidth_gbs(device="cpu") -> float:
    """The copy bandwidth measured on `device`, once per process."""
    return _bandwidth(str(torch.device(device)))


def peak_tflops(device="cpu", dtype=torch.float32):
    """(TFLOP/s, source): source is "datasheet:<name>" for a known GPU, else "measured".

    The measured ceiling is measured once per process, device and dtype, so every training and
    inference cell of a profile is held to the same one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        found = datasheet_peak(torch.cuda.get_device_name(device), dtype)
        if found:
            return float(found[0]), f"datasheet:{found[1]}"
    return ceiling_tflops(device, dtype), "measured"


def mfu(flops_per_step: int, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over `peak` TFLOP/s."""
    if step_seconds <= 0 or peak <= 0:
        raise ValueError(f"step_seconds and peak must be > 0, got {step_seconds}, {peak}")
    return flops_per_step / step_seconds / (peak * 1e12)
