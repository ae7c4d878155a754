"""Phase timing inside a training step, and Chrome traces of a few steps.

A phase is timed twice over: a `torch.profiler.record_function` range (so it shows up by name in a
trace) and a synchronised wall clock (so the report has numbers without a profiler running).
"""

import contextlib
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sdtune.io import atomic_path

# One shared null context: a disabled timer hands this out, so a phase costs one attribute check.
_NULL = contextlib.nullcontext()


def sync(device) -> None:
    """Drain the CUDA queue (a no-op elsewhere): kernels run asynchronously, and without a
    sync a clock measures their launch, not their work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times named phases of each training step.

    Use::

        timer.step_begin()
        with timer.phase("forward"): ...
        with timer.phase("backward"): ...
        timer.step_end()

    A phase used several times in one step (gradient accumulation) adds up. Only top-level phases
    count towards coverage; nested ones are timed and reported but would otherwise count twice.
    A phase outside step_begin/step_end only opens its profiler range. On CUDA every phase boundary
    synchronises, so a timed step runs a little slower than an untimed one.
    """

    def __init__(self, device="cpu", enabled: bool = True, warmup: int = 0):
        self.device = torch.device(device)
        self.enabled = enabled
        self.warmup = warmup
        self.steps = []  # one {"step_ms": float, "phases": {name: ms}, "top": ms} per finished step
        self._current = None
        self._depth = 0

    def step_begin(self) -> None:
        if not self.enabled:
            return
        sync(self.device)
        self._current = {"phases": {}, "top": 0.0}
        self._t0 = time.perf_counter()

    def step_end(self) -> None:
        if not self.enabled:
            return
        if self._current is None:
            raise RuntimeError("PhaseTimer.step_end() called without step_begin()")
        sync(self.device)
        self._current["step_ms"] = (time.perf_counter() - self._t0) * 1e3
        self.steps.append(self._current)
        self._current = None

    def phase(self, name: str):
        if not self.enabled:
            return _NULL
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self._current is None:
            with record_function(name):
                yield
            return
        sync(self.device)
        self._depth += 1
        # The clock wraps the profiler range, so the range's own cost counts inside the phase
        # instead of showing up as untimed gaps between phases.
        t0 = time.perf_counter()
        try:
            with record_function(name):
                yield
                # Inside the range: in a trace the phase lasts until its GPU work is done.
                sync(self.device)
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            self._depth -= 1
            phases = self._current["phases"]
            phases[name] = phases.get(name, 0.0) + ms
            if self._depth == 0:
                self._current["top"] += ms

    def summary(self):
        """Per-phase median/mean ms, step median/mean/min/max ms and coverage over the steps after warm-up.

        Returns None when the timer is disabled. A phase missing from a step counts as 0 ms there,
        so means add up to the mean step time.
        """
        if not self.enabled:
            return None
        measured = self.steps[self.warmup :]
        if not measured:
            raise ValueError(
                f"no measured steps: {len(self.steps)} recorded, the first {self.warmup} are warm-up"
            )
        names = list(dict.fromkeys(n for s in measured for n in s["phases"]))
        step_ms = [s["step_ms"] for s in measured]
        phases = {}
        for name in names:
            values = [s["phases"].get(name, 0.0) for s in measured]
            phases[name] = {"median_ms": statistics.median(values), "mean_ms": statistics.mean(values)}
        return {
            "steps_measured": len(measured),
            "warmup_steps": min(self.warmup, len(self.steps)),
            "step_median_ms": statistics.median(step_ms),
            "step_mean_ms": statistics.mean(step_ms),
            "step_min_ms": min(step_ms),  # the spread: a difference inside it between two runs is noise
            "step_max_ms": max(step_ms),
            "phases": phases,
            # Totals, not a mean of ratios: a long step weighs as much as its time.
            "coverage": sum(s["top"] for s in measured) / sum(step_ms),
        }


def trace(step_fn, out_json, steps: int = 3, warmup: int = 1, record_shapes: bool = False):
    """Run `step_fn()` `warmup` times unprofiled, then `steps` times under torch.profiler.

    Writes a Chrome trace (opens in https://ui.perfetto.dev) to `out_json` atomically and returns the
    profiler, whose `key_averages()` the caller may tabulate. Phase names from a PhaseTimer inside
    `step_fn` appear as user annotations; each step is wrapped in a `step_<i>` range.
    """
    # Warm-up outside the profiler: first calls allocate, autotune and compile, which is not the
    # steady state we want to look at.
    for _ in range(warmup):
        step_fn()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for i in range(steps):
            with record_function(f"step_{i}"):
                step_fn()
                # Inside the range: a step that never waits on the GPU (the training step does not)
                # would otherwise span only its launches, and the kernels' share of it read over 100%.
                if torch.cuda.is_available():
                    sync("cuda")
    with atomic_path(Path(out_json)) as tmp:
        prof.export_chrome_trace(str(tmp))
    return prof
