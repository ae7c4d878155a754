"""The CUDA-only paths: bf16 training with fused AdamW, no host sync in the step, CUDA graphs,
deterministic training, QLoRA on an NF4 base, the bitsandbytes and float8 variants, and the
profile stage's trace and allocator snapshot.

They skip on a machine without CUDA (CI has none); `bash bench/gpu.sh` runs them on a GPU first.
"""

import copy
import json

import numpy as np
import pytest
import torch

from conftest import tiny_cache
from sdtune import params as params_lib, quantize
from sdtune.evaluate import generate, pipelines
from sdtune.families import sd
from sdtune.profiling import hardware, run as prof
from sdtune.train import lora, loop

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model


def params(**train):
    return params_lib.parse({
        "base": {"seed": 3, "device": "cuda"}, "model": {"id": "tiny", "resolution": 32},
        "train": {"steps": 4, "batch_size": 2, "wandb": "disabled", "mixed_precision": "bf16",
                  "lr": 1.0e-3, "lora": {"rank": 4, "alpha": 4.0}, **train},
        "profile": {"steps": 2, "warmup": 1}})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    ws = tmp_path_factory.mktemp("gpu")
    return tiny_cache(ws / "raw", ws / "cache", 4, 48, params())


def assert_trains(run):
    """Two steps: finite losses, and the LoRA weights moved."""
    model = run.accelerator.unwrap_model(run.denoiser)
    before = {k: v.clone() for k, v in lora.peft_state(model).items()}
    losses = torch.stack([loop.train_step(run, s) for s in range(2)])
    assert torch.isfinite(losses).all(), losses
    after = lora.peft_state(model)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(v.device.type == "cuda" for v in after.values())


def test_bf16_training_on_cuda_uses_fused_adamw(cache_dir):
    run = loop.setup(params(), cache_dir)
    assert run.accelerator.device.type == "cuda" and run.accelerator.mixed_precision == "bf16"
    assert run.optimizer.optimizer.defaults["fused"] is True
    assert_trains(run)


def test_a_cuda_training_step_never_makes_the_host_wait(cache_dir):
    """No synchronising CUDA call in a step: the batch, noise and timesteps reach the GPU through
    pinned memory, and nothing is read back, so the host queues step n+1 while step n runs."""
    run = loop.setup(params(ema_decay=0.9, snr_gamma=5.0), cache_dir)
    loop.train_step(run, 0)  # the first step builds the optimizer's state and the pinned-memory cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loop.train_step(run, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_cuda_graphs_train_like_the_eager_loop(cache_dir):
    """compile_mode: reduce-overhead replays CUDA graphs into reused buffers; a loss or gradient
    read after its buffer was overwritten would raise or drift from the eager run."""
    from accelerate.state import AcceleratorState

    losses = {}
    for mode in ("eager", "reduce-overhead"):
        keys = {} if mode == "eager" else {"compile": True, "compile_mode": mode}
        AcceleratorState._reset_state(reset_partial_state=True)  # one accelerate state per run
        run = loop.setup(params(**keys), cache_dir)
        losses[mode] = torch.stack([loop.train_step(run, s) for s in range(4)]).float().cpu()
        torch._dynamo.reset()
    assert torch.isfinite(losses["reduce-overhead"]).all()
    torch.testing.assert_close(losses["reduce-overhead"], losses["eager"], rtol=0.05, atol=0.01)


