"""The profiling library on CPU, with a tiny real diffusers UNet and a matmul-heavy MLP."""

import json
import math
import statistics
import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from sdtune import families, params as params_lib
from sdtune.errors import UserError
from sdtune.profiling import charts, cost, flops, hardware, memory, phases

PHASES = ("data", "forward", "backward", "optimizer")


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_step(model, optimizer, timer):
    """A realistic training step: batch, forward, loss, backward, optimizer update."""

    def step():
        timer.step_begin()
        with timer.phase("data"):
            latents = torch.randn(2, 4, 8, 8)
            text = torch.randn(2, 7, 32)
            t = torch.randint(0, 1000, (2,))
            noise = torch.randn_like(latents)
        with timer.phase("forward"):
            pred = model(latents + noise, t, encoder_hidden_states=text).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timer.step_end()

    return step


@pytest.fixture(scope="module")
def unet_step():
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timer = phases.PhaseTimer("cpu", warmup=2)
    return model, optimizer, timer, make_step(model, optimizer, timer)


def test_flops_of_tiny_unet_match_an_independent_count(unet_step):
    """The fused-attention step is counted as the math path computes it, product by product: the
    independent count is torch's own FlopCounterMode on the math path, where attention is plain bmm."""
    from sdtune.train.loop import attention

    model, _, _, _ = unet_step
    latents, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.tensor([1, 500])

    def fwd_bwd():
        model(latents, t, encoder_hidden_states=text).sample.square().mean().backward()

    counted = flops.count_flops(fwd_bwd)
    with FlopCounterMode(display=False) as dispatched:
        fwd_bwd()
    with attention("math"), FlopCounterMode(display=False) as math_path:
        fwd_bwd()
    model.zero_grad(set_to_none=True)
    assert counted == math_path.get_total_flops() > 0
    # torch's formula for the fused backward also counts the scores it recomputes.
    assert dispatched.get_total_flops() > counted
    assert flops.achieved_tflops(2 * 10**12, 2.0) == pytest.approx(1.0)


def test_attention_flops_are_counted_by_hand():
    """Forward QK^T and PV, backward the four gradient products: 12·b·h·s²·d in all, for the
    fused kernel and the math path alike, and for the lower-level kernels' backward too."""
    from sdtune.train.loop import attention

    b, h, s, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))

    def fwd_bwd():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    assert flops.count_flops(fwd_bwd) == 12 * b * h * s * s * d
    with attention("math"):
        assert flops.count_flops(fwd_bwd) == 12 * b * h * s * s * d
    # The flash kernel's own backward (CUDA only), with [b, h, s, d] tensors as torch's formula reads them.
    backward = flops.MODEL_FLOPS[torch.ops.aten._flash_attention_backward]
    grad, query, key, value, out = (torch.empty(b, h, s, d, device="meta") for _ in range(5))
    assert backward(grad, query, key, value, out, None, None, None, s, s, out_val=None) == 8 * b * h * s * s * d


def test_phases_cover_the_step_and_summarise(unet_step):
    _, _, timer, step = unet_step
    for _ in range(10):
        step()
    s = timer.summary()
    assert s["steps_measured"] == 8 and s["warmup_steps"] == 2
    assert list(s["phases"]) == list(PHASES)
    assert s["coverage"] >= 0.95, s
    assert all(p["median_ms"] > 0 and p["mean_ms"] > 0 for p in s["phases"].values())
    assert sum(p["mean_ms"] for p in s["phases"].values()) <= s["step_mean_ms"]
    measured = [t["step_ms"] for t in timer.steps[2:]]
    assert (s["step_min_ms"], s["step_max_ms"]) == (min(measured), max(measured))
    assert s["step_min_ms"] <= s["step_median_ms"] <= s["step_max_ms"]


def test_phases_accumulate_and_nested_phases_do_not_count_twice():
    timer = phases.PhaseTimer()
    timer.step_begin()
    for _ in range(2):
        with timer.phase("forward"):
            with timer.phase("inner"):
                time.sleep(0.01)
    timer.step_end()
    s = timer.summary()
    assert s["phases"]["forward"]["mean_ms"] >= 20
    assert s["phases"]["inner"]["mean_ms"] >= 20
    assert s["coverage"] <= 1.0


def test_summary_takes_the_median_step_counts_a_missing_phase_as_0_and_covers_by_totals():
    """Three steps, the last one long, with a phase of its own and mostly untimed: the median step
    is a short one; `backward` counts 0 ms in the steps without it (so phase means add up to the
    mean step); coverage is timed ms over step ms in total, not a mean of per-step ratios."""
    timer = phases.PhaseTimer()
    for i in range(3):
        timer.step_begin()
        with timer.phase("forward"):
            time.sleep(0.01)
        if i == 2:
            with timer.phase("backward"):
                time.sleep(0.01)
            time.sleep(0.15)  # untimed
        timer.step_end()
    s = timer.summary()
    step_ms = [t["step_ms"] for t in timer.steps]
    assert s["step_median_ms"] == sorted(step_ms)[1] < 60 < s["step_mean_ms"]
    backward = timer.steps[2]["phases"]["backward"]
    assert s["phases"]["backward"] == {"median_ms": 0.0, "mean_ms": pytest.approx(backward / 3)}
    timed = sum(t["top"] for t in timer.steps)
    assert s["coverage"] == pytest.approx(timed / sum(step_ms)) and s["coverage"] < 0.4


def test_disabled_timer_is_a_null_context():
    timer = phases.PhaseTimer(enabled=False)
    timer.step_begin()
    with timer.phase("forward") as ctx:
        assert ctx is None
    timer.step_end()
    assert timer.summary() is None and timer.steps == []


def test_summary_without_measured_steps_says_so():
    timer = phases.PhaseTimer(warmup=3)
    timer.step_begin()
    timer.step_end()
    with pytest.raises(ValueError, match="no measured steps"):
        timer.summary()


def test_chrome_trace_is_json_with_phase_names(unet_step, tmp_path):
    _, _, timer, step = unet_step
    out = tmp_path / "trace.json"
    phases.trace(step, out, steps=2, warmup=1)
    events = json.loads(out.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert set(PHASES) | {"step_0", "step_1"} <= names


def test_mfu_of_a_matmul_step_is_a_fraction_of_the_measured_peak():
    peak, source = hardware.peak_tflops("cpu", torch.float32)
    assert source == "measured" and peak > 0
    # Much smaller matmuls than the 1024² ceiling (~10-30% of it alone), so the step stays under the
    # peak even when other processes slowed the ceiling's measurement on a shared machine.
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
    x = torch.randn(32, 128)

    def fwd_bwd():
        mlp(x).sum().backward()

    step_flops = flops.count_flops(fwd_bwd)
    assert step_flops == 5 * 2 * 32 * 128 * 128  # 2 forward GEMMs, 3 backward (x needs no grad)
    for _ in range(3):
        fwd_bwd()  # warm-up: first calls allocate and spin up threads
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - t0)
    value = hardware.mfu(step_flops, statistics.median(times), peak)
    assert 0 < value <= 1
    # An MFU over 100% means a FLOP over-count or a wrong peak: shown as it is, not clamped to 1.
    assert hardware.mfu(3 * 10**12, 1.0, 2.0) == 1.5


