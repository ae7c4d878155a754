"""bench/: real-size configs counted on meta, tiny variants trained for a few steps on CPU."""

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import archs, table, train_step
from sdtune import params
from sdtune.train import lora

pytestmark = pytest.mark.usefixtures("keep_threads")  # the benchmarks below set torch's threads to 1

ROOT = Path(__file__).resolve().parent.parent
# One thread: on a loaded 2-core machine two torch threads spin-wait on each other (20x slower).
TINY = ["--tiny", "--threads", "1", "--precision", "fp32", "--steps", "3", "--warmup", "1"]


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_tiny_arch_builds_on_meta_and_materialises(name):
    arch = archs.get(name)
    meta = archs.build(arch, tiny=True)
    assert all(p.is_meta for p in meta.parameters())
    model = archs.build(arch, tiny=True, device="cpu")
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    assert archs.n_params(model) == archs.n_params(meta)
    latents, cond = archs.inputs(arch, 2, archs.TINY_RES, "cpu", torch.float32, tiny=True)
    with torch.no_grad():
        out = model(**{arch.sample_arg: latents, "timestep": torch.tensor([10.0, 900.0])}, **cond).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_tiny_vae_and_text_encoder_materialise():
    vae = archs.build_vae(tiny=True, device="cpu")
    text = archs.build_text_encoder(tiny=True, device="cpu")
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.sample()
        hidden = text(torch.randint(0, 514, (1, 77)))[0]
    assert latents.shape == (1, 4, 8, 8)  # the 8x downsampling of the real VAE
    assert hidden.shape == (1, 77, archs.config(archs.get("sd15"), tiny=True)["cross_attention_dim"])


def _count(name) -> tuple[int, int]:
    model = archs.build(archs.get(name))  # meta: costs nothing
    buffers = sum(b.numel() for b in model.buffers())
    return archs.n_params(model), buffers


def test_real_size_parameter_counts_on_meta():
    # The published sizes of the real models.
    assert _count("sd15")[0] == 859_520_964
    assert _count("sdxl")[0] == 2_567_463_684
    assert archs.n_params(archs.build_vae()) == 83_653_863
    assert archs.n_params(archs.build_text_encoder()) == 123_060_480
    # SD3.5's "2.5B" and "8.1B" count the checkpoint's tensors, which include the fixed sin-cos
    # position table (a buffer in diffusers).
    params, buffers = _count("sd35m")
    assert 2.2e9 < params < 2.3e9 and round((params + buffers) / 1e9, 1) == 2.5
    params, buffers = _count("sd35l")
    assert 8.0e9 < params < 8.1e9 and round((params + buffers) / 1e9, 1) == 8.1


def _independent_flops(argv, checkpointing: bool) -> int:
    """A fresh Bench of the same configuration on the math attention path, its step counted by
    FlopCounterMode directly. On that path attention is plain bmm, 2 products forward and 4
    backward, which torch always counts; the bench's fused kernel (on CPU its formula is one
    sdtune registers) must count the same, without the scores its backward recomputes."""
    bench = train_step.Bench(train_step.parse([*argv, "--attention", "math"]))
    if not checkpointing:
        bench.model.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as counter:
        bench.step()
    return counter.get_total_flops()


def _dispatched_flops(argv, checkpointing: bool) -> int:
    """The same configuration's step as its kernels run it, counted by torch's own formulas."""
    bench = train_step.Bench(train_step.parse(argv))
    if not checkpointing:
        bench.model.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as counter:
        bench.step()
    return counter.get_total_flops()


