"""sdtune.profiling.roofline and bench/roofline.py: each op held to its FLOPs or its bytes,
attention counted as the fused kernels run it, LoRA's products apart; checked against the ops a
CPU step really dispatches."""

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import roofline as cli, train_step
from sdtune.profiling import roofline
from sdtune.profiling.roofline import LORA

pytestmark = pytest.mark.usefixtures("keep_threads")  # train_step's --threads 1

TINY = ["--tiny", "--threads", "1", "--precision", "fp32", "--steps", "2", "--warmup", "1"]


def _bench(*extra, device="meta"):
    return train_step.Bench(train_step.parse([*TINY, *extra, "--device", device]))


def test_a_linear_layer_is_held_to_its_bytes_or_its_flops():
    x, layer = torch.randn(64, 32), torch.nn.Linear(32, 16)
    counted = roofline.Roofline(peak_tflops=1.0, bandwidth_gbs=1.0)
    with counted:
        layer(x).sum().backward()
    addmm = counted.ops[("aten.addmm", "matmul")]
    assert (addmm["calls"], addmm["flops"], addmm["exps"]) == (1, 2 * 64 * 32 * 16, 0)
    assert addmm["bytes"] == 4 * (16 + 64 * 32 + 32 * 16 + 64 * 16)  # bias, x and Wᵀ read; the output written
    assert addmm["bound_seconds"] == addmm["serial_seconds"] == max(addmm["flops"] / 1e12, addmm["bytes"] / 1e9)
    assert addmm["bound_seconds"] == addmm["memory_bound_seconds"]  # at 1 GB/s per 1 TFLOP/s
    mm = counted.ops[("aten.mm", "matmul")]
    assert (mm["calls"], mm["flops"]) == (1, 2 * 64 * 32 * 16)  # the weight's gradient
    assert not {op for op, _ in counted.ops} & {"aten.t", "aten.view", "aten.expand"}  # views move nothing


def _fused(fn):
    """The memory-bound bytes of fn() fused between GEMM-like ops, in units of 64×64 float32."""
    counted = roofline.Roofline(1.0, 1.0)
    with counted:
        fn()
    return counted.windows.bytes() / (64 * 64 * 4)


def test_fused_memory_bound_ops_read_what_they_did_not_make_and_write_what_is_needed_later():
    x, w, p = torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64)
    # Between two matmuls, relu, ×2 and +x read x once and write only the sum the matmul reads (eager
    # moves six: x and each result read and written).
    assert _fused(lambda: torch.mm(torch.relu(x).mul(2).add(x), w)) == 2
    # x·2 is read again after the first matmul, in the next window: written once, read twice; each
    # window's result is read by its matmul: x, x·2, relu's, x·2 again, +1's.
    assert _fused(lambda: (lambda a: (torch.mm(torch.relu(a), w), torch.mm(a + 1, w)))(x * 2)) == 5
    # A tensor that was there before is written in place: read p and x, write p.
    assert _fused(lambda: p.add_(x)) == 3
    # What outlives the call is written, though nothing reads it.
    kept = []
    assert _fused(lambda: kept.append(x * 2)) == 2


def test_lora_products_are_the_six_matmuls_through_the_adapter():
    """Three frozen layers, LoRA on the middle one, the input's gradient wanted: forward x·Aᵀ and
    (x·Aᵀ)·Bᵀ, backward gradient·B, (gradient·B)·A and the two weight gradients are LoRA's; the
    three base layers' forward and their input gradients are not, though the middle one's reaches
    the first through a sum with LoRA's."""
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["1"]), model.requires_grad_(False))
    x = torch.randn(10, 24, requires_grad=True)
    counted = roofline.count(lambda: model(x).sum().backward(), peak_tflops=1.0, bandwidth_gbs=1.0,
                             lora_params=[p for p in model.parameters() if p.requires_grad])
    assert (counted.ops[("aten.mm", LORA)]["calls"], counted.ops[("aten.mm", LORA)]["flops"]) == (6, 2 * 10 * 4 * (32 + 32) * 3)
    assert counted.ops[("aten.addmm", "matmul")]["calls"] == 3 and counted.ops[("aten.mm", "matmul")]["calls"] == 3


