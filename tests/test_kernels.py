"""sdtune.profiling.kernels: a step's kernel time by kind, next to each kind's FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdtune.profiling import flops, kernels

# Names as they appear in torch.profiler's traces: kernels on an H100, ops on a CPU.
NAMES = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x256x64": "convolution",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816wgrad_optimized_bf16_64x64_64x5_nhwc>": "convolution",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>": "layout",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false>>": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128": "attention",
    "triton_red_fused_native_group_norm_silu_0": "fused (inductor)",
    "triton_poi_fused_convolution_backward_add_3": "fused (inductor)",
    "cpp_fused_add_mul_0": "fused (inductor)",
    "Memcpy HtoD (Pinned -> Device)": "copy",
    "aten::mkldnn_convolution": "convolution",
    "aten::convolution_backward": "convolution",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::copy_": "copy",
    "aten::transpose": "layout",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": kernels.OTHER,
    "aten::native_group_norm": kernels.OTHER,
    "aten::_fused_adamw_": kernels.OTHER,
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_and_op_names_map_to_their_kind(name):
    assert kernels.kind(name) == NAMES[name]


def _step(conv, linear, x, tokens):
    """A step with a convolution, a matmul and an attention, forward and backward."""

    def step():
        y = conv(x).mean()
        h = linear(tokens)
        q = h.view(2, 16, 2, 8).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, q, q).mean()
        (y + z).backward()

    return step


def test_flops_by_kind_split_the_step_count_by_op():
    torch.manual_seed(0)
    step = _step(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 16, 16))
    by_op = flops.count_flops_by_op(step)
    by_kind = kernels.by_kind(by_op)
    assert set(by_kind) == {"convolution", "matmul", "attention"}
    assert sum(by_kind.values()) == flops.count_flops(step)
    # The convolution's share, counted independently: its forward and backward ops.
    with FlopCounterMode(display=False) as counter:
        step()
    convs = {str(op): n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)}
    assert by_kind["convolution"] == sum(convs.values()) > 0


def test_time_by_kind_finds_where_a_step_spends_its_time(keep_threads):
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    conv_heavy = lambda: conv(torch.randn(4, 32, 48, 48)).sum().backward()  # noqa: E731
    # 1024-wide: the GEMMs' work grows with the cube of the size, the copies around them (the bias
    # broadcast into addmm's output, sum's expanded gradient made contiguous) with its square, so
    # the matmuls hold most of the step even on a loaded machine, where memory-bound ops slow most.
    linear, tokens = torch.nn.Linear(1024, 1024), torch.randn(1024, 1024)
    matmul_heavy = lambda: linear(tokens).sum().backward()  # noqa: E731
    for step, kind in [(conv_heavy, "convolution"), (matmul_heavy, "matmul")]:
        step()  # warm-up: first calls allocate and pick algorithms
        per_kernel, step_ms, _ = kernels.time_by_kernel(step, 2, "cpu")
        assert 0.5 < sum(per_kernel.values()) / step_ms <= 1.05  # ops' self times make up about the step
        ms = kernels.by_kind(per_kernel)
        assert all(v >= 0 for v in ms.values()) and sum(ms.values()) == pytest.approx(sum(per_kernel.values()))
        assert ms[kind] / sum(ms.values()) > 0.5, ms
        busiest = kernels.breakdown(per_kernel, {}, step_ms=1.0, top=3)["top"]
        assert len(busiest) == 3 and busiest[0]["kind"] == kind  # the op that does the step's work
        assert [k["ms"] for k in busiest] == sorted((k["ms"] for k in busiest), reverse=True)


def test_breakdown_rates_each_kind_by_its_own_flops_and_time():
    per_kernel = {"sm90_xmma_fprop_implicit_gemm": 4.0, "sm90_xmma_dgrad_implicit_gemm": 2.0, "nvjet_tst_128x256": 2.0}
    counted = {"convolution": 6 * 10**12, "matmul": 10**12, "attention": 5 * 10**11}
    b = kernels.breakdown(per_kernel, counted, step_ms=10.0)
    assert [r["kind"] for r in b["rows"]] == ["convolution", "matmul", "attention"]
    conv, mm, attn = b["rows"]
    assert conv["share"] == 0.75 and conv["tflops"] == pytest.approx(1000)  # 6 TFLOP in 6 ms
    assert mm["tflops"] == pytest.approx(500)
    assert attn["ms"] == 0 and attn["tflops"] is None  # counted, but no kernel of its kind ran
    assert b["kernel_ms"] == 8.0 and b["busy"] == pytest.approx(0.8)
    md = kernels.table(b)
    assert "| convolution | 6.00 | 75% | 6 | 1000 |" in md
    assert "| all kernels | 8.00 | 80% of the 10.0 ms profiled step | | |" in md
    assert [k["name"] for k in b["top"]][0] == "sm90_xmma_fprop_implicit_gemm"
    assert "| `sm90_xmma_fprop_implicit_gemm` | convolution | 4.00 |" in md


def test_a_failed_breakdown_says_why_in_place_of_its_table():
    assert kernels.table({"error": "RuntimeError: CUPTI"}) == "kernel breakdown failed: RuntimeError: CUPTI"


# copy_'s inputs in contiguous_copy_step: the NCHW destination, then the channels-last source.
COPIED = "8×64×32×32 (65536, 1024, 32, 1), 8×64×32×32 (65536, 1, 2048, 64)"


def contiguous_copy_step(device="cpu", width: int = 256):
    """A step whose only real copy is a channels-last tensor made contiguous (NHWC -> NCHW, 2 MiB),
    next to a matmul; run once, as a warm-up."""
    x = torch.randn(8, 64, 32, 32, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(width, width, device=device)
    step = lambda: (w @ w).sum() + x.contiguous().sum()  # noqa: E731
    step()
    return step


def test_copies_are_traced_to_the_op_that_made_them_with_its_shapes_and_strides(keep_threads):
    """The copy's time goes to aten::copy_ inside aten::contiguous, with both tensors' shapes and
    strides, and the table prints that line."""
    torch.set_num_threads(1)
    step = contiguous_copy_step()
    per_kernel, step_ms, copies = kernels.time_by_kernel(step, 3, "cpu")
    first = copies[0]
    assert first["op"] == "aten::copy_" and first["callers"][:2] == ["aten::clone", "aten::contiguous"]
    assert first["inputs"] == COPIED
    assert first["ms"] == pytest.approx(per_kernel["aten::copy_"])  # the step's only copy_ calls
    assert [c["ms"] for c in copies] == sorted((c["ms"] for c in copies), reverse=True)
    assert all(kernels.kind(c["op"]) in ("copy", "layout") for c in copies)
    assert not any(c["op"] == "aten::mm" for c in copies)  # the matmul's time is no copy's
    md = kernels.table(kernels.breakdown(per_kernel, {}, step_ms, copies=copies))
    assert (f"| `aten::copy_` | aten::clone ← aten::contiguous | {first['inputs']} | {first['ms']:.2f} |"
            in md.splitlines())


def test_only_the_busiest_copy_sources_are_kept():
    x = torch.randn(4, 4)
    steps = [lambda n=n: torch.randn(n, 3).t().contiguous() for n in range(2, 7)]  # five shapes of copy

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for step in steps:
            step()
        x.clone()
    every = kernels.launched_by(prof, 1, cuda=False, top=100)
    assert len({c["inputs"] for c in every if c["callers"][:1] == ["aten::clone"]}) == 6  # five t().contiguous(), one clone
    kept = kernels.launched_by(prof, 1, cuda=False, top=3)
    assert kept == every[:3]


def test_strides_read_from_the_chrome_trace_are_the_events_own(tmp_path):
    """Before torch 2.12 (the GPU box has 2.11) profiler events carry no strides; the Chrome trace
    does, and launched_by reads them from it: the same strides, so the same sources."""
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        x.contiguous()
        x.transpose(2, 3).contiguous()
    from_trace = kernels.strides_by_id(prof)
    copies = [e for e in prof.events() if e.name == "aten::copy_"]
    assert [from_trace[e.id] for e in copies] == [[[128, 16, 4, 1], [128, 1, 32, 8], []],
                                                  [[128, 16, 4, 1], [128, 1, 8, 32], []]]
    if hasattr(copies[0], "structured_input_strides"):  # torch >= 2.12, as CI has
        assert all(from_trace[e.id] == e.structured_input_strides for e in prof.events())
    assert kernels.launched_by(prof, 1, cuda=False, strides=from_trace) == kernels.launched_by(prof, 1, cuda=False)
    # A profile already written to a trace (as the profile stage's is) cannot be written again: its file is read.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as again:
        x.contiguous()
    again.export_chrome_trace(str(tmp_path / "trace.json"))
    from_file = kernels.strides_by_id(again, tmp_path / "trace.json")
    assert [from_file[e.id] for e in again.events() if e.name == "aten::copy_"] == [[[128, 16, 4, 1], [128, 1, 32, 8], []]]
    assert kernels.launched_by(again, 1, cuda=False, strides=from_file) == kernels.launched_by(again, 1, cuda=False,
                                                                                                trace=tmp_path / "trace.json")
