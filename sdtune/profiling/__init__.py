"""Profiling of training steps: where the time, FLOPs, bytes and dollars go.

Modules (import the one you need; `charts` pulls in matplotlib):
  phases    PhaseTimer (per-phase wall clock + profiler ranges), sync(), trace() -> Chrome trace
  flops     count_flops(), achieved_tflops()
  hardware  peak_tflops() from a datasheet table or a measured GEMM ceiling, mfu()
  memory    reset_peak(), peak_memory(), breakdown(), activations(), kept(), snapshot()
  charts    phase_chart(), bar_chart(), memory_chart()
  cost      cost(), hourly_price(), hourly_usd(), PRICES (approximate GCP on-demand prices)
  kernels   traced kernel time by kind, and which op launched each copy
  roofline  each op's floor at the device's GEMM ceiling and copy bandwidth
  run       profile_cell(): one matrix cell of the real training step, measured
  inference profile_cell(): one generation cell, measured
"""