def _attention(device, head_multiple=1, bandwidth_gbs=1.0, exp_tera_per_s=None):
    """One attention call, forward and backward, at 1 TFLOP/s: 2 batches × 4 heads, 64 queries,
    32 keys, 40-wide heads. Returns (FLOPs, bytes, exponentials, ops, by_kind's attention row)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 40, device=device, requires_grad=True) for n in (64, 32, 32))
    counted = roofline.Roofline(1.0, bandwidth_gbs, exp_tera_per_s=exp_tera_per_s)
    swap = roofline.FusedAttention(counted, head_multiple) if device == "meta" else contextlib.nullcontext()
    with swap, counted:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    rows = [row for (_, kind), row in counted.ops.items() if kind == "attention"]
    return (*(sum(r[key] for r in rows) for key in ("flops", "bytes", "exps")), len(rows),
            roofline.by_kind(counted)["attention"])


def test_meta_attention_counts_what_the_cpu_kernels_do_and_move():
    # On CPU the step dispatches the fused flash kernels (forward and backward); on meta the math
    # path would run, so the roofline counts it as those kernels: same FLOPs, bytes and exponentials.
    cpu, meta = _attention("cpu"), _attention("meta")
    assert cpu[3] == meta[3] == 2
    assert meta[:3] == cpu[:3]


def test_attention_takes_an_exponential_per_pair_forward_and_again_backward():
    flops, _, exps, _, row = _attention("cpu")
    assert exps == 2 * (2 * 4 * 64 * 32)  # the backward recomputes the scores
    assert row["exp_bound_ms"] == 0.0 and row["serial_ms"] == row["bound_ms"]  # no rate: they bound nothing
    # Bytes made free, at 10¹⁰ exponentials a second: per pair the forward's 160 FLOPs take 160 ps and
    # the backward's 400 FLOPs 400 ps, each exponential 100 ps. The matmuls set the floor; run one
    # after the other, the exponentials add theirs.
    fast = _attention("cpu", bandwidth_gbs=1e9, exp_tera_per_s=0.01)[4]
    assert fast["exp_bound_ms"] == 0.0 and fast["bound_ms"] == pytest.approx(flops / 1e12 * 1e3)
    assert fast["serial_ms"] == pytest.approx(fast["bound_ms"] + exps / 1e10 * 1e3)
    # At 10⁸ a second (10 ns each) the exponentials set both kernels' floors.
    slow = _attention("cpu", bandwidth_gbs=1e9, exp_tera_per_s=1e-4)[4]
    assert slow["bound_ms"] == slow["exp_bound_ms"] == pytest.approx(exps / 1e8 * 1e3)
    assert slow["serial_ms"] == pytest.approx(slow["bound_ms"] + flops / 1e12 * 1e3)


def test_each_call_is_held_to_its_own_bound():
    # Two attention calls under one op name, at 1 TFLOP/s and 10¹⁰ exponentials a second, bytes
    # made free: per query-key pair 8-wide heads do 32 FLOPs (32 ps) against an exponential's
    # 100 ps, 256-wide ones 1,024 FLOPs. Summed, the calls' FLOPs would outweigh their exponentials.
    counted = roofline.Roofline(1.0, 1e9, exp_tera_per_s=0.01)
    with roofline.FusedAttention(counted), counted:
        for width in (8, 256):
            q = torch.empty(1, 2, 64, width, device="meta")
            F.scaled_dot_product_attention(q, q, q)
    row, pairs = roofline.by_kind(counted)["attention"], 2 * 64 * 64
    assert row["exp_bound_ms"] == pytest.approx(pairs / 1e10 * 1e3)
    assert row["bound_ms"] == pytest.approx(row["exp_bound_ms"] + pairs * 2 * 512 / 1e12 * 1e3)


def test_head_multiple_pads_attention_flops_and_not_its_bytes_or_exponentials():
    flops, nbytes, exps, _, _ = _attention("meta")
    padded_flops, padded_bytes, padded_exps, _, _ = _attention("meta", head_multiple=64)
    assert padded_flops == flops * 64 // 40 and padded_bytes == nbytes and padded_exps == exps


def test_a_tiny_step_on_meta_counts_what_the_cpu_step_dispatches():
    cpu = roofline.by_kind(cli.count(_bench(device="cpu"), 1.0, 1.0))
    meta = roofline.by_kind(cli.count(_bench(), 1.0, 1.0))
    for kind in ("convolution", "matmul", LORA, "attention"):
        assert cpu[kind]["flops"] > 0 and meta[kind]["flops"] == cpu[kind]["flops"], kind
        assert meta[kind]["bytes"] == cpu[kind]["bytes"], kind
    # Fused between GEMM-like ops, the memory-bound work moves less than op by op (not the same on
    # both: the CPU's optimizer is the fused AdamW, meta's the loop over the weights).
    for memory in (cpu[roofline.MEMORY], meta[roofline.MEMORY]):
        assert 0 < memory["fused_bytes"] < memory["bytes"]
        assert memory["fused_ms"] == pytest.approx(memory["fused_bytes"] / 1e9 * 1e3)
        # A UNet's windows: its ResNet blocks' group norms, its transformer blocks' layer norms, the rest.
        by_norm = memory["fused_by_norm"]
        assert set(by_norm) == {"group norm", "layer norm", "other"} and min(by_norm.values()) > 0
        assert sum(by_norm.values()) == memory["fused_bytes"]


@pytest.mark.parametrize("device, precision", [("meta", "fp32"), ("cpu", "bf16")])
def test_lora_products_grow_with_the_rank_and_nothing_else_does(device, precision):
    # A base matmul taken for LoRA's would not double with the rank; a LoRA product left among the
    # base matmuls would change their count. On CPU in bf16 autocast multiplies by bf16 copies of
    # the float32 LoRA weights: the copies are LoRA's too.
    r4 = roofline.by_kind(cli.count(_bench("--rank", "4", "--precision", precision, device=device), 1.0, 1.0))
    r8 = roofline.by_kind(cli.count(_bench("--rank", "8", "--precision", precision, device=device), 1.0, 1.0))
    assert r8[LORA]["flops"] == 2 * r4[LORA]["flops"] > 0
    for kind in ("convolution", "matmul", "attention"):
        assert r8[kind]["flops"] == r4[kind]["flops"] > 0, kind


def test_lora_sums_inside_gemms_move_less_for_the_same_flops():
    """The tiny SD1.5 step with sdtune.train.lora.AddmmLora (the default) against peft's LoRA
    forward: the same FLOPs in every kind, and fewer bytes in all, op by op and with the
    memory-bound work fused between GEMM-like ops."""
    ours = roofline.by_kind(cli.count(_bench(), 1.0, 1.0))
    peft_s = roofline.by_kind(cli.count(_bench("--lora-forward", "peft"), 1.0, 1.0))
    assert ours.keys() == peft_s.keys()
    for kind in ours:
        assert ours[kind]["flops"] == peft_s[kind]["flops"], kind
    total = lambda kinds, key: sum(row[key] for row in kinds.values())  # noqa: E731
    assert total(ours, "bytes") < 0.95 * total(peft_s, "bytes")
    fused = lambda kinds: total(kinds, "bytes") - kinds[roofline.MEMORY]["bytes"] + kinds[roofline.MEMORY]["fused_bytes"]  # noqa: E731
    assert fused(ours) < fused(peft_s)


def test_cuda_autocasts_policy_is_the_one_torch_lists():
    """CudaAutocast's two sets, by name, against the lists torch's own tests of CUDA autocast use
    (read from their source: importing torch.testing._internal freezes torch's global flags)."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec("torch.testing._internal.autocast_test_lists").origin).read_text()
    cuda = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "AutocastTestLists")
    lists = {a.targets[0].attr: [e.elts[0].value for e in a.value.elts if isinstance(e, ast.Tuple)]
             for a in ast.walk(cuda) if isinstance(a, ast.Assign) and isinstance(a.targets[0], ast.Attribute)
             and isinstance(a.value, ast.List)}
    names = lambda *kinds: {name for kind in kinds for name in lists[kind]}  # noqa: E731
    # In autocast_mode.h's lists, untested in torch's: SDPA, and the upsample_* ops F.interpolate reaches.
    low = names("torch_fp16", "nn_fp16", "methods_fp16") | {"scaled_dot_product_attention"}
    assert {f.__name__ for f in roofline.LOW_PRECISION} <= low
    assert {f.__name__ for f in roofline.FLOAT32} <= names("torch_fp32", "nn_fp32", "methods_fp32") | {"interpolate"}
    assert {"group_norm", "layer_norm", "softmax"} <= {f.__name__ for f in roofline.FLOAT32}