CASES = {
    "sd15": ["--arch", "sd15", "--kernels"],
    "sd15-ckpt": ["--arch", "sd15", "--checkpointing"],
    "sd35m": ["--arch", "sd35m"],
    "sd35m-ckpt": ["--arch", "sd35m", "--checkpointing"],
    "sd15-loop": ["--arch", "sd15", "--loop", "--phases"],
    "sd35m-loop": ["--arch", "sd35m", "--loop"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = {}
    for case, extra in CASES.items():
        argv = TINY + extra + ["--json", str(out / f"{case}.json")]
        train_step.main(argv)
        done[case] = (argv, out / f"{case}.json")
    argv = ["--tiny", "--threads", "1", "--steps", "3", "--warmup", "1", "--baseline",
            "--json", str(out / "baseline.json")]
    train_step.main(argv)
    done["baseline"] = (argv, out / "baseline.json")
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_measures_time_flops_and_mfu(results, case):
    argv, path = results[case]
    r = json.loads(path.read_text())
    assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0
    assert math.isfinite(r["step_ms_pipelined"]) and r["step_ms_pipelined"] > 0
    assert 0 < r["mfu"] <= 1
    assert r["flops_per_step"] > 0 and r["peak_memory_bytes"] > 0
    assert r["flops_per_step"] == _independent_flops(argv, checkpointing=False)
    if "--checkpointing" in argv:
        # The recomputed forward is dispatched but is not model FLOPs.
        assert r["hfu"] > r["mfu"]
    # HFU's count keeps what the kernels redo: checkpointing's forward, the fused backward's scores.
    assert r["flops_dispatched"] == _dispatched_flops(argv, "--checkpointing" in argv) > r["flops_per_step"]
    assert r["trainable_params"] > 0 and math.isfinite(r["final_loss"])
    # Where the run's wall time went, part by part.
    parts = ["startup", "build", "flop_count", "warmup_steps", "timed_steps", "pipelined_steps"]
    assert list(r["seconds"]) == parts + (["kernel_profile", "floor"] if "--kernels" in argv else [])
    assert all(v > 0 for v in r["seconds"].values())
    assert r["seconds"]["timed_steps"] >= r["steps"] * r["step_ms_mean"] / 1e3  # the timed ones and a little more
    assert r["seconds"]["timed_steps"] == pytest.approx(r["steps"] * r["step_ms_mean"] / 1e3, rel=0.2)
    blocks = r["step_ms_pipelined_blocks"]
    assert len(blocks) == train_step.PIPELINED_BLOCKS and r["step_ms_pipelined"] == sorted(blocks)[1]
    # The lap holds the blocks and the little Python around them (1.5% more on a busy 2-core CPU).
    assert r["seconds"]["pipelined_steps"] * 1e3 >= r["steps"] * sum(blocks) * (1 - 1e-9)
    assert r["seconds"]["pipelined_steps"] * 1e3 == pytest.approx(r["steps"] * sum(blocks), rel=0.2)
    assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    # FLOPs by kind are the parts of the step's count.
    assert sum(r["flops_by_kind"].values()) == r["flops_per_step"]
    if "--kernels" not in argv:
        assert r["kernels"] is None and r["floor"] is None
        return
    rows = {row["kind"]: row for row in r["kernels"]["rows"]}
    assert {"convolution", "matmul", "attention"} <= set(rows)
    for kind in ("convolution", "matmul", "attention"):
        assert rows[kind]["ms"] > 0 and rows[kind]["tflop"] * 1e12 == r["flops_by_kind"][kind]
    assert sum(row["share"] for row in rows.values()) == pytest.approx(1)
    assert r["kernels"]["kernel_ms"] == pytest.approx(sum(row["ms"] for row in rows.values()))
    # The floor under each kind, from one more step counted op by op: its FLOPs are the kernels'
    # (dispatched: the fused attention backward's recompute included), and the kernels are set against it.
    floor = r["floor"]
    assert sum(k["flops"] for k in floor["kinds"].values()) == r["flops_dispatched"]
    assert floor["ceiling_tflops"] > 0 and floor["bandwidth_gbs"] > 0 and floor["kinds"]["matmul: LoRA"]["flops"] > 0
    matmul_floor = floor["kinds"]["matmul"]["bound_ms"] + floor["kinds"]["matmul: LoRA"]["bound_ms"]
    assert r["kernels"]["vs_floor"]["matmul"] == pytest.approx(rows["matmul"]["ms"] / matmul_floor)
    assert set(r["kernels"]["vs_floor"]) == {"convolution", "matmul", "attention"}


@pytest.mark.parametrize("arch", ["sd15", "sd35m"])
def test_loop_times_the_training_loops_own_step_on_the_same_denoiser(results, arch):
    looped = json.loads(results[f"{arch}-loop"][1].read_text())
    plain = json.loads(results[arch][1].read_text())
    assert looped["loop"] and not plain["loop"] and looped["name"].endswith("loop")
    # The same denoiser and LoRA targets: the same model FLOPs, whatever else the loop does.
    assert looped["flops_per_step"] == plain["flops_per_step"]
    assert looped["trainable_params"] == plain["trainable_params"]
    if looped["phases"]:  # the loop's own phases: the batch stacked on the host, then copied
        assert {"data", "h2d", "forward", "backward", "optimizer"} <= set(looped["phases"])


def test_loop_refuses_what_the_training_loop_does_not_do(capsys):
    for extra in (["--baseline"], ["--arch", "sd15", "--compile", "--compile-scope", "blocks"]):
        with pytest.raises(SystemExit):
            train_step.parse(["--tiny", "--loop", *extra])
        assert "--loop runs the training loop's own step" in capsys.readouterr().err


def test_baseline_runs_the_diffusers_example_step(results):
    argv, path = results["baseline"]
    r = json.loads(path.read_text())
    assert r["baseline"] and r["precision"] == "fp16"
    assert r["step_ms"] > 0 and 0 < r["mfu"] <= 1
    # The VAE encode and text-encoder forward are inside the step: more FLOPs than the UNet alone.
    unet_only = json.loads(results["sd15"][1].read_text())["flops_per_step"]
    assert r["flops_per_step"] > unet_only


def test_table_renders_results_failures_and_targets(results, tmp_path):
    stub = tmp_path / "failed.json"
    stub.write_text(json.dumps({"name": "sd35l-bs1-nf4", "error": "timed out after 120s"}))
    paths = [str(p) for _, p in results.values()] + [str(stub)]
    md = table.main(paths + ["--json", str(tmp_path / "bench.json"), "--md", str(tmp_path / "bench.md")])
    assert (tmp_path / "bench.md").read_text() == md
    for case in ["sd15-tiny 64px bs1 fp32", "sd35m-tiny 64px bs1 fp32 ckpt", "timed out after 120s"]:
        assert case in md
    assert "×" in md  # the speedup over the baseline of the same arch, size and batch
    # Each time with its spread; a run recorded before the spread was (docs/results) shows the time alone.
    r = json.loads(Path(paths[0]).read_text())
    blocks = r["step_ms_pipelined_blocks"]
    row = (f"| {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) "
           f"| {r['step_ms_pipelined']:.1f} ({min(blocks):.1f}–{max(blocks):.1f}) |")
    assert row in md
    old = {k: v for k, v in r.items() if k not in ("step_ms_min", "step_ms_max", "step_ms_pipelined_blocks")}
    assert f"| {r['step_ms']:.1f} | {r['step_ms_pipelined']:.1f} |" in table.results_table([old])
    broken = r | {"compile_cache": {"graphs": 4, "graph_breaks": 3}}  # a compiled run Dynamo broke up
    assert f"| {r['name']} (3 graph breaks) |" in table.results_table([broken])
    # A -cudagraphs run whose graphs inductor compiled without them (on this CPU a tiny reduce-overhead
    # run counts 1 skip) is not what its name says.
    skipped = r | {"compile_cache": {"graphs": 1, "graph_breaks": 0, "cudagraph_skips": 2}}
    assert f"| {r['name']} (CUDA graphs skipped for 2 graph(s)) |" in table.results_table([skipped])
    assert "**sd15-tiny 64px bs1 fp32**: kernel time by kind, per step" in md  # the one --kernels run
    assert md.count("kernel time by kind") == 1 and "| all kernels |" in md
    assert md.count("**sd15-tiny 64px bs1 fp32**: Each kind's floor: one step's ops") == 1
    combined = json.loads((tmp_path / "bench.json").read_text())
    assert len(combined["results"]) == len(paths)
    # Tiny runs never count towards the real-size targets.
    assert [t["result"] for t in combined["targets"]] == ["not run"] * len(table.TARGETS)
    # A whole call's bench.json (docs/results/ keeps them) makes the same tables again.
    assert table.main([str(tmp_path / "bench.json")]) == md
    for bad, says in [("[1, 2]", 'expected a run\'s JSON (with "name") or a bench.json (with "results")'),
                      ("{", "cannot read it as JSON")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'bad.json'}: {says}")):
            table.main([str(tmp_path / "bad.json")])


def test_table_judges_targets():
    row = {"name": "x", "arch": "sd15", "bs": 16, "res": 512, "tiny": False, "baseline": False, "nf4": False,
           "precision": "bf16", "mfu": 0.40, "step_ms": 80.0, "peak_memory_bytes": 2**30}
    # An fp32 run's MFU is against fp32's peak (67 TFLOP/s on an H100): it never counts for the target.
    fp32 = row | {"name": "w", "precision": "fp32", "mfu": 0.45, "step_ms": 900.0}
    judged = table.judge([fp32, row, row | {"name": "y", "mfu": 0.2}, row | {"bs": 1, "name": "z", "step_ms": 70.0}])
    assert (judged[0]["run"], judged[0]["result"]) == ("x", "pass")
    assert table.judge([fp32])[0]["result"] == "not run"
    assert (judged[1]["run"], judged[1]["result"]) == ("z", "FAIL")
    assert judged[2]["result"] == judged[3]["result"] == "not run"


def _bench_row(name, **keys):
    return {"name": name, "arch": "sd15", "tiny": False, "res": 512, "bs": 4, "baseline": False, "nf4": False,
            "precision": "bf16", "step_ms": 100.0, "step_ms_pipelined": 100.0, "images_per_second": 40.0,
            "flops_per_step": 1e12, "mfu": 0.3, "peak_memory_bytes": 2**30, **keys}


def test_speedup_is_the_same_batchs_baseline_time_over_the_runs():
    """The baseline of the same arch, size and batch: a bs1 baseline's shorter step is not the bar."""
    rows = [_bench_row("base-bs4", baseline=True, step_ms=100.0), _bench_row("base-bs1", baseline=True, bs=1, step_ms=30.0),
            _bench_row("fast-bs4", step_ms=40.0)]
    assert table.speedup(rows[2], rows) == pytest.approx(2.5)
    assert table.speedup(rows[0], rows) is None  # a baseline is not sped up against itself
    lines = table.results_table(rows).splitlines()
    assert lines[-1].startswith("| fast-bs4 |") and lines[-1].endswith("| 2.50× |")
    assert lines[2].endswith("| 1.00 |  |")  # the baseline's own row: peak GiB, then no speedup


def test_a_baseline_run_never_meets_a_target_and_the_qlora_bar_is_20_gib():
    fast_baseline = _bench_row("baseline-bs1", baseline=True, bs=1, step_ms=50.0)
    slow = _bench_row("ours-bs1", bs=1, step_ms=70.0)
    judged = table.judge([fast_baseline, slow])[1]
    assert (judged["run"], judged["value"], judged["result"]) == ("ours-bs1", 70.0, "FAIL")
    assert table.judge([fast_baseline])[1]["result"] == "not run"
    # 19.5 GiB is 20.9 GB: under 20 GiB, over 20 GB.
    qlora = _bench_row("sd35l-nf4", arch="sd35l", bs=1, res=1024, nf4=True, peak_memory_bytes=int(19.5 * 2**30))
    judged = table.judge([qlora])[3]
    assert (judged["run"], judged["shown"], judged["result"]) == ("sd35l-nf4", "19.5 GiB", "pass")
    assert table.judge([qlora | {"peak_memory_bytes": int(20.5 * 2**30)}])[3]["result"] == "FAIL"


@pytest.mark.parametrize("argv, message", [
    (["--arch", "sd35l", "--nf4"], "--nf4 needs a CUDA GPU"),
    (["--attention", "fa4"], "--attention fa4 needs a CUDA GPU: FlashAttention 4's kernels run on Hopper and Blackwell only"),
])
def test_cuda_only_options_say_so_in_one_line(capsys, argv, message):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit):
        train_step.parse(["--tiny", *argv])
    assert message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--bs", "0"], "--bs: expected a whole number of at least 1, got 0"),
    (["--res", "0"], "--res: expected a whole number of at least 8, got 0"),
    (["--rank", "-4"], "--rank: expected a whole number of at least 1, got -4"),
    (["--steps", "0"], "--steps: expected a whole number of at least 1, got 0"),
    (["--warmup", "-1"], "--warmup: expected a whole number of at least 0, got -1"),
    (["--threads", "0"], "--threads: expected a whole number of at least 1, got 0"),
])
def test_sizes_and_counts_below_their_least_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        train_step.parse(["--tiny", *argv])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_flash_attention_4_is_asked_of_torch_by_name():
    # torch imports the flash-attn-4 package only when FA4 is activated; without the package the
    # run fails with the import's own error (in --many: that run only), and the flash backend is
    # left as it was.
    from torch.nn import attention

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn-4 is installed: tests/test_gpu.py runs it")
    with pytest.raises(ModuleNotFoundError, match="No module named 'flash_attn'"):
        train_step.flash_attention_4()
    assert attention.current_flash_attention_impl() is None