@pytest.fixture
def fp32_precision():
    """Set float32's matmul and conv precision for a test, and put torch's back afterwards."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision

    def set_to(matmul_precision, conv_precision):
        matmul.fp32_precision, conv.fp32_precision = matmul_precision, conv_precision
    yield set_to
    matmul.fp32_precision, conv.fp32_precision = saved


def test_datasheet_table_matches_device_names(fp32_precision):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert hardware.datasheet_peak("NVIDIA L4", bf16) == (121, "L4")
    fp32_precision("ieee", "ieee")
    assert hardware.datasheet_peak("NVIDIA L4", fp32) == (30.3, "L4")
    assert hardware.datasheet_peak("NVIDIA A100-SXM4-80GB", fp32) == (19.5, "A100")
    # TF32 for matmuls or for convolutions (cuDNN's default): fp32 work on TF32 tensor cores
    fp32_precision("ieee", "tf32")
    assert hardware.datasheet_peak("NVIDIA L4", fp32) == (60, "L4")
    fp32_precision("tf32", "ieee")
    assert hardware.datasheet_peak("NVIDIA A100-SXM4-80GB", fp32) == (156, "A100")
    assert hardware.datasheet_peak("NVIDIA L40S", bf16)[1] == "L40S"
    assert hardware.datasheet_peak("NVIDIA H100 80GB HBM3", bf16) == (989, "H100 SXM")
    assert hardware.datasheet_peak("NVIDIA H100 PCIe", torch.float16) == (756, "H100 PCIe")
    assert hardware.datasheet_peak("NVIDIA H200", bf16) == (989, "H200")
    assert hardware.datasheet_peak("NVIDIA H100 NVL", bf16) is None  # unknown: measure instead
    assert hardware.datasheet_peak("Tesla T4", bf16) is None  # no bf16 tensor cores


def test_every_card_in_the_table_has_its_bandwidth_and_exponential_rate():
    for _, name, peaks in hardware.PEAKS:
        assert hardware.card(name) == (peaks, float(hardware.BANDWIDTH_GBS[name]), hardware.EXP_TERA_PER_S[name])
    assert hardware.card("H100 SXM")[1] == 3350
    # The special-function units' rate, 16 a clock per SM, at the clock the tensor peak is quoted at:
    # that clock gives the tensor peak back (dense bf16 FMAs a clock per SM: 2,048 on Hopper, 1,024 on
    # Ampere's A100, 512 on Ada's L4 and L40S), and the H100's rate is the 3.9 ×10¹² FlashAttention-3 works
    # with. (The L40S's 362 is quoted at a clock 1.2% under its boost clock; its sparse figure is twice it.)
    for name, fmas, rel in (("H100 SXM", 2048, 0.01), ("A100", 1024, 0.01), ("L4", 512, 0.01), ("L40S", 512, 0.015)):
        sms, ghz = hardware.SMS_AND_CLOCK[name]
        assert 2 * fmas * sms * ghz / 1e3 == pytest.approx(hardware.card(name)[0]["bf16"], rel=rel), name
    assert hardware.card("H100 SXM")[2] == pytest.approx(3.9, rel=0.01)
    assert hardware.exp_tera_per_s("cpu") is None  # no units of its own: exponentials bound nothing there
    with pytest.raises(ValueError, match="unknown card 'B200': expected one of L4, L40S"):
        hardware.card("B200")


def test_the_gemm_ceiling_is_the_best_rate_over_sizes(monkeypatch):
    """Timed by a stand-in clock with a fallback kernel's rates, fastest on small matrices (as fp16
    on a CPU without fp16 arithmetic): the ceiling is the best of them, and after the first size
    whose one product takes longer than a trial's time no larger size is tried."""
    flops_per_s = {128: 4e9, 256: 3e9, 512: 2e9, 1024: 1e9}
    tried = []

    def seconds(a, b, repeats, device):
        tried.append(len(a))
        return 2 * len(a) ** 3 * repeats / flops_per_s[len(a)]

    monkeypatch.setattr(hardware, "_matmul_seconds", seconds)
    assert hardware.measured_matmul_tflops("cpu", seconds=0.05) == pytest.approx(4e9 / 1e12)
    assert sorted(set(tried)) == [128, 256, 512]  # one 512² product: 0.067 s
    monkeypatch.undo()
    tflops = hardware.measured_matmul_tflops("cpu", sizes=(64,), trials=2)  # the real thing, briefly
    assert math.isfinite(tflops) and 0 < tflops < 100


def test_measured_bandwidth_is_a_copy_rate():
    # 16 MiB each way: past the caches of most CPUs, small enough for a test.
    gbs = hardware.measured_bandwidth_gbs("cpu", mib=16, repeats=2, trials=2)
    assert math.isfinite(gbs) and 0.1 < gbs < 10_000


def test_breakdown_matches_hand_counted_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5).to(torch.float64))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model[1](model[0](torch.randn(3, 10)).double()).sum().backward()
    optimizer.step()
    trainable = 20 * 4 + (20 * 5 + 5) * 8
    parts = memory.breakdown(model, optimizer)
    assert parts == {
        "weights_bytes": 10 * 20 * 4 + trainable,
        "trainable_bytes": trainable,
        "gradients_bytes": trainable,
        # Adam: exp_avg and exp_avg_sq per trainable tensor, plus a float32 scalar "step" each.
        "optimizer_bytes": 2 * trainable + 3 * 4,
    }
    assert memory.activations(parts, memory.peak_memory("cpu"), "cpu")["activations_bytes"] is None


def test_a_qlora_bases_weights_count_its_4bit_scales():
    """A QLoRA cell's weights: the 4-bit weights and the absmax scales and codes bitsandbytes keeps
    with them (what it saves for the layer), not the packed bytes alone."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 256), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    saved = [v for k, v in layer.state_dict().items() if ".quant_state." not in k]
    assert memory.breakdown(layer)["weights_bytes"] == sum(v.numel() * v.element_size() for v in saved) > 128 * 256 // 2


@pytest.mark.skipif(not memory.CLEAR_REFS.exists(), reason="the peak RSS can be reset on Linux only")
def test_optimizer_state_shared_between_parameters_counts_once():
    """bitsandbytes' 8-bit AdamW keeps one quantization map for all parameters in every state."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 4)
    qmap = torch.zeros(256)
    state = {p: {"state1": torch.zeros(p.shape, dtype=torch.uint8), "qmap1": qmap} for p in model.parameters()}
    parts = memory.breakdown(model, SimpleNamespace(state=state))
    assert parts["optimizer_bytes"] == (16 + 4) + 256 * 4


def test_cpu_peak_is_the_kernels_vmhwm_in_bytes():
    """/proc/self/status gives VmHWM in kB, which are KiB: 1024 bytes each."""
    import re
    from pathlib import Path

    def hwm_kib():
        return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc here")
    before = hwm_kib()
    peak = memory.peak_memory("cpu")["peak_bytes"]
    assert before * 1024 <= peak <= hwm_kib() * 1024