# The aten ops a denoiser's forward reaches that CUDA autocast runs in float32 or in the low dtype
# (AT_FORALL_FP32 and AT_FORALL_LOWER_PRECISION_FP in aten/src/ATen/autocast_mode.h), named as a
# dispatch mode sees them: group_norm as native_group_norm, softmax as _softmax, SDPA as its CPU kernel.
AUTOCAST_FLOAT32 = {"native_group_norm", "native_layer_norm", "_softmax", "_log_softmax", "exp", "pow", "rsqrt",
                    "sum", "mse_loss", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_bilinear2d",
                    "upsample_bicubic2d", "logsumexp", "cdist", "renorm", "prod"}
AUTOCAST_LOW = {"convolution", "addmm", "mm", "bmm", "baddbmm", "addbmm", "mv", "addmv",
                "_scaled_dot_product_flash_attention_for_cpu"}


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd35m"])
def test_cuda_autocast_gives_every_listed_aten_op_the_dtype_cuda_autocast_would(name):
    """Each aten op of a tiny denoiser's forward under CudaAutocast that CUDA autocast lists gets its
    floating inputs in that list's dtype. CudaAutocast casts per Python function, so this catches a
    listed op reached through a function it does not know (diffusers' F.interpolate once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench import archs

    wrong = []

    class Check(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func._overloadpacket.__name__
            expected = torch.float32 if op in AUTOCAST_FLOAT32 else torch.bfloat16 if op in AUTOCAST_LOW else None
            floats = [t.dtype for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if expected and any(d != expected for d in floats):
                wrong.append((op, floats))
            return func(*args, **(kwargs or {}))

    arch = archs.get(name)
    torch.manual_seed(0)
    model = archs.build(arch, True, "cpu", torch.bfloat16)
    latents, cond = archs.inputs(arch, 2, archs.TINY_RES, "cpu", torch.bfloat16, True)
    with torch.no_grad(), roofline.CudaAutocast(torch.bfloat16), Check():
        model(**{arch.sample_arg: latents, "timestep": torch.tensor([10, 500])}, **cond)
    assert not wrong, wrong[:3]


def test_cuda_autocast_runs_a_norm_in_float32_and_counts_the_casts_around_it():
    """GroupNorm, SiLU, conv in bf16: under CudaAutocast the norm and the SiLU run in float32, as
    on a GPU under autocast, between a cast of the input up and of the conv's input down."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
    block = block.to(torch.bfloat16)
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    dtypes = []
    for m in block:
        m.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))

    def counted(cuda_autocast):
        dtypes.clear()
        c = roofline.count(lambda: block(x).float().sum().backward(), peak_tflops=1.0, bandwidth_gbs=1.0,
                           cuda_autocast=cuda_autocast)
        return {op: row for (op, _), row in c.ops.items()}, list(dtypes), c.saved_bytes

    plain, plain_dtypes, plain_kept = counted(None)
    cast, cast_dtypes, cast_kept = counted(torch.bfloat16)
    assert plain_dtypes == [torch.bfloat16] * 3
    assert cast_dtypes == [torch.float32, torch.float32, torch.bfloat16]
    n = x.numel()
    assert cast["aten.silu"]["bytes"] == 2 * plain["aten.silu"]["bytes"] == 2 * 2 * 2 * n  # read and written in 4 bytes, not 2
    # Up before the norm (2 bytes read, 4 written) and down before the conv (4 read, 2 written), and
    # their gradients' casts back.
    assert cast["aten._to_copy"]["bytes"] - plain["aten._to_copy"]["bytes"] >= 2 * (6 * n + 6 * n)
    assert cast["aten.convolution"]["flops"] == plain["aten.convolution"]["flops"]
    # Kept for the backward: the norm's input, the SiLU's and the conv's, and the norm's mean and
    # 1/std (2 x 4 of each). In bf16 all of them; under autocast the first two in float32, and the
    # norm's weight too, whose float32 cast is no parameter.
    assert plain_kept == 3 * 2 * n + 2 * 8 * 2
    assert cast_kept == 2 * 4 * n + 2 * n + 2 * 8 * 4 + 16 * 4