def test_nf4_quantization_code_path_on_cpu():
    # The CLI refuses NF4 without CUDA; bitsandbytes' Linear4bit itself runs on CPU, so the layer
    # replacement and LoRA on top of it are checked here.
    import bitsandbytes as bnb

    torch.set_num_threads(1)
    arch = archs.get("sd35l")
    model = archs.build(arch, tiny=True, device="cpu", dtype=torch.bfloat16, nf4=True)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and not any(type(m) is torch.nn.Linear for m in model.modules())
    lora.add(model, params.Lora(rank=4, alpha=4.0), arch.lora_targets)
    model.train()
    latents, cond = archs.inputs(arch, 1, archs.TINY_RES, "cpu", torch.bfloat16, tiny=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(hidden_states=latents, timestep=torch.tensor([500.0]), **cond).sample
    out.float().square().mean().backward()
    grads = [p.grad for p in lora.trainable(model)]
    assert grads and all(g is not None for g in grads)


def test_many_runs_share_a_process_and_each_gets_its_result(tmp_path):
    """bench/gpu.sh runs its eager runs this way: one that fails or runs past its limit is reported
    as such, and the next one still runs, from a clean slate and without paying the imports again."""
    tiny = "--tiny --threads 1 --res 64 --bs 1 --precision fp32 --steps 2 --warmup 1"
    names = ["first", "no-such-kernel", "slow", "after"]
    extra = {"no-such-kernel": "--attention cudnn", "slow": "--steps 100000", "after": "--loop"}
    limit = {"slow": 1}
    (tmp_path / "runs.txt").write_text("".join(
        f"{limit.get(n, 120)} --name {n} {tiny} {extra.get(n, '')} --json {tmp_path / n}.json\n" for n in names))
    train_step.main(["--many", str(tmp_path / "runs.txt")])
    r = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    assert r["first"]["step_ms"] > 0 and r["after"]["step_ms"] > 0 and r["after"]["loop"]
    assert r["no-such-kernel"]["error"].startswith("failed: RuntimeError")  # cuDNN attention, on a CPU
    assert r["slow"]["error"] == "timed out after 1s"
    assert r["after"]["seconds"]["startup"] < 1.0  # the imports were paid by the first run
    rows = table.load(sorted(tmp_path.glob("*.json")))
    assert "| no-such-kernel | failed: RuntimeError" in table.results_table(rows)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_run_past_its_limit_stops_even_when_its_first_alarm_is_swallowed():
    """The alarm's exception, raised inside a finaliser, is printed and dropped by Python: the
    limit must still stop the run (once, a --many test run took 100,000 steps this way)."""
    import time

    class SlowFinaliser:
        def __del__(self):  # busy past the limit, so the first alarm goes off in here
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                pass

    began = time.monotonic()
    with pytest.raises(train_step.RunTimeout), train_step.time_limit(1):
        SlowFinaliser()
        while time.monotonic() - began < 6:
            time.sleep(0.01)
    assert time.monotonic() - began < 4


def test_gpu_script_groups_eager_runs_and_reports_every_run_on_cpu(tmp_path):
    """The script itself, on this CPU at tiny sizes: the GPU tests (skipped here), three groups of
    eager runs, one run failing."""
    runs = ["sd15-bs16-bf16", "sd15-bs1-bf16", "sd15-bs16-bf16-cudnn-attn", "sd15-bs16-bf16-ckpt"]
    out = _gpu_script(tmp_path, " ".join(["tests", *runs]), BENCH_SKIP_TESTS="")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert list(rows) == runs  # the script's order, each run with its own row
    assert all(rows[n]["step_ms"] > 0 for n in runs if n != "sd15-bs16-bf16-cudnn-attn")
    assert rows["sd15-bs16-bf16-cudnn-attn"]["error"].startswith("failed: RuntimeError")  # and the next still ran
    assert rows["sd15-bs16-bf16-ckpt"]["checkpointing"]
    assert out.stdout.count("(one process") == 3
    assert {p.name for p in (tmp_path / "runs").glob("group-*.log")} == {
        "group-targets.log", "group-kernels.log", "group-matrix.log"}
    # Each GPU test's verdict on a line of its own (-v), under pytest-timeout's per-test limit: a
    # hung test fails alone, and the verdicts before a hang survive the overall limit.
    tests = (tmp_path / "gpu-tests.txt").read_text()
    assert "timeout: 120.0s" in tests
    verdict = "tests/test_gpu.py::test_bf16_training_on_cuda_uses_fused_adamw "
    assert verdict in tests and verdict in out.stdout


@pytest.fixture
def saved_fp32_precision():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    yield
    matmul.fp32_precision, conv.fp32_precision = saved


def test_only_fp32_runs_set_the_fp32_precision_flags(saved_fp32_precision):
    """Setting cuDNN's conv precision through the new API makes the legacy getter
    torch.backends.cudnn.allow_tf32 raise, and inductor's max-autotune conv template reads it
    (pytorch issue 166387): a bf16 run, also one after an fp32 run in a --many process, leaves it readable."""
    tiny = ["--tiny", "--threads", "1", "--arch", "sd15"]
    train_step.Bench(train_step.parse(tiny + ["--precision", "bf16"]))
    assert isinstance(torch.backends.cudnn.allow_tf32, bool)
    train_step.Bench(train_step.parse(tiny + ["--precision", "fp32"]))
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
    train_step.Bench(train_step.parse(tiny + ["--precision", "bf16"]))
    assert isinstance(torch.backends.cudnn.allow_tf32, bool)


def test_table_says_what_its_mfu_counts():
    # MFU counts model FLOPs: a fused attention kernel's recomputed scores and checkpointing's
    # recomputed forward are left out (the JSON's HFU keeps them); the table must say so.
    md = table.render([], [])
    assert "FlopCounterMode" in md and "model FLOPs" in md and "4 matmuls" in md
    assert "recomputed QKᵀ and gradient checkpointing's recomputed forward are left out" in md


def _gpu_script(tmp_path, only, budget_s=300, **env):
    """bench/gpu.sh on this CPU at tiny sizes, the GPU tests skipped unless env says otherwise."""
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_SKIP_INSTALL": "1", "BENCH_SKIP_TESTS": "1",
           "BENCH_ONLY": only, "BENCH_BUDGET_S": str(budget_s), "PYTHONPATH": str(ROOT),
           "BENCH_EXTRA": "--tiny --res 64 --threads 1 --precision fp32 --steps 2 --warmup 1",
           "BENCH_WARMED_DIR": str(tmp_path / "warmed"), **env}
    return subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_script_runs_in_bench_only_order_and_starts_no_run_that_needs_more_than_is_left(tmp_path):
    """A run is not started when less is left than it needs (the CUDA-graphs loop run needs 240 s:
    cut to what was left it would time out and waste the time), and BENCH_ONLY's order is the order."""
    # On two lines, as docs/benchmarks.md writes a long BENCH_ONLY: a name after a newline still counts.
    out = _gpu_script(tmp_path, "sd15-bs1-bf16-compile-cudagraphs-loop-no-autocast\n    sd15-bs1-bf16", budget_s=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["sd15-bs1-bf16-compile-cudagraphs-loop-no-autocast", "sd15-bs1-bf16"]
    assert re.fullmatch(r"not run: needs 240 s, \d+ s left", rows[0]["error"])
    assert "== sd15-bs1-bf16-compile-cudagraphs-loop-no-autocast: not run: needs 240s" in out.stdout
    assert rows[1]["step_ms"] > 0
    # The log says how far a run got, part by part (a run cut off at its limit shows where).
    log = (tmp_path / "runs" / "group-targets.log").read_text()
    parts = [re.escape(f"  sd15-bs1-bf16: {part} took ") + r"\d+\.\d s" for part in rows[1]["seconds"]]
    assert re.search(r"[\s\S]*".join(parts), log), log[-2000:]
    assert "sd15-bs1-bf16: startup took" not in out.stdout  # the summary keeps to the results
    # The ceilings the call measures first: GEMMs' rate and memory's (bench.roofline's --peak-tflops, --bandwidth-gbs).
    versions = (tmp_path / "versions.txt").read_text()
    assert re.search(r"bf16 matmul ceiling \(1024\^3, best of 5\): \d+ TFLOP/s", versions), versions
    assert re.search(r"copy bandwidth \(256 MiB, best of 5\): \d+ GB/s", versions), versions


def test_gpu_script_compiles_ahead_and_the_timed_run_loads_the_compiled_graphs(tmp_path):
    """BENCH_WARM: a --warm-only process compiles the run first (here alone, on a GPU box while
    the tests run); the timed run then needs WARM_NEED_S and takes its graphs from inductor's cache.
    Only one wave compiles ahead (BENCH_WARM runs): with all 25 compiled runs of the full plan
    waiting for the warm processes, nothing was timed within the budget."""
    # The warm process alone took 150-195 s on a quiet 2-core machine, and the timed run needs 45 s
    # after it: with 250 s of budget a busier machine left it too little. 400 s gives room and still
    # too little for the second run (it needs 240 s), which only shows that one wave compiles ahead.
    caches = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "BENCH_WARMED_DIR": str(tmp_path / "warmed")}
    out = _gpu_script(tmp_path, "sd15-bs16-bf16-compile sd15-bs1-bf16-compile-cudagraphs", budget_s=400,
                      BENCH_WARM="1", BENCH_WARM_NEED_S="45", **caches)
    warm_log = tmp_path / "runs" / "sd15-bs16-bf16-compile.warm.log"
    said = "\n".join(line for line in out.stdout.splitlines() if line.startswith("== "))
    said += "\nwarm log:\n" + (warm_log.read_text()[-1500:] if warm_log.exists() else "(none)")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "== compiling ahead, 1 at a time: sd15-bs16-bf16-compile\n" in out.stdout, said
    assert not (tmp_path / "runs" / "sd15-bs1-bf16-compile-cudagraphs.warm.log").exists()
    assert re.search(r"== waited \d+s for the warm processes to end", out.stdout), said  # timed alone
    assert "== sd15-bs16-bf16-compile: compiled ahead" in out.stdout + out.stderr, said
    assert re.search(r"== sd15-bs16-bf16-compile \(timeout \d+s, needs 45s", out.stdout)
    warm = json.loads((tmp_path / "runs" / "sd15-bs16-bf16-compile.warm.json").read_text())
    timed = json.loads((tmp_path / "runs" / "sd15-bs16-bf16-compile.json").read_text())
    assert warm["warm_only"] and warm["compile_cache"]["fx_graph_miss"] > 0
    assert timed["compile_cache"]["fx_graph_miss"] == 0 and timed["compile_cache"]["fx_graph_hit"] > 0
    # AOTAutograd's cache too, though the LoRA layers are a custom autograd.Function (AddmmLora).
    assert warm["compile_cache"]["aot_autograd_miss"] > 0 and timed["compile_cache"]["aot_autograd_hit"] > 0
    assert timed["step_ms"] > 0 and timed["compile"]
    # The whole UNet, LoRA layers and all, is one graph: a break would show in both counts.
    for r in (warm, timed):
        assert r["compile_cache"]["graphs"] >= 1 and r["compile_cache"]["graph_breaks"] == 0
        assert r["compile_cache"]["cudagraph_skips"] == 0  # the default mode asks for no CUDA graphs
        assert r["graph_break_reasons"] == []
    # A later call on the same machine (a device machine stays warm between calls) remembers what
    # was compiled: not compiled ahead again, and it asks only WARM_NEED_S (here more than is left).
    again = _gpu_script(tmp_path / "again", "sd15-bs16-bf16-compile", budget_s=20, BENCH_WARM="1",
                        BENCH_WARM_NEED_S="45", **caches)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "compiling ahead" not in again.stdout
    assert "== sd15-bs16-bf16-compile: compiled ahead in an earlier call on this machine" in again.stdout
    assert re.search(r"== sd15-bs16-bf16-compile: not run: needs 45s, \d+s left", again.stdout), again.stdout
    # With another inductor cache its graphs are not there: it needs its own time again.
    elsewhere = _gpu_script(tmp_path / "elsewhere", "sd15-bs16-bf16-compile", budget_s=20, BENCH_WARM="0",
                            BENCH_WARM_NEED_S="45", **caches | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "other")})
    assert re.search(r"== sd15-bs16-bf16-compile: not run: needs 240s, \d+s left", elsewhere.stdout), elsewhere.stdout