def test_cuda_graphs_survive_validation_and_checkpoints(cache_dir, tmp_path):
    """The whole loop under CUDA graphs: validation samples with the compiled denoiser in eval mode
    and hands it back, checkpoints read the optimizer's state between replays."""
    from sdtune.train import validate as validate_lib

    p = params(compile=True, compile_mode="reduce-overhead", validate_every=2, checkpoint_every=2,
               validation_steps=2)
    run = loop.setup(p, cache_dir)
    (tmp_path / "val").mkdir()
    stats = loop.train(run, tmp_path / "ckpt", cache_dir, validate=validate_lib.Validator(p, run.family, tmp_path / "val"))
    torch._dynamo.reset()
    assert np.isfinite(stats["final_loss"])
    assert sorted(f.name for f in (tmp_path / "val").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    assert list((tmp_path / "ckpt").iterdir())


def test_deterministic_cuda_training_repeats_bit_for_bit(cache_dir):
    """train.deterministic on CUDA: deterministic kernels, cuBLAS's fixed workspace and no cuDNN
    timing, so two runs (and a resumed one) give the same LoRA to the bit."""
    from accelerate.state import AcceleratorState

    states = []
    try:
        for _ in range(2):
            AcceleratorState._reset_state(reset_partial_state=True)
            run = loop.setup(params(deterministic=True), cache_dir)
            assert not torch.backends.cudnn.benchmark
            for s in range(3):
                loop.train_step(run, s)
            states.append({k: v.clone() for k, v in lora.peft_state(run.accelerator.unwrap_model(run.denoiser)).items()})
    finally:
        torch.use_deterministic_algorithms(False)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_qlora_trains_lora_on_an_nf4_base(cache_dir):
    import bitsandbytes as bnb

    run = loop.setup(params(qlora=True), cache_dir)
    model = run.accelerator.unwrap_model(run.denoiser)
    nf4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert nf4 and {m.weight.quant_type for m in nf4} == {"nf4"}
    assert not any(m.weight.requires_grad for m in nf4)  # frozen base; only LoRA trains
    assert_trains(run)


def images(pipe):
    return [np.asarray(img, dtype=np.int16) for _, _, img in
            generate.sample_all(pipe, ["a red circle", "a blue square"], [0, 1], steps=3, guidance=7.5, size=64)]


@pytest.mark.parametrize("method", ["nf4", "int8", "float8wo"])
def test_cuda_variants_are_smaller_reload_and_render_the_same_image_twice(method, lora_dir, tmp_path):
    if method == "float8wo":
        pytest.importorskip("torchao")
    out = tmp_path / method
    row = quantize.make_variant(sd, MODEL, lora_dir, method, "fused", out)
    assert row["memory_bytes"] < quantize.tensor_bytes(sd.tiny_unet())
    device = torch.device("cuda")
    first = images(pipelines.load(sd, MODEL, device, variant_dir=out, method=method))
    again = images(pipelines.load(sd, MODEL, device, variant_dir=out, method=method))
    # Same seed, same image: allow one level of rounding where a GPU kernel's reduction order varies.
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(first, again))
    assert all(a.std() > 0 for a in first)  # pictures, not a constant fill


def test_profile_cell_on_cuda_writes_a_gpu_trace_and_an_allocator_snapshot(cache_dir, tmp_path):
    trace = tmp_path / "trace-baseline.json"
    cell = prof.profile_cell(params(), {"name": "baseline"}, cache_dir, trace)
    assert cell["device"].startswith("cuda") and 0 < cell["mfu"] <= 1
    assert cell["peak_source"].startswith(("datasheet:", "measured"))
    assert cell["memory"]["peak_bytes"] > 0
    # What autograd kept for the backward was alive at the peak beside the weights and the LoRA's
    # state, with the temporaries the estimate of activations also holds.
    mem = cell["memory"]
    assert 0 < mem["kept_for_backward_bytes"] <= mem["activations_bytes"], mem
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # GPU kernels, not only host ops
    # Each traced step's range waits for its kernels: they fill no more than all of it.
    assert 0 < cell["kernels"]["busy"] <= 1, cell["kernels"]
    snapshot = tmp_path / "memory-baseline.pickle"
    assert snapshot.stat().st_size > 0
    # The floor, counted over the CUDA kernels the step dispatches (fused attention among them).
    floor = cell["floor"]
    assert "error" not in floor, floor
    assert floor["kinds"]["attention"]["flops"] > 0 and floor["kinds"]["matmul: LoRA"]["flops"] > 0
    # Whichever fused kernel torch picks, its exponentials are counted from its FLOPs: one per
    # query-key pair, forward and backward.
    assert floor["kinds"]["attention"]["exps"] > 0
    if hardware.card_name(torch.cuda.get_device_name()):  # a card in the table holds them to its rate
        assert floor["exp_tera_per_s"] == hardware.EXP_TERA_PER_S[hardware.card_name(torch.cuda.get_device_name())]
    assert {"matmul", "attention"} <= set(cell["kernels"]["vs_floor"])


def test_a_copy_kernel_is_traced_to_the_op_that_launched_it():
    """On CUDA a copy kernel counts for the op the profiler links it to: making a channels-last
    tensor contiguous is aten::copy_ inside aten::contiguous, with both tensors' strides."""
    from sdtune.profiling import kernels
    from test_kernels import COPIED, contiguous_copy_step

    per_kernel, _, copies = kernels.time_by_kernel(contiguous_copy_step("cuda", width=512), 3, "cuda")
    first = copies[0]
    assert first["op"] == "aten::copy_" and first["callers"][:2] == ["aten::clone", "aten::contiguous"]
    assert first["inputs"] == COPIED
    copy_kernels = sum(ms for name, ms in per_kernel.items() if kernels.kind(name) == "copy")
    assert 0 < first["ms"] <= copy_kernels * 1.0001