def test_cli_counts_the_step_under_cuda_autocast_with_more_memory_bound_bytes():
    argv = [*TINY, "--precision", "bf16", "--arch", "sd15"]
    plain, cast = cli.main(argv), cli.main(["--cuda-autocast", *argv])
    assert cast["cuda_autocast"] and not plain["cuda_autocast"]
    for kind in ("convolution", "matmul", "attention"):
        assert cast["kinds"][kind]["flops"] == plain["kinds"][kind]["flops"], kind
    memory = lambda r, key: r["kinds"][roofline.MEMORY][key]  # noqa: E731
    assert memory(cast, "bytes") > 1.2 * memory(plain, "bytes")  # 1.27x here; 1.76x at SD1.5 bs16
    assert memory(cast, "fused_bytes") > memory(plain, "fused_bytes")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny CPU run's JSON with its kernel breakdown, and one without."""
    out = tmp_path_factory.mktemp("measured")
    train_step.main([*TINY, "--arch", "sd15", "--kernels", "--json", str(out / "kernels.json")])
    train_step.main([*TINY, "--arch", "sd15", "--json", str(out / "plain.json")])
    return out


def test_cli_sets_the_floor_beside_a_measured_breakdown(measured, tmp_path, capsys):
    out = tmp_path / "roofline.json"
    result = cli.main(["--card", "L4", "--measured", str(measured / "kernels.json"), "--json", str(out),
                            *TINY, "--arch", "sd15"])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    run = json.loads((measured / "kernels.json").read_text())
    assert result["measured"]["run"] == run["name"]
    assert sum(result["measured"]["kinds"].values()) == pytest.approx(run["kernels"]["kernel_ms"])
    # Its MFU is of the synced median step, as bench.table's is, with the pipelined step beside it.
    assert re.search(re.escape(f"Measured ({run['name']}): {run['step_ms']:.1f} ms a step, ") + r"\d+\.\d%; "
                     + re.escape(f"pipelined {run['step_ms_pipelined']:.1f} ms, "), printed), printed[-300:]
    floor = sum(row["bound_ms"] for row in result["kinds"].values())
    assert floor == pytest.approx(sum(op["bound_ms"] for op in result["ops"])) and floor > 0
    assert result["peak_tflops"] == 30.3 and result["bandwidth_gbs"] == 300  # the L4's fp32 and memory
    assert result["exp_tera_per_s"] == pytest.approx(1.89, rel=0.01)  # its exponentials
    attention = result["kinds"]["attention"]
    assert attention["exps"] == sum(op["exps"] for op in result["ops"]) > 0
    assert attention["serial_ms"] >= attention["bound_ms"]  # the tiny model's attention is bound by its bytes
    assert "| convolution |" in printed and "|   of which LoRA |" in printed
    assert f"At the floor the step takes {floor:.1f} ms" in printed
    assert f"a kernel that runs them after its matmuls instead of beside them takes at least {attention['serial_ms']:.2f} ms" in printed