def test_cpu_peak_is_that_of_what_ran_since_the_reset():
    # Each profile cell and evaluated variant resets the peak: a lifetime peak would charge the
    # first cell's memory to every later one (checkpointing would seem to cost memory).
    mib = 2**20
    big = torch.ones(256 * mib // 4)  # torch.ones writes every page, so all of them are resident
    del big
    memory.reset_peak("cpu")
    low = memory.peak_memory("cpu")["peak_bytes"]
    assert memory.peak_memory("cpu")["source"] == "peak RSS since reset_peak (VmHWM)"
    small = torch.ones(64 * mib // 4)
    grown = memory.peak_memory("cpu")["peak_bytes"] - low
    assert 60 * mib < grown < 200 * mib, grown / mib  # the 64 MiB tensor, not the freed 256 MiB one
    del small


def test_peak_memory_and_snapshot_on_cpu(tmp_path):
    peak = memory.peak_memory("cpu")
    assert peak["peak_bytes"] == peak["rss_bytes"] > 10 * 2**20
    with memory.snapshot(tmp_path / "mem.pickle", "cpu"):
        pass
    assert not (tmp_path / "mem.pickle").exists()


def test_charts_are_real_pngs(tmp_path):
    s = {"step_median_ms": 10.0, "phases": {"forward": {"median_ms": 4.0}, "backward": {"median_ms": 5.0}}}
    phase_png, bar_png = tmp_path / "phases.png", tmp_path / "bars.png"
    # "phases" is a legal cell name: the chart once took such a mapping for one summary and failed.
    charts.phase_chart({"fp32": s, "phases": s}, phase_png)
    charts.bar_chart([{"name": "a", "mfu": 0.4}, {"name": "b", "mfu": None}], "mfu", bar_png, "MFU")
    for png in (phase_png, bar_png):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind


def drawn(monkeypatch, draw, *args, **kwargs):
    """The figure a chart function draws, rendered (so text has its place) and still saved."""
    figures = []
    save = charts._save
    monkeypatch.setattr(charts, "_save", lambda fig, out: (figures.append(fig), save(fig, out)))
    draw(*args, **kwargs)
    (fig,) = figures
    fig.canvas.draw()
    return fig


def test_step_time_bars_read_as_plain_numbers_beside_their_own_long_names(tmp_path, monkeypatch):
    """The demo's step-time bars read "1.18e+03", and the real run's 15 cell names, rotated under
    vertical bars, ran into each other and under their neighbours' bars."""
    import yaml

    from conftest import ROOT

    names = [c["name"] for c in yaml.safe_load((ROOT / "params.yaml").read_text())["profile"]["matrix"]]
    rows = [{"name": n, "step_ms": 1180.76 + 10 * i} for i, n in enumerate(names)]
    fig = drawn(monkeypatch, charts.bar_chart, rows, "step_ms", tmp_path / "step.png", "Step")
    (ax,) = fig.axes
    texts = [t.get_text() for t in ax.texts] + [t.get_text() for t in ax.get_xticklabels()]
    assert "1,181" in texts and not any("e+" in t for t in texts)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert [t.get_text() for t in ax.get_yticklabels()] == names  # first on top, each beside its bar
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    mfu = drawn(monkeypatch, charts.bar_chart, [{"name": "a", "mfu": 0.264}], "mfu", tmp_path / "mfu.png", "MFU",
                fmt="{:.1%}".format)
    assert [t.get_text() for t in mfu.axes[0].texts] == ["26.4%"]


def test_a_chart_of_no_cells_says_so(tmp_path, monkeypatch):
    fig = drawn(monkeypatch, charts.bar_chart, [], "seconds_per_image", tmp_path / "gen.png", "Generation")
    assert [t.get_text() for t in fig.axes[0].texts] == ["no cell ran (see the failed cells in the table)"]


def test_the_memory_chart_says_a_compiled_cells_backward_was_not_counted(tmp_path, monkeypatch):
    """A compiled cell's kept-for-backward is None: drawn as 0 it read as keeping nothing. At a
    GPU's sizes the axis is in GiB, whose ticks do not run together as 10000 12000 MiB did."""
    def cell(name, kept):
        return {"name": name, "memory": {"weights_bytes": 2 * 2**30, "gradients_bytes": 2**26,
                                         "optimizer_bytes": 2**27, "kept_for_backward_bytes": kept,
                                         "allocated_bytes": 12 * 2**30, "peak_bytes": 12 * 2**30}}

    fig = drawn(monkeypatch, charts.memory_chart, [cell("bf16", 9 * 2**30), cell("bf16-compile", None)],
                tmp_path / "memory.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["kept for backward: not counted (compiled)"]
    assert ax.get_xlabel() == "GiB"
    small = drawn(monkeypatch, charts.memory_chart,
                  [{"name": "cpu", "memory": {"weights_bytes": 2**24, "kept_for_backward_bytes": 2**23}}],
                  tmp_path / "m2.png")
    assert small.axes[0].get_xlabel() == "MiB" and len(small.axes[0].texts) == 0


def test_cost():
    c = cost.cost(step_seconds=0.5, steps=2000, hourly_usd=3.6)
    assert c == pytest.approx({"usd_per_1000_steps": 0.5, "usd_per_run": 1.0})
    assert cost.hourly_price("g2-standard-8") == pytest.approx(0.85)
    with pytest.raises(UserError, match="g2-standard-8"):
        cost.hourly_price("n1-nonexistent")
    table = params_lib.parse({"profile": {"machine_type": "g2-standard-4"}}).profile
    own = params_lib.parse({"profile": {"machine_type": "g2-standard-4", "usd_per_hour": 2.0}}).profile
    assert (cost.hourly_usd(table), cost.hourly_usd(own)) == (pytest.approx(0.71), 2.0)
    # a price of one's own is not the machine type's
    assert cost.price_source(table) == f"g2-standard-4's approximate on-demand price in us-central1, {cost.PRICES_AS_OF}"
    assert cost.price_source(own) == "profile.usd_per_hour"


PROFILE_PARAMS = params_lib.parse({
    "base": {"seed": 1, "device": "cpu"}, "model": {"id": "tiny", "resolution": 32},
    "train": {"batch_size": 2, "wandb": "disabled", "lora": {"rank": 4, "alpha": 4.0}},
    "profile": {"steps": 2, "warmup": 1, "usd_per_hour": 1.0}})


@pytest.fixture(scope="module")
def train_workspace(tmp_path_factory):
    """data/raw and a built cache for the tiny SD1 model, as the profile stage finds them."""
    from conftest import tiny_cache

    ws = tmp_path_factory.mktemp("profile")
    tiny_cache(ws / "data/raw", ws / "cache", 4, 48, PROFILE_PARAMS)
    return ws, PROFILE_PARAMS


def test_on_the_fly_cell_encodes_every_step_and_feeds_the_same_latents(train_workspace, keep_threads):
    from sdtune.data import cache
    from sdtune.profiling import run as prof

    ws, p = train_workspace
    torch.set_num_threads(1)
    cached = prof.profile_cell(p, {"name": "cached"}, ws / "cache", raw_dir=ws / "data/raw")
    fly = prof.profile_cell(p, {"name": "fly", "latents": "on_the_fly"}, ws / "cache", raw_dir=ws / "data/raw")
    for name in ("decode", "encode"):
        assert fly["phases"]["phases"][name]["median_ms"] > 0
        assert name not in cached["phases"]["phases"]
    assert fly["coverage"] >= 0.95
    # The VAE and text encoder run inside the counted step, so it does more work than the cached one.
    assert fly["flops_per_step"] > cached["flops_per_step"] > 0
    # ... and they stay resident: their weights are not put down to activations.
    from sdtune.families import sd

    encoders = sum(t.numel() * t.element_size() for m in (sd.tiny_vae(), sd.tiny_text_encoder()) for t in m.parameters())
    assert fly["memory"]["encoder_weights_bytes"] == encoders
    assert "encoder_weights_bytes" not in cached["memory"]

    # What the encoders make every step is what the cache holds: the cells differ in time only.
    # The cells' runs left their accelerate state behind: a fresh one for this run.
    from accelerate.state import AcceleratorState
    from sdtune.train import loop

    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(p, ws / "cache")
    stored = list(run.items)
    prof.OnTheFly(run, ws / "cache", ws / "data/raw")(0, loop.NullTimer())
    fresh = loop.sample_indices(run, 0, 0)
    assert len(fresh) == 2
    for i in fresh:
        assert run.items[i] is not stored[i] and run.items[i].keys() == stored[i].keys()
        for k in stored[i]:
            assert run.items[i][k].dtype == stored[i][k].dtype == cache.DTYPES[p.cache.dtype]
            torch.testing.assert_close(run.items[i][k], stored[i][k], rtol=1e-4, atol=1e-4)


def test_on_the_fly_encoders_keep_a_float32_vae_instead_of_casting_it_every_step(train_workspace, monkeypatch):
    """On a GPU the encoders load in bf16; the VAE, which asks for float32 (force_upcast), was
    cast to float32 and back in every on-the-fly step. Here the CPU stands in, told to load bf16."""
    from accelerate.state import AcceleratorState

    from sdtune.families import common
    from sdtune.profiling import run as prof
    from sdtune.train import loop

    ws, p = train_workspace
    monkeypatch.setattr(common, "compute_dtype", lambda device: torch.bfloat16)
    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(p, ws / "cache")
    fly = prof.OnTheFly(run, ws / "cache", ws / "data/raw")
    assert fly.pipe.vae.dtype == torch.float32 and fly.pipe.text_encoder.dtype == torch.bfloat16
    casts = []
    monkeypatch.setattr(common, "cast", lambda module, dtype: casts.append(dtype))
    fly(0, loop.NullTimer())
    assert casts == [] and fly.pipe.vae.dtype == torch.float32


def test_unknown_latents_value_is_one_line():
    with pytest.raises(UserError) as err:
        params_lib.cell_params(PROFILE_PARAMS, {"name": "x", "latents": "onthefly"})
    assert str(err.value) == ("params.yaml: profile.matrix.x.latents: expected one of cached, on_the_fly "
                              "(got 'onthefly')")


def test_a_cell_key_the_step_never_reads_is_one_line():
    for key, value in [("log_every", 1), ("validate_every", 1), ("wandb", "online")]:
        with pytest.raises(UserError) as err:
            params_lib.cell_params(PROFILE_PARAMS, {"name": "x", key: value})
        assert str(err.value) == (f"params.yaml: profile.matrix.x.{key}: a cell times the training step alone, "
                                  f"which {key} does not change; remove it")


@pytest.mark.parametrize("profile, message", [
    ({"matrix": [{"name": "ok"}, {"name": "bf16", "mixed_precison": "bf16"}]},
     "my.yaml: unknown key 'profile.matrix.bf16.mixed_precison'; allowed here: "),
    ({"matrix": [{"name": "fly", "latents": "onthefly"}]},
     "my.yaml: profile.matrix.fly.latents: expected one of cached, on_the_fly (got 'onthefly')"),
    ({"inference": [{"name": "half", "dtyp": "bfloat16"}]},
     "my.yaml: unknown key 'profile.inference.half.dtyp'; allowed here: name, dtype, "),
    ({"inference": [{"name": "q", "variant": "nf4-fused", "lora": False}]},
     "my.yaml: profile.inference.q: a variant brings its own dtype and LoRA; drop lora"),
])
def test_a_typo_in_a_profile_cell_stops_the_params_load(profile, message):
    """Every stage loads the params: a mistyped cell stops `dvc repro` at fetch, not after hours of
    training when the profile stage's turn comes."""
    with pytest.raises(UserError) as err:
        params_lib.parse({"profile": profile}, source="my.yaml")
    assert str(err.value).startswith(message)


def test_a_cell_with_a_mistyped_lora_target_stops_the_stage_before_any_cell_is_measured(
        tmp_path, monkeypatch, capsys):
    """peft refuses target modules it finds nowhere only when the cell's denoiser loads: the cells
    before it had been measured by then, and the message did not name the cell."""
    from sdtune.profiling import run as prof

    err = stopped_before_measuring(tmp_path, monkeypatch, capsys, "model: {id: tiny}\nprofile:\n  matrix: "
                                   "[{name: a}, {name: b, lora: {target_modules: [to_q, to_qq]}}]\n")
    assert err == "error: params.yaml: profile.matrix.b.lora.target_modules: to_qq matches no module of the denoiser\n"
    # The family's default targets, and a list peft accepts, pass.
    params = params_lib.parse({"model": {"id": "tiny"}})
    fine = [{"name": "a"}, {"name": "c", "lora": {"target_modules": ["to_q"]}}]
    prof.check_lora_targets(params, families.get("sd1"), fine)


def test_trace_cell_writes_a_chrome_trace_of_the_cells_steps(train_workspace, tmp_path):
    from sdtune.profiling import run as prof

    ws, p = train_workspace
    trace = tmp_path / "trace-fly.json"
    per_kernel, step_ms, copies = prof.trace_cell(p, {"name": "fly", "latents": "on_the_fly"}, ws / "cache", trace,
                                          raw_dir=ws / "data/raw")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step_0", "step_1", "encode", "forward", "backward"} <= names
    # The ops the trace holds, timed per step: a convolution's self time is in the trace too.
    assert {"aten::convolution_backward", "aten::addmm"} <= set(per_kernel) and all(v >= 0 for v in per_kernel.values())
    in_trace = sum(e["dur"] for e in events if e.get("name") == "aten::convolution_backward" and e.get("ph") == "X")
    assert 0 < per_kernel["aten::convolution_backward"] * 2 <= in_trace / 1e3 * 1.001  # self time ≤ inclusive
    # On a CPU every op's self time, and Python's between them, make up about the traced step.
    steps = [e["dur"] / 1e3 for e in events if e.get("name") in ("step_0", "step_1") and e.get("ph") == "X"]
    assert step_ms == pytest.approx(sum(steps) / 2)
    assert 0.8 < sum(per_kernel.values()) / step_ms <= 1.05
    # The copies' ops with their inputs' shapes (none for a 0-d tensor's), each no more than its op's time.
    assert copies and all(0 < c["ms"] <= per_kernel[c["op"]] for c in copies) and any(c["inputs"] for c in copies)


def test_each_compiled_cell_runs_its_own_compiled_denoiser(train_workspace):
    """torch.compile caches compiled code per function, not per model. Without a reset between
    cells, the second compiled cell's fresh denoiser was never compiled and its numbers were
    eager ones under a "compile" name. The third cell takes the CUDA-graph mode's path through
    the loop (on CPU inductor compiles it without graphs)."""
    from torch._dynamo.utils import counters

    from sdtune.profiling import run as prof

    ws, p = train_workspace
    cells = {"compile": {}, "compile-again": {}, "reduce-overhead": {"compile_mode": "reduce-overhead"}}
    for name, keys in cells.items():
        before, compiled = counters["frames"]["ok"], counters["frames"]["total"]
        cell = prof.profile_cell(p, {"name": name, "compile": True, **keys}, ws / "cache", raw_dir=ws / "data/raw")
        assert counters["frames"]["ok"] > before, f"{name}: the denoiser ran uncompiled"
        # One graph for every step of the cell: the FLOP count (under FlopCounterMode) and the
        # floor's count compile nothing more.
        assert counters["frames"]["total"] == compiled + 1, name
        assert cell["step_ms"] > 0 and 0 < cell["mfu"] <= 1


def test_a_failed_cell_does_not_break_dvc_metrics_show(tmp_path):
    """DVC takes a metrics key named `error` for a load failure of the whole file: each run with a
    failed cell made `dvc metrics show` warn that it could not load the metrics."""
    import subprocess

    from sdtune import io
    from sdtune.profiling import tables
    from stages import profile as stage

    def measure(spec):
        raise UserError("train.qlora: 4-bit NF4 loading needs a CUDA GPU")

    done, failed = stage.measure_each([{"name": "qlora", "qlora": True}], measure, "profile")
    assert done == [] and tables.failed_list({"matrix": failed}) == (
        "Cells that did not run:\n\n- `qlora` (matrix): train.qlora: 4-bit NF4 loading needs a CUDA GPU\n")
    # A trace that failed leaves its cell's numbers in the tables, and says so.
    assert tables.failed_list({"trace": {"bf16": {"reason": "CUDA out of memory"}}}).endswith(
        "- `bf16` (trace only: its numbers above stand): CUDA out of memory\n")
    io.write_json(tmp_path / "profile.json", {"best": "baseline", "failed": {"matrix": failed}})
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run(["dvc", "metrics", "show", "profile.json"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "failed to load" not in (out.stdout + out.stderr).lower(), out.stderr


def test_a_cells_floor_counts_every_flop_its_step_dispatches(train_workspace):
    """The floor is counted over the cell's own training step: the same FLOPs FlopCounterMode
    counts on a step of the same batch, LoRA's products among them."""
    from sdtune.profiling import run as prof

    ws, p = train_workspace
    _, run, step_fn, _ = prof._setup(p, {"name": "baseline"}, ws / "cache", ws / "data/raw")
    step = p.profile.warmup
    floor = prof.floor(run, step_fn, step, ceiling_tflops=1.0)
    assert prof.step_batches(run, step) == prof.step_batches(run, step + 1)
    assert sum(k["flops"] for k in floor["kinds"].values()) == flops.count_dispatched_flops(step_fn, step + 1)
    lora = floor["kinds"]["matmul: LoRA"]
    assert lora["flops"] > 0 and lora["bytes"] > 0
    assert floor["ms"] == pytest.approx(sum(k["bound_ms"] for k in floor["kinds"].values()))


def test_floor_trace_and_kept_memory_are_of_one_full_step(tmp_path):
    """With 5 images in batches of 2 the measured steps train 1 and 2 images. The floor, the traced
    steps' kernels with their FLOPs, and what the backward keeps are all of one step, the fullest:
    the traced steps were steps 10000 and up, held to a 1-image step's floor and to the mean step's
    FLOPs, and the memory kept for the backward was half a full step's."""
    from conftest import tiny_cache
    from sdtune.profiling import run as prof

    tiny_cache(tmp_path / "data/raw", tmp_path / "cache", 5, 48, PROFILE_PARAMS)
    p, measured = PROFILE_PARAMS, range(PROFILE_PARAMS.profile.warmup, PROFILE_PARAMS.profile.warmup + 2)
    _, run, step_fn, _ = prof._setup(p, {"name": "baseline"}, tmp_path / "cache", tmp_path / "data/raw")
    images = {i: prof.step_batches(run, i)[0][0] for i in measured}
    assert sorted(images.values()) == [1, 2]  # the case this test is about
    full = next(i for i in measured if images[i] == 2)
    full_floor = prof.floor(run, step_fn, full, ceiling_tflops=1.0)

    cell = prof.profile_cell(p, {"name": "baseline"}, tmp_path / "cache", tmp_path / "trace-baseline.json",
                             raw_dir=tmp_path / "data/raw")
    assert cell["reference_step"]["step"] == full and cell["reference_step"]["images"] == 2
    assert cell["memory"]["kept_for_backward_bytes"] == full_floor["saved_bytes"]
    kinds = {row["kind"]: row for row in cell["kernels"]["rows"]}
    conv = cell["floor"]["kinds"]["convolution"]["flops"]
    assert conv == full_floor["kinds"]["convolution"]["flops"]
    assert kinds["convolution"]["tflop"] * 1e12 == pytest.approx(conv)  # the traced step's own FLOPs
    assert cell["flops_by_kind"]["convolution"] == pytest.approx(conv * 3 / 4)  # the mean: 1.5 images of 2


def test_a_floor_that_cannot_be_counted_costs_the_cell_nothing(train_workspace, tmp_path, monkeypatch):
    from sdtune.profiling import roofline, run as prof

    def count(*args, **kwargs):  # say, an op of a quantized base whose tensors have no storage
        raise RuntimeError("Cannot access storage of TensorWrapper\nsecond line")

    ws, p = train_workspace
    monkeypatch.setattr(roofline, "count", count)
    cell = prof.profile_cell(p, {"name": "baseline"}, ws / "cache", tmp_path / "trace-baseline.json",
                             raw_dir=ws / "data/raw")
    assert cell["floor"] == {"error": "RuntimeError: Cannot access storage of TensorWrapper"}
    assert cell["step_ms"] > 0 and 0 < cell["mfu"] <= 1 and cell["kernels"]["rows"]
    assert "vs_floor" not in cell["kernels"]
    assert roofline.floor_table(cell["floor"], cell["kernels"]) == (
        "The floor count failed: RuntimeError: Cannot access storage of TensorWrapper")


def test_profiled_cell_counts_the_gradients_a_real_step_holds(train_workspace):
    """The step ends with zero_grad(set_to_none=True): counted from .grad after it, gradients were
    always 0 bytes, and on CUDA their bytes were put down to activations instead."""
    from accelerate.state import AcceleratorState

    from sdtune.profiling import run as prof
    from sdtune.train import loop

    ws, p = train_workspace
    cell = prof.profile_cell(p, {"name": "baseline"}, ws / "cache", raw_dir=ws / "data/raw")
    # The bytes of every gradient while a real training step has it, from a hook on each parameter.
    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(p, ws / "cache")
    held = {}

    def record(param):
        held[id(param)] = param.grad.numel() * param.grad.element_size()

    for param in run.denoiser.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(record)
    loop.train_step(run, 0)
    mem = cell["memory"]
    assert mem["gradients_bytes"] == sum(held.values()) == mem["trainable_bytes"] > 0
    assert mem["trainable_bytes"] < mem["weights_bytes"]  # the LoRA's, not the frozen base's
    # The cost is that of the measured median step, at profile.usd_per_hour (1 USD/h here).
    step_s, usd_per_s = cell["phases"]["step_median_ms"] / 1e3, 1.0 / 3600
    assert cell["cost"]["usd_per_1000_steps"] == pytest.approx(step_s * 1000 * usd_per_s)
    assert cell["cost"]["usd_per_run"] == pytest.approx(step_s * p.train.steps * usd_per_s)


def test_kept_for_backward_is_what_a_real_step_saves_and_checkpointing_cuts_it(train_workspace):
    """A cell's memory counts what autograd kept from its step's forward for the backward, on a CPU
    too, where the peak is a resident set that hides it. Counted again here over a fresh run's step
    with saved-tensor hooks of its own, leaving out the parameters' storages (the floor's count
    leaves out parameters and their views), it is the same number. Checkpointing keeps a fraction
    of it. A compiled step is not counted: the floor's count runs it eagerly."""
    from conftest import kept_for_backward
    from sdtune.profiling import run as prof

    ws, p = train_workspace
    kept = {name: prof.profile_cell(p, {"name": name, **keys}, ws / "cache", raw_dir=ws / "data/raw")["memory"]
            ["kept_for_backward_bytes"]
            for name, keys in {"baseline": {}, "ckpt": {"gradient_checkpointing": True}, "compile": {"compile": True}}.items()}
    _, run, step_fn, _ = prof._setup(p, {"name": "baseline"}, ws / "cache", ws / "data/raw")
    weights = {param.untyped_storage().data_ptr() for param in run.denoiser.parameters()}
    with kept_for_backward() as saved:
        step_fn(p.profile.warmup)  # the step the cell's floor counts
    assert kept["baseline"] == sum(n for ptr, (n, _) in saved.items() if ptr not in weights) > 0
    assert 0 < kept["ckpt"] < kept["baseline"] / 2
    assert kept["compile"] is None


def test_a_checkpointing_cell_whose_step_without_it_does_not_fit_keeps_its_numbers(train_workspace, monkeypatch):
    """The model-FLOP count runs the step without checkpointing, after the cell was measured: where
    that step ran out of memory, the whole cell was reported as not run. Now its own step is counted,
    recompute and all, and profile.md says so."""
    import contextlib

    from sdtune.profiling import flops, run as prof, tables

    ws, p = train_workspace
    real_no_recompute, real_count, inside = flops.no_recompute, flops.count_flops_by_op, []

    @contextlib.contextmanager
    def no_recompute(model):
        with real_no_recompute(model):
            inside.append(model)
            try:
                yield
            finally:
                inside.pop()

    def count(fn, *args, **kwargs):  # the CPU allocator's error, where the step without checkpointing runs
        if inside:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
        return real_count(fn, *args, **kwargs)

    spec = {"name": "ckpt", "gradient_checkpointing": True}
    monkeypatch.setattr(flops, "no_recompute", no_recompute)
    monkeypatch.setattr(flops, "count_flops_by_op", count)
    short = prof.profile_cell(p, spec, ws / "cache", raw_dir=ws / "data/raw")
    with pytest.raises(RuntimeError, match="can't allocate memory"):  # without checkpointing, nothing to fall back on
        prof.profile_cell(p, {"name": "baseline"}, ws / "cache", raw_dir=ws / "data/raw")
    monkeypatch.undo()
    fits = prof.profile_cell(p, spec, ws / "cache", raw_dir=ws / "data/raw")
    assert short["flops_with_recompute"] and not fits["flops_with_recompute"]
    assert short["flops_per_step"] > fits["flops_per_step"] > 0  # the recomputed forward is in
    assert short["step_ms"] > 0 and short["images_per_second"] > 0
    rows = tables.table([fits, short]).splitlines()
    assert "†" not in rows[2] and rows[3].count("†") == 2  # TFLOP/s and MFU
    assert rows[4] == "" and rows[5].startswith("† The step without gradient checkpointing")


def test_memory_table_and_chart_show_each_part(tmp_path):
    """profile.md's memory table: the parts of each cell's memory, a dash where a part was not
    measured (reserved and activations on a CPU), the encoders' column only when a cell has them."""

    from sdtune.profiling import tables
    mib = 2**20
    gpu = made_cell("bf16", 16, 100.0)
    gpu["memory"] = {"peak_bytes": 12 * 1024 * mib, "allocated_bytes": 12 * 1024 * mib, "reserved_bytes": 13 * 1024 * mib,
                     "weights_bytes": 1640 * mib, "gradients_bytes": 6 * mib, "optimizer_bytes": 12 * mib,
                     "kept_for_backward_bytes": 9800 * mib, "activations_bytes": 10580 * mib}
    cpu = made_cell("fp32", 2, 100.0)
    cpu["memory"] = {"peak_bytes": 620 * mib, "rss_bytes": 620 * mib, "weights_bytes": 5.5 * mib,
                     "gradients_bytes": 0.09 * mib, "optimizer_bytes": 0.18 * mib,
                     "kept_for_backward_bytes": None, "activations_bytes": None}
    rows = tables.memory_table([gpu, cpu]).splitlines()[2:]
    assert rows[0] == ("| cell | peak MiB | reserved MiB | weights MiB | gradients MiB | optimizer MiB | "
                       "kept for backward MiB | activations MiB |")
    assert rows[2] == "| bf16 | 12288 | 13312 | 1640 | 6.0 | 12.0 | 9800 | 10580 |"
    assert rows[3] == "| fp32 | 620 | – | 5.5 | 0.1 | 0.2 | – | – |"
    fly = made_cell("otf", 2, 100.0)
    fly["memory"] = cpu["memory"] | {"encoder_weights_bytes": 80 * mib}
    assert "| weights MiB | encoders MiB | gradients MiB |" in tables.memory_table([cpu, fly])
    assert tables.memory_table([cpu, fly]).splitlines()[-1] == "| otf | 620 | – | 5.5 | 80.0 | 0.1 | 0.2 | – | – |"
    png = tmp_path / "memory.png"
    charts.memory_chart([gpu, cpu, fly], png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_short_batches_count_in_throughput_and_flops(tmp_path, keep_threads):
    """5 images in batches of 2: every third step trains 1 image. Images/s and MFU come from what
    the measured steps really trained, recorded here from the batches the denoiser was given."""
    from accelerate.state import AcceleratorState

    from conftest import tiny_cache
    from sdtune.profiling import run as prof
    from sdtune.train import loop

    torch.set_num_threads(1)
    p = PROFILE_PARAMS.model_copy(update={"profile": PROFILE_PARAMS.profile.model_copy(update={"steps": 4})})
    tiny_cache(tmp_path / "data/raw", tmp_path / "cache", 5, 48, p)
    cell = prof.profile_cell(p, {"name": "baseline"}, tmp_path / "cache", raw_dir=tmp_path / "data/raw")

    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(p, tmp_path / "cache")
    seen = []
    run.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    measured = range(p.profile.warmup, p.profile.warmup + p.profile.steps)
    step_flops = []
    for i in range(measured.stop):
        if i in measured:
            step_flops.append(flops.count_flops(loop.train_step, run, i))
        else:
            loop.train_step(run, i)
    trained = seen[p.profile.warmup:]
    assert len(trained) == p.profile.steps and min(trained) == 1 and max(trained) == 2
    # Over the median step, which the tables show: one stalled step does not decide the verdicts.
    seconds = cell["phases"]["step_median_ms"] * p.profile.steps / 1e3
    assert cell["images_per_second"] == pytest.approx(sum(trained) / seconds)
    assert cell["flops_per_step"] * p.profile.steps == sum(step_flops)
    assert cell["mfu"] == pytest.approx(sum(step_flops) / seconds / (cell["peak_tflops"] * 1e12))
    assert cell["ceiling_tflops"] == cell["peak_tflops"] > 0  # on a CPU the peak is the measured ceiling


def test_a_cells_nested_keys_change_only_what_they_name():

    p = params_lib.parse({"train": {"lora": {"rank": 16, "alpha": 32.0, "dropout": 0.1,
                                             "target_modules": ["to_q", "to_v"]}}})
    lora = params_lib.cell_params(p, {"name": "rank64", "lora": {"rank": 64}}).train.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (64, 32.0, 0.1, ["to_q", "to_v"])


def test_a_deterministic_cell_leaves_the_process_as_it_found_it(train_workspace):
    from sdtune.profiling import run as prof

    ws, p = train_workspace
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    prof.profile_cell(p, {"name": "deterministic", "deterministic": True}, ws / "cache", raw_dir=ws / "data/raw")
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


@pytest.mark.parametrize("profile, message", [
    ({"matrix": [{"name": "sub/fast"}]}, "cell name 'sub/fast'"),
    ({"usd_per_hour": float("inf")}, "profile.usd_per_hour: Input should be a finite number"),
])
def test_names_that_cannot_be_file_names_and_infinite_prices_are_one_line(profile, message):
    with pytest.raises(UserError, match=message) as err:
        params_lib.parse({"profile": profile})
    assert "\n" not in str(err.value)


def stopped_before_measuring(tmp_path, monkeypatch, capsys, params_yaml: str) -> str:
    """Run the profile stage on `params_yaml` with measuring stood in for; expect it to stop with
    exit 2 before any cell is measured, having written nothing. Returns what it said on stderr."""
    from sdtune.profiling import run as prof
    from stages import profile as stage

    measured = []

    def profile_cell(params, spec, *args, **kwargs):  # stands in for minutes of measuring
        measured.append(spec["name"])
        raise RuntimeError("measured")

    monkeypatch.setattr(prof, "profile_cell", profile_cell)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params_yaml)
    with pytest.raises(SystemExit) as exit_:
        stage.main()
    assert exit_.value.code == 2 and measured == []
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]  # nothing written
    return capsys.readouterr().err


def test_unpriced_machine_type_stops_the_stage_before_any_cell_is_measured(tmp_path, monkeypatch, capsys):
    """The price was looked up after each cell had been measured, and the failure caught per cell:
    every cell was measured, then all of them were thrown away for want of a price."""
    err = stopped_before_measuring(tmp_path, monkeypatch, capsys,
                                   "profile:\n  machine_type: g2-standard-12\n  matrix: [{name: a}, {name: b}]\n")
    assert err == ("error: params.yaml: profile.machine_type: no price for 'g2-standard-12' in the price table "
                   f"(priced: {', '.join(cost.PRICES)}); set profile.usd_per_hour to its hourly price in USD\n")
    # Each machine type the README offers for more GPUs has a price.
    assert all(cost.hourly_price(f"g2-standard-{n}") > 0 for n in (24, 48, 96))


def made_cell(name, batch, step_ms, **spec):
    """A profile.json cell as profile_cell writes it, with only what the findings read: every
    measured step as long as the median."""
    return {"name": name, "spec": {"name": name, **spec}, "step_ms": step_ms, "images_per_step": batch,
            "images_per_second": batch / (step_ms / 1e3), "mfu": 0.1, "memory": {"peak_bytes": 2**30},
            "phases": {"phases": {"encode": {"median_ms": step_ms / 2}}, "step_min_ms": step_ms,
                       "step_max_ms": step_ms}}


def test_a_cell_with_a_key_the_family_refuses_stops_the_stage_before_any_cell_is_measured(
        tmp_path, monkeypatch, capsys):
    """sd3 refuses min-SNR weighting; a cell that sets it used to fail only when its turn came,
    after the cells before it had been measured."""
    err = stopped_before_measuring(tmp_path, monkeypatch, capsys,
                                   "model: {family: sd3, id: tiny}\ntrain: {snr_gamma: null}\n"
                                   "profile:\n  matrix: [{name: a}, {name: snr, snr_gamma: 5.0}]\n")
    assert err.startswith("error: train.snr_gamma: min-SNR weighting is for epsilon/v models")


def test_cells_of_other_batch_sizes_are_compared_by_images_per_second():
    """Ranked by step time, a batch-1 cell was "fastest" and a batch-8 cell that trains more images
    a second "did not help"."""
    from sdtune import report
    from sdtune.profiling import run as prof

    cells = [made_cell("baseline", 2, 100.0), made_cell("bs8", 8, 250.0, batch_size=8),
             made_cell("bs1", 1, 40.0, batch_size=1), made_cell("otf", 2, 200.0, latents="on_the_fly")]
    best = prof.fastest(cells)
    assert best["name"] == "bs8"  # 32 images/s; bs1 has the shortest step but 25 images/s
    lines = report.findings({}, {"cells": {c["name"]: c for c in cells}, "best": best["name"]})
    assert lines[0] == ("- `bs8` helped: 1.60× the speed of `baseline`, the cell it changes by batch_size: 8 "
                        "(32.00 vs 20.00 images/s; 250.0 vs 100.0 ms/step), MFU 10.0% vs 10.0%, peak memory +0%.")
    assert lines[1].startswith("- `bs1` helped: 1.25× the speed of `baseline`, the cell it changes by batch_size: 1")
    assert lines[-1] == ("- The fastest cell, `bs8`, ran 3.20× the speed of `otf`, the way diffusers' example "
                         "scripts train (32.00 vs 10.00 images/s).")


def test_findings_name_the_op_behind_most_of_the_copies(keep_threads):
    """REPORT.md's sentence on copies: their share of the traced kernel time and the op that
    launched the most, from a real profile of a step that makes a channels-last tensor contiguous."""
    from sdtune import report
    from sdtune.profiling import kernels
    from test_kernels import contiguous_copy_step

    torch.set_num_threads(1)
    per_kernel, step_ms, copies = kernels.time_by_kernel(contiguous_copy_step(), 2, "cpu")
    cell = made_cell("bf16", 2, 100.0)
    cell["kernels"] = kernels.breakdown(per_kernel, {}, step_ms, copies=copies)
    copying = sum(r["ms"] for r in cell["kernels"]["rows"] if r["kind"] in ("copy", "layout"))
    top = copies[0]
    (line,) = report.copies_finding(cell)
    assert line == (f"- Copies and layout changes took {copying:.2f} ms of `bf16`'s {cell['kernels']['kernel_ms']:.2f} "
                    f"ms of kernels a step ({copying / cell['kernels']['kernel_ms']:.0%}); the most, {top['ms']:.2f} "
                    f"ms, from `aten::copy_` inside `aten::clone` on {top['inputs']}.")
    cell["kernels"]["copies"] = []  # a breakdown from before the copies were traced: no sentence
    assert report.copies_finding(cell) == []


def test_findings_say_what_a_cell_keeps_for_the_backward():
    """On a CPU the peak is a resident set, which hides what checkpointing saves: the findings say
    what autograd kept for the backward too, where both cells counted it."""
    from sdtune import report

    base = made_cell("bf16", 2, 100.0, mixed_precision="bf16")
    ckpt = made_cell("bf16-ckpt", 2, 125.0, mixed_precision="bf16", gradient_checkpointing=True)
    base["memory"]["kept_for_backward_bytes"], ckpt["memory"]["kept_for_backward_bytes"] = 10 * 2**20, 2 * 2**20
    (line,) = report.findings({}, {"cells": {"bf16": base, "bf16-ckpt": ckpt}, "best": "bf16"})
    assert line.endswith("MFU 10.0% vs 10.0%, peak memory +0%, kept for the backward -80%.")
    ckpt["memory"]["kept_for_backward_bytes"] = None  # its floor count failed
    (line,) = report.findings({}, {"cells": {"bf16": base, "bf16-ckpt": ckpt}, "best": "bf16"})
    assert line.endswith("MFU 10.0% vs 10.0%, peak memory +0%.")


def test_each_cell_is_measured_against_the_earlier_cell_it_changes_least():
    """The real run's matrix: against the first cell (fp32), every bf16 cell would be credited
    with what bf16 itself bought, and checkpointing would seem to help. Each is measured against
    the earlier cell it changes in the fewest train keys, and the sentence names the change; an
    on-the-fly cell is never the reference."""
    from sdtune import report

    cells = [made_cell("fp32", 2, 200.0, mixed_precision="no"),
             made_cell("bf16-on-the-fly", 2, 150.0, mixed_precision="bf16", latents="on_the_fly"),
             made_cell("bf16", 2, 100.0, mixed_precision="bf16"),
             made_cell("bf16-checkpointing", 2, 125.0, mixed_precision="bf16", gradient_checkpointing=True),
             made_cell("bf16-compile", 2, 80.0, mixed_precision="bf16", compile=True),
             made_cell("bf16-compile-cudagraphs", 2, 40.0, mixed_precision="bf16", compile=True,
                       compile_mode="reduce-overhead"),
             made_cell("bf16-rank64", 2, 110.0, mixed_precision="bf16", lora={"rank": 64, "alpha": 64.0})]
    lines = report.findings({}, {"cells": {c["name"]: c for c in cells}, "best": "bf16-compile-cudagraphs"})
    said = {line.split("`")[1]: line for line in lines if line.startswith("- `")}
    assert said["bf16"].startswith("- `bf16` helped: 2.00× the speed of `fp32`, the cell it changes by "
                                   "mixed_precision: bf16 (")
    assert said["bf16-checkpointing"].startswith(
        "- `bf16-checkpointing` did not help: 0.80× the speed of `bf16`, the cell it changes by "
        "gradient_checkpointing: true (")
    assert said["bf16-compile"].startswith("- `bf16-compile` helped: 1.25× the speed of `bf16`, the cell it "
                                           "changes by compile: true (")
    assert said["bf16-compile-cudagraphs"].startswith(
        "- `bf16-compile-cudagraphs` helped: 2.00× the speed of `bf16-compile`, the cell it changes by "
        "compile_mode: reduce-overhead (")
    assert "the cell it changes by lora: {rank: 64, alpha: 64.0} (" in said["bf16-rank64"]
    assert all("the speed of `bf16-on-the-fly`, the cell" not in line for line in lines)
    # Keys one cell sets and the other leaves to train, and cells with the same keys, are said too.
    unset = made_cell("fp32-again", 2, 200.0)
    assert report.change_text(report.changes(unset, cells[0])) == "mixed_precision as in train"
    assert report.change_text(report.changes(cells[0], cells[0])) == "nothing (the same train keys)"


def test_the_real_matrix_measures_each_switch_against_the_cell_it_changes_least():
    """params.yaml's own matrix: the per-channel group norm cell is set against the compiled NCHW
    step, not against eager channels-last, which differs from it in as many keys (the first of
    equals wins, so the matrix lists bf16-compile before bf16-channels-last)."""
    import yaml

    from conftest import ROOT
    from sdtune import report

    matrix = yaml.safe_load((ROOT / "params.yaml").read_text())["profile"]["matrix"]
    cells = [{"name": spec["name"], "spec": spec} for spec in matrix]
    by_name = {c["name"]: c for c in cells}
    refs = {c["name"]: report.reference(c, cells[:i]) for i, c in enumerate(cells) if i}
    gn = "bf16-compile-channels-last-per-channel-gn"
    assert refs[gn]["name"] == "bf16-compile"
    assert report.changes(by_name[gn], refs[gn]) == {"channels_last": True, "group_norm": "per-channel"}
    assert refs["bf16-compile-cudagraphs"]["name"] == "bf16-compile" and refs["bf16-channels-last"]["name"] == "bf16"
    # The fastest step measured on a GPU: what CUDA graphs and the broadcast add to the per-channel cell.
    best = "bf16-compile-cudagraphs-channels-last-per-channel-gn-broadcast-upsample"
    assert refs[best]["name"] == gn
    assert report.changes(by_name[best], refs[best]) == {"compile_mode": "reduce-overhead", "upsample": "broadcast"}


def test_an_on_the_fly_cell_that_is_fastest_is_not_compared_with_itself():
    from sdtune import report
    from sdtune.profiling import run as prof

    cells = [made_cell("baseline", 2, 100.0), made_cell("otf", 2, 80.0, latents="on_the_fly")]
    best = prof.fastest(cells)
    assert best["name"] == "otf"
    lines = report.findings({}, {"cells": {c["name"]: c for c in cells}, "best": best["name"]})
    assert lines == ["- Caching latents and text embeddings did not help: `baseline` reads the cache and ran "
                     "0.80× the speed of `otf`, which reads, resizes and encodes its images every step "
                     "(80.0 vs 100.0 ms/step; 40.0 ms of it decoding and encoding)."]


def test_the_loras_effect_on_style_is_judged_by_kid():
    """FID from the real run's 8 images can rank a shifted set above a same-distribution one;
    the findings quote KID, which is unbiased, and say so when it disagrees with the similarity."""
    from sdtune import report

    profile = {"cells": {"baseline": made_cell("baseline", 2, 100.0)}, "best": "baseline"}
    base = {"style_similarity": 0.40, "fid": 0.30, "kid": 0.0040}
    (line,) = report.findings({"base": base, "lora": {"style_similarity": 0.55, "fid": 0.45, "kid": 0.0010}},
                              profile)
    assert line == ("- The LoRA moved samples closer to the training set's style: style similarity 0.550 vs 0.400 "
                    "for the base model (higher is closer), KID to the training images 0.0010 vs 0.0040 (lower is "
                    "closer; KID, not FID, because FID is biased at a few images per set).")
    (line,) = report.findings({"base": base, "lora": {"style_similarity": 0.55, "fid": 0.2, "kid": 0.0050}}, profile)
    assert line.startswith("- The two measures disagree on whether the LoRA moved samples toward")
    (line,) = report.findings({"base": base, "lora": {"style_similarity": 0.35, "fid": 0.2, "kid": 0.0050}}, profile)
    assert line.startswith("- The LoRA did not move samples closer")


def test_findings_give_a_cells_peak_memory_change_with_its_sign():
    """Each cell otherwise has the same peak here: 80 MiB against 100 MiB is -20%, not +20% or +25%."""
    from sdtune import report

    base, ckpt = made_cell("bf16", 2, 100.0), made_cell("bf16-ckpt", 2, 125.0, gradient_checkpointing=True)
    base["memory"], ckpt["memory"] = {"peak_bytes": 100 * 2**20}, {"peak_bytes": 80 * 2**20}
    (line,) = report.findings({}, {"cells": {"bf16": base, "bf16-ckpt": ckpt}, "best": "bf16"})
    assert line.endswith("MFU 10.0% vs 10.0%, peak memory -20%.")


@pytest.mark.parametrize("step_ms, verdict", [(98.0, "made no real difference"), (104.0, "made no real difference"),
                                              (90.0, "helped"), (110.0, "did not help")])
def test_a_cell_within_5_percent_of_its_reference_made_no_real_difference(step_ms, verdict):
    """1.02× or 0.96× the speed is within a CPU's or GPU's run-to-run noise: neither helped nor hurt."""
    from sdtune import report

    cells = [made_cell("bf16", 2, 100.0), made_cell("bf16-compile", 2, step_ms, compile=True)]
    (line,) = report.findings({}, {"cells": {c["name"]: c for c in cells}, "best": "bf16"})
    assert line.startswith(f"- `bf16-compile` {verdict}: {100.0 / step_ms:.2f}× the speed of `bf16`")


def test_each_variant_is_set_against_the_unquantized_lora_model():
    """A quantized variant holds the LoRA: its size, latency and CLIP score are against base+LoRA's,
    its latency change new over old (1.5 s against 1.0 s is +50%)."""
    from sdtune import report

    profile = {"cells": {"baseline": made_cell("baseline", 2, 100.0)}, "best": "baseline"}
    style = {"style_similarity": 0.5, "kid": 0.001}
    evals = {"base": {"denoiser_mib": 10.0, "latency_s": 2.0, "clip_score": 20.0, **style},
             "lora": {"denoiser_mib": 12.0, "latency_s": 1.0, "clip_score": 25.0, **style},
             "int8wo-fused": {"denoiser_mib": 6.0, "latency_s": 1.5, "clip_score": 24.0, "psnr_to_lora": 30.0}}
    assert report.findings(evals, profile)[-1] == (
        "- `int8wo-fused`: denoiser 6.0 MiB (-50%), latency 1.500 s (+50%), PSNR to the unquantized LoRA model "
        "30.0 dB, CLIP score 24.00 vs 25.00.")


def test_the_report_prices_1000_steps_and_the_run_from_the_fastest_cell(tmp_path):
    from sdtune import io, report

    p = params_lib.parse({"model": {"id": "tiny"}, "train": {"steps": 4000},
                          "profile": {"usd_per_hour": 3.6, "matrix": [{"name": "baseline"}]}})
    cell = made_cell("baseline", 2, 100.0) | {"device": "cuda:0", "device_name": "NVIDIA L4",
                                              "cost": cost.cost(0.1, 4000, 3.6) | {"usd_per_hour": 3.6}}
    io.write_json(tmp_path / "profile.json", {"cells": {"baseline": cell}, "best": "baseline"})
    io.write_json(tmp_path / "eval.json", {})
    io.write_json(tmp_path / "data.json", {"kept": 12, "skipped": 0})
    io.write_json(tmp_path / "train.json", {"steps": 4000, "processes": 1, "device_name": "NVIDIA L4", "device": "cuda",
                                            "mixed_precision": "bf16", "final_loss": 0.1, "final_loss_steps": 10,
                                            "steps_run": 4000, "seconds": 400.0, "steps_per_second": 10.0,
                                            "images_per_second": 20.0})
    (tmp_path / "eval.md").write_text("eval table\n")
    (tmp_path / "profile.md").write_text("profile table\n")
    (tmp_path / "stages").mkdir()
    text = report.build(p, {}, reports=tmp_path)
    # 0.1 s a step at $3.60/h ($0.001/s): $0.100 per 1,000 steps, $0.400 for 4,000.
    assert ("At $3.60/h (profile.usd_per_hour), the fastest cell `baseline` (20.00 images/s) costs $0.100 per "
            "1,000 steps of 2 images and $0.400 for this run's 4000 steps (training only).\n") in text


def test_profile_md_header_says_what_the_numbers_are_against():
    """A reader of profile.md alone learns the card's GEMM ceiling next to its datasheet peak, and
    that a CPU's peak memory is a process-wide resident set."""

    from sdtune.profiling import tables
    gpu = made_cell("bf16", 16, 100.0) | {"device_name": "NVIDIA H200", "peak_source": "datasheet:H200",
                                          "peak_tflops": 989.0, "ceiling_tflops": 808.0}
    gpu["memory"]["source"] = "torch.cuda.max_memory_allocated"
    fp32 = made_cell("fp32", 16, 300.0) | {"device_name": "NVIDIA H200", "peak_source": "datasheet:H200",
                                           "peak_tflops": 494.0, "ceiling_tflops": 51.0, "memory": gpu["memory"]}
    gpu["mixed_precision"], fp32["mixed_precision"] = "bf16", "no"
    text = tables.header([fp32, gpu], PROFILE_PARAMS.profile)
    assert ("A large matmul reaches 51 TFLOP/s in fp32, 10% of its peak; 808 TFLOP/s in bf16, 82% of its peak "
            "on this device.") in text and "resident set" not in text
    cpu = made_cell("fp32", 2, 100.0) | {"device_name": "x86 CPU, 2 threads", "peak_source": "measured",
                                         "peak_tflops": 0.1, "ceiling_tflops": 0.1}
    cpu["memory"]["source"] = "peak RSS since reset_peak (VmHWM)"
    text = tables.header([cpu], PROFILE_PARAMS.profile)
    assert "resident set" in text and "TFLOP/s on this device" not in text


def test_an_inference_cell_times_after_one_warm_up_and_counts_steps_per_second(monkeypatch):
    """As the evaluate stage times its variants: one untimed image first (its first call pays for
    the allocations), then evaluate.latency_repeats timed ones, then one under the FLOP counter;
    steps/s is evaluate.steps over the median seconds an image (the whole image: encoders and decoder in)."""
    from sdtune.evaluate import generate
    from sdtune.profiling import inference

    p = params_lib.parse({"model": {"id": "tiny", "resolution": 32},
                          "evaluate": {"steps": 3, "latency_repeats": 2, "guidance_scale": 0.0}})
    forwards = []
    real = generate.pipeline

    def pipeline(*args, **kwargs):  # the real pipeline, its denoiser's calls counted
        pipe = real(*args, **kwargs)
        pipe.unet.register_forward_hook(lambda *_: forwards.append(1))
        return pipe

    monkeypatch.setattr(generate, "pipeline", pipeline)
    cell = inference.profile_cell(p, {"name": "fp32", "lora": False}, None, torch.device("cpu"))
    assert len(forwards) == (1 + 2 + 1) * 3
    assert cell["timed_images"] == 2
    assert cell["steps_per_second"] == pytest.approx(3 / cell["seconds_per_image"])


def test_an_inference_variant_cell_must_be_saved_and_brings_its_own_dtype(tmp_path, monkeypatch):
    from sdtune.profiling import inference

    with pytest.raises(UserError, match="a variant brings its own dtype and LoRA; drop dtype, lora"):
        params_lib.inference_cell({"name": "q", "variant": "int8wo-fused", "dtype": "bfloat16", "lora": False})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/quantized/int8wo-fused").mkdir(parents=True)
    inference.check_variant(params_lib.inference_cell({"name": "q", "variant": "int8wo-fused"}))
    with pytest.raises(UserError) as err:
        inference.check_variant(params_lib.inference_cell({"name": "q", "variant": "nf4-fused"}))
    assert str(err.value) == ("params.yaml: profile.inference.q.variant: models/quantized/nf4-fused does not exist; "
                              "the quantize stage saved: int8wo-fused")
    # Saved, but of a method this machine cannot run (a GPU run's variants pulled to a laptop): it
    # failed only when its turn came, after the cells before it were measured.
    for name, said in [("nf4-fused", "quantize.variants: 'nf4' needs a CUDA GPU"),
                       ("int4-fused", "params.yaml: profile.inference.q.variant: 'int4-fused' does not start with a "
                                      "known method")]:
        (tmp_path / "models/quantized" / name).mkdir()
        if name == "nf4-fused" and torch.cuda.is_available():
            continue
        with pytest.raises(UserError) as err:
            inference.check_variant(params_lib.inference_cell({"name": "q", "variant": name}))
        assert str(err.value).startswith(said)


def test_activations_on_cuda_are_the_allocated_peak_less_what_is_counted_apart():
    """What a GPU test can only bound from above (kept for backward <= activations), by hand."""
    parts = {"weights_bytes": 100, "encoder_weights_bytes": 30, "gradients_bytes": 20, "optimizer_bytes": 40}
    assert memory.activations(parts, {"allocated_bytes": 1000}, "cuda")["activations_bytes"] == 1000 - 190
    assert memory.activations(parts, {"allocated_bytes": 100}, "cuda")["activations_bytes"] == 0