def test_gpu_script_installs_a_packed_wheel_in_a_call_of_its_own(tmp_path):
    """BENCH_INSTALL_ONLY: FlashAttention 4's wheels, too big to travel with the others, are
    installed by a call of their own into the folder the next call runs from; the largest comes
    as its contents, xz-packed. Here a one-module package stands in for it: what is checked is
    the unpacking and the import, before any other check or run."""
    tree = tmp_path / "tree" / "flash_attn" / "cute"
    tree.mkdir(parents=True)
    (tree.parent / "__init__.py").write_text("")
    (tree / "__init__.py").write_text("")
    (tree / "interface.py").write_text("")
    (tmp_path / "wheels").mkdir()
    with tarfile.open(tmp_path / "wheels" / "flash-attn.tar.xz", "w:xz") as packed:
        packed.add(tree.parent, arcname="flash_attn")
    site = tmp_path / "site"
    out = _gpu_script(tmp_path, "sd15-bs1-bf16", BENCH_INSTALL_ONLY="1",
                      BENCH_SITE=str(site), BENCH_FA4_WHEELS=str(tmp_path / "wheels"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (site / "flash_attn" / "cute" / "interface.py").exists()
    assert (tmp_path / "fa4.txt").read_text() == "FlashAttention 4: importable\n"
    assert not (tmp_path / "versions.txt").exists() and not (tmp_path / "bench.json").exists()


def test_inductor_options_are_checked_and_hold_for_their_run_only(monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    for bad, message in [("nope=1", "'nope': torch._inductor.config has no such option"),
                         ("force_layout_optimization=1", "'force_layout_optimization': expected a value of type bool, "
                                                         "as the option is now False (got 1)"),
                         ("force_layout_optimization", "force_layout_optimization: expected KEY=VALUE")]:
        with pytest.raises(SystemExit):
            train_step.parse(["--tiny", "--compile", "--inductor", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_step.parse(["--tiny", "--inductor", "force_layout_optimization=True"])
    assert "needs --compile" in capsys.readouterr().err

    args = train_step.parse(["--tiny", "--compile", "--inductor", "force_layout_optimization=True",
                             "--inductor", "triton.cudagraphs=True"])
    assert args.name.endswith("compile force_layout_optimization=True triton.cudagraphs=True")
    seen = {}
    monkeypatch.setattr(train_step, "_run", lambda a, began: seen.update(
        layout=inductor_config.force_layout_optimization, graphs=inductor_config.triton.cudagraphs))
    train_step.run(args)
    assert seen == {"layout": True, "graphs": True}
    assert not inductor_config.force_layout_optimization and not inductor_config.triton.cudagraphs


def test_many_starts_no_run_that_needs_more_than_is_left(tmp_path):
    tiny = "--tiny --threads 1 --res 64 --bs 1 --precision fp32 --steps 2 --warmup 1"
    (tmp_path / "runs.txt").write_text(f"120 100000 --name big {tiny} --json {tmp_path}/big.json\n"
                                       f"120 30 --name fits {tiny} --json {tmp_path}/fits.json\n")
    train_step.main(["--many", str(tmp_path / "runs.txt"), "--budget-s", "60"])
    big = json.loads((tmp_path / "big.json").read_text())
    assert re.fullmatch(r"not run: needs 100000 s, \d+ s left", big["error"])
    assert json.loads((tmp_path / "fits.json").read_text())["step_ms"] > 0


def test_gpu_script_warns_of_a_misspelt_name_first_and_finishes_without_runs(tmp_path):
    """BENCH_ONLY=tests, or a typo: no benchmark run, so no table, but the script still packs the
    logs and says how long it took; the typo is the first line, before any time is spent."""
    out = _gpu_script(tmp_path, "tests sd15-bs1-bf16-compile-cudagrahps", BENCH_PACK="1", BENCH_IMPORT_TIMES="1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("WARNING: BENCH_ONLY names no run or group: sd15-bs1-bf16-compile-cudagrahps")
    assert "no benchmark run selected" in out.stdout and lines[-1].startswith("total ")
    assert (tmp_path / "runs.tar.gz").exists() and not (tmp_path / "bench.json").exists()
    # Where a bench process's import time goes, slowest first, though nothing was timed.
    with tarfile.open(tmp_path / "runs.tar.gz") as packed:
        assert "import time:" in packed.extractfile("runs/importtime.txt").read().decode()
    slowest = out.stdout.split("the slowest imports of a bench process")[1].splitlines()[1]
    assert slowest.strip().endswith("| bench.train_step")


@pytest.mark.parametrize("extra", [[], ["--loop"]])
def test_no_autocast_steps_the_bf16_base_without_autocast_to_the_same_loss_on_a_cpu(extra, capsys):
    """--no-autocast (the loop's train.autocast: false): the step runs outside autocast, in the
    bench's own step and the loop's. On a CPU, whose autocast keeps norms in bf16, the loss is the
    autocast step's to the bit."""
    argv = ["--tiny", "--threads", "1", "--precision", "bf16", "--arch", "sd15", *extra]
    losses, seen = {}, {}
    for off in (False, True):
        args = train_step.parse(argv + ["--no-autocast"] * off)
        bench = train_step.Bench(args)
        seen[off] = set()
        for m in bench.model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.register_forward_pre_hook(lambda m, a, off=off: seen[off].add(torch.is_autocast_enabled("cpu")))
        losses[off] = bench.step()
    assert seen == {False: {True}, True: {False}}
    assert torch.isfinite(losses[True]) and torch.equal(losses[True], losses[False])
    assert args.name.endswith("no-autocast")
    with pytest.raises(SystemExit):
        train_step.parse([*argv, "--precision", "fp32", "--no-autocast"])
    assert "--no-autocast: fp32 runs no autocast anyway" in capsys.readouterr().err.splitlines()[-1]


def test_every_run_of_the_gpu_script_parses(tmp_path):
    """bench/gpu.sh's runs are only ever started on a GPU box: a misspelt option there would cost a
    run of a scarce call. Each run's arguments must pass bench.train_step's checks (as on CUDA)."""
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_LIST": "1"}
    out = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert len(names) == len(set(names)) > 40 and "sd15-bs16-bf16-compile-channels-last-per-channel-gn-cudagraphs" in names
    for line in lines:
        name, *argv = shlex.split(line)
        args = train_step.parse([*argv, "--device", "cuda"])
        assert args.bs > 0, name