def test_flash_attention_4_computes_what_the_flash_kernel_does():
    # bench.train_step --attention fa4: SD1.5's 40-wide heads at 64×64 latents, forward and backward,
    # against torch's own flash kernel; then torch's own is put back for the tests after this one.
    pytest.importorskip("flash_attn.cute.interface", reason="flash-attn-4 (bench/wheels-fa4) not installed")
    from torch.nn.attention import SDPBackend, restore_flash_attention_impl, sdpa_kernel

    from bench import train_step

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def attend():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return out, grads

    ours, our_grads = attend()
    try:
        train_step.flash_attention_4()
        theirs, their_grads = attend()
    finally:
        restore_flash_attention_impl()
    torch.testing.assert_close(theirs, ours, atol=2e-2, rtol=2e-2)
    for a, b in zip(their_grads, our_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_addmm_lora_is_no_further_from_float64_than_peft_on_cuda():
    # test_lora's check with cuBLAS doing each sum inside a GEMM, at an SD1.5 projection's size:
    # 16 × 4,096 tokens, 320 wide, rank 16.
    from test_lora import check_bf16_against_float64

    torch.manual_seed(1)
    check_bf16_against_float64(torch.randn(16 * 4096, 320, device="cuda", dtype=torch.bfloat16),
                               size=(320, 320, 16), device="cuda")


@pytest.mark.parametrize("autocast", [True, False])
def test_the_whole_unet_with_addmm_lora_compiles_into_one_graph_on_cuda(autocast):
    # The torch on the GPU box is older than CI's: Dynamo there traces less (docs/benchmarks.md,
    # twelfth session).
    from test_lora import check_whole_unet_compiles_into_one_graph

    check_whole_unet_compiles_into_one_graph("cuda", autocast)


def test_without_autocast_the_norms_run_in_bf16_and_it_trains(cache_dir):
    """train.autocast: false on CUDA: the norms take and give bf16 (under autocast they give
    float32, each between two casts), and the step trains."""
    from accelerate.state import AcceleratorState

    def norm_outputs(run):
        seen = set()
        for m in run.accelerator.unwrap_model(run.denoiser).modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.register_forward_hook(lambda m, args, out: seen.add((args[0].dtype, out.dtype)))
        assert_trains(run)
        return seen

    AcceleratorState._reset_state(reset_partial_state=True)
    # Under autocast a norm's input arrives as it is (bf16) and the cast happens inside it.
    assert {out for _, out in norm_outputs(loop.setup(params(autocast=True), cache_dir))} == {torch.float32}
    AcceleratorState._reset_state(reset_partial_state=True)
    assert norm_outputs(loop.setup(params(autocast=False), cache_dir)) == {(torch.bfloat16, torch.bfloat16)}


def test_the_rooflines_cuda_autocast_is_cudas_own():
    """sdtune.profiling.roofline.CudaAutocast (how bench.roofline --cuda-autocast counts the eager
    step on meta) against torch.autocast on CUDA: the tiny SD1.5 UNet's forward and backward
    dispatch the same ops with outputs in the same dtypes, the casts aside."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from bench import archs
    from sdtune.profiling import roofline

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket is not torch.ops.aten._to_copy and not func.is_view:
                dtypes = tuple(t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
                self.ops.append((str(func._overloadpacket), dtypes))
            return out

    arch = archs.get("sd15")
    torch.manual_seed(0)
    unet = archs.build(arch, True, torch.device("cuda"), torch.bfloat16).requires_grad_(False)
    latents, cond = archs.inputs(arch, 2, archs.TINY_RES, "cuda", torch.bfloat16, True)
    t = torch.tensor([10, 500], device="cuda")

    def ops(casts):
        x = latents.clone().requires_grad_(True)
        with casts, Record() as record:
            unet(x, t, **cond).sample.float().square().mean().backward()
        return record.ops

    real, emulated = ops(torch.autocast("cuda", dtype=torch.bfloat16)), ops(roofline.CudaAutocast(torch.bfloat16))
    first = next((i for i, (a, b) in enumerate(zip(real, emulated)) if a != b), None)
    assert first is None and len(real) == len(emulated), (first, real[first:first + 3], emulated[first:first + 3])
    assert ("aten.native_group_norm", (torch.float32,) * 3) in real


def test_upsampling_by_broadcast_compiles_on_cuda_to_interpolates_values_and_gradients():
    """train.upsample: broadcast as inductor really compiles it on CUDA (the CPU tests trace the
    graphs only): an upsampler and its convolution, channels-last bf16, against diffusers' own
    eagerly; the convolutions may run other cuDNN algorithms, so to bf16's rounding."""
    from diffusers.models.upsampling import Upsample2D
    from sdtune.train import upsample

    torch.manual_seed(0)
    native = Upsample2D(64, use_conv=True).cuda().to(torch.bfloat16, memory_format=torch.channels_last)
    ours = copy.deepcopy(native)
    assert upsample.broadcast_upsamplers(ours) == 1
    x = torch.randn(4, 64, 16, 16, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 64, 32, 32, device="cuda", dtype=torch.bfloat16)
    results = []
    for model in (torch.compile(ours, fullgraph=True), native):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(grad)
        results.append((out, xi.grad))
    (out, dx), (expect, expect_dx) = results
    assert out.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expect, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(dx, expect_dx, rtol=1.6e-2, atol=1e-2)