@pytest.mark.parametrize("argv, message", [
    (["--card", "B200"], "--card: unknown card 'B200'"),
    (["--device", "cpu"], "--device: the roofline always counts on meta"),
    (["--attention=fa4"], "python -m bench.roofline: error: --attention fa4: the roofline holds every fused"),
    (["--name", "fa4", "--bs", "0"], "--bs"),  # a run named fa4 is not FlashAttention 4
    (["--bs", "1", "--loop"], "python -m bench.roofline: error: --loop runs the training loop's own step"),
    (["--head-multiple", "0"], "--head-multiple: expected a whole number of at least 1, got 0"),
    (["--bandwidth-gbs", "0"], "--bandwidth-gbs: expected a rate above 0, got 0"),
    (["--exp-tera", "-1"], "--exp-tera: expected a rate above 0, got -1"),
    (["--cuda-autocast"], "--cuda-autocast: autocast is for --precision bf16 or fp16, without --no-autocast"),
    (["--measured", "{dir}/missing.json"], "--measured: [Errno 2] No such file or directory"),
    (["--measured", "{dir}/kernels.json", "--run", "nope"], "no run named 'nope'"),
    (["--measured", "{dir}/plain.json"], "has no kernel breakdown (bench.train_step --kernels makes one)"),
])
def test_cli_refuses_bad_arguments_in_one_line(measured, capsys, argv, message):
    argv = [a.format(dir=measured) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, *TINY])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err.splitlines()[-1]


def test_a_compiled_forward_keeps_what_a_fused_attention_kernel_keeps_not_its_scores():
    """compiled_saved traces SDPA as one op keeping q, k, v, its output and a log-sum-exp; the math
    path would keep the softmax's 2 x 256 x 256 scores (512 KiB in float32)."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 24).to(torch.bfloat16).requires_grad_(False)

    class Attention(torch.nn.Module):
        def forward(self, x):
            q, k, v = proj(x).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 2, 256, 8, dtype=torch.bfloat16, device="meta", requires_grad=True)
    proj.to("meta")
    saved = roofline.compiled_saved(Attention(), x)
    # q, k and v (views of the one projection), the output (also what the forward returns) in bf16,
    # the log-sum-exp in float32.
    assert saved == {"bytes": 2 * 256 * 24 * 2 + 2 * 256 * 8 * 2 + 2 * 256 * 4, "tensors": 3,
                     "float32_bytes": 2 * 256 * 4}


def test_a_compiled_step_keeps_no_more_under_autocasts_casts_and_less_than_eager():
    """With inductor's decompositions the partitioner recomputes a norm's float32 output from its
    bf16 input and statistics: the compiled forward keeps the same bytes with autocast's casts as
    without, almost none of them float32, and less than the eager step keeps."""
    argv = ["--compiled", *TINY, "--precision", "bf16", "--arch", "sd15"]
    plain, cast = cli.main(argv), cli.main(["--cuda-autocast", *argv])
    assert plain["saved_bytes"] < cast["saved_bytes"]  # eager: the float32 norms' inputs and outputs
    compiled, compiled_cast = plain["compiled_saved"], cast["compiled_saved"]
    assert 0 < compiled["bytes"] < plain["saved_bytes"]
    assert compiled_cast["bytes"] == pytest.approx(compiled["bytes"], rel=0.01)
    # Float32: attention's log-sum-exp and the timestep embedding.
    assert max(compiled["float32_bytes"], compiled_cast["float32_bytes"]) < 0.05 * compiled["bytes"]
