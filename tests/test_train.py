"""Training: identical reruns, exact resume after SIGKILL, a NaN loss stops cleanly, exact cache reuse."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (FAKE_WANDB_KEY, OFFLINE, ROOT, assert_no_secret, captions_for, hub_snapshot, kept_for_backward, tiny_cache,
                      tiny_loop_run, wandb_stage)
from sdtune import io, params as params_lib
from sdtune.errors import UserError
from sdtune.data import cache
from sdtune.families import common, sd
from sdtune.train import checkpoint, loop, lora as lora_lib, validate as validate_lib

PARAMS = """\
base: {seed: 3}
model: {id: tiny, resolution: 32}
train: {steps: 8, batch_size: 2, lr: 1.0e-3, checkpoint_every: 2, keep_checkpoints: 2, log_every: 1,
        wandb: disabled, deterministic: true, ema_decay: 0.9, lora: {rank: 4, alpha: 4.0},
        validate_every: 2, validation_steps: 2, validation_seeds: [0]}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with params.yaml and a built cache, ready for `python -m stages.train`."""
    ws = tmp_path_factory.mktemp("train")
    (ws / "params.yaml").write_text(PARAMS)
    tiny_cache(ws / "data/raw", ws / "cache", 6, 48, params_lib.load(ws / "params.yaml"))
    return ws


def clone(workspace: Path, dest: Path) -> Path:
    shutil.copytree(workspace, dest)
    return dest


def train_cmd(ws: Path, **kwargs):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def train(ws: Path) -> subprocess.CompletedProcess:
    proc = train_cmd(ws)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def lora_bytes(ws: Path) -> bytes:
    return (ws / "models/lora" / common.LORA_FILE).read_bytes()


def validation_images(ws: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((ws / "reports/validation").iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory):
    ws = clone(workspace, tmp_path_factory.mktemp("straight") / "ws")
    done = train(ws)
    assert done.returncode == 0, done.stderr[-3000:]
    return ws


def test_two_identical_runs_give_a_bit_identical_lora(uninterrupted, workspace, tmp_path):
    again = clone(workspace, tmp_path / "again")
    assert train(again).returncode == 0
    assert lora_bytes(again) == lora_bytes(uninterrupted)


def test_sigkill_then_rerun_resumes_to_a_bit_identical_lora(uninterrupted, workspace, tmp_path):
    ws = clone(workspace, tmp_path / "killed")
    # The middle checkpoint: steps and validations on both sides of the resume. (Each kill step costs
    # a run of the stage; the fast resume tests cover the state each checkpoint holds.)
    kill_after = 4
    proc = train_cmd(ws)
    deadline = time.time() + 600
    while time.time() < deadline:
        last = checkpoint.all_checkpoints(ws / "checkpoints")
        if last and int(last[-1].name.split("-")[1]) >= kill_after:
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ws / "models/lora").exists(), "a killed run must not leave a finished-looking LoRA"
    # As if the kill came between the newest checkpoint and its validation images, and a later
    # step's images were written: the rerun draws the first again and removes the second.
    newest = checkpoint.all_checkpoints(ws / "checkpoints")[-1].name
    (ws / "reports/validation" / f"{newest}.png").unlink(missing_ok=True)
    (ws / "reports/validation/step-0000007.png").write_bytes(b"an interrupted run's")
    resumed = train(ws)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert io.read_json(ws / "reports/train.json")["resumed_from"], f"did not resume (killed after {kill_after})"
    assert lora_bytes(ws) == lora_bytes(uninterrupted), f"killed after step {kill_after}"
    # Every step's images, as the uninterrupted run drew them (DVC keeps the folder: persist).
    assert validation_images(ws) == validation_images(uninterrupted), f"killed after step {kill_after}"
    assert list(validation_images(ws)) == [f"step-{s:07d}.png" for s in (2, 4, 6, 8)]


def test_a_finished_run_keeps_no_final_checkpoint_so_a_rerun_trains(uninterrupted, tmp_path):
    """The last step's checkpoint serves a failure after the loop; after a good run it goes, so a
    rerun DVC starts for a change the fingerprint leaves out (log_every here) trains its last steps
    again instead of resuming at the end with nothing to do."""
    assert [c.name for c in checkpoint.all_checkpoints(uninterrupted / "checkpoints")] == ["step-0000006"]
    ws = clone(uninterrupted, tmp_path / "rerun")
    (ws / "params.yaml").write_text(PARAMS.replace("log_every: 1", "log_every: 2"))
    done = train(ws)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = io.read_json(ws / "reports/train.json")
    assert stats["resumed_from"].endswith("step-0000006") and stats["steps_per_second"] > 0
    # the same tensors (the metadata's params hash differs: log_every is a param)
    again, first = (load_file(str(w / "models/lora" / common.LORA_FILE)) for w in (ws, uninterrupted))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize("change", [("lr: 1.0e-3", "lr: 2.0e-3"), ("validate_every: 2", "validate_every: 4"),
                                    ("seed: 3", "seed: 4")])
def test_checkpoints_of_other_params_are_not_resumed(uninterrupted, tmp_path, change):
    """Nor across a validation param: a resumed run keeps the images before it, which would be the
    other params' (here step 2's, with validate_every: 4)."""
    ws = clone(uninterrupted, tmp_path / "changed")
    shutil.rmtree(ws / "models")
    (ws / "params.yaml").write_text(PARAMS.replace(*change))
    done = train(ws)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "made with other params, data or code" in done.stdout
    assert io.read_json(ws / "reports/train.json")["resumed_from"] is None
    steps = (4, 8) if "validate_every" in change[1] else (2, 4, 6, 8)
    assert list(validation_images(ws)) == [f"step-{s:07d}.png" for s in steps]  # none of the other run's


@pytest.mark.parametrize("other", [{"base": {"seed": 4}}, {"train": {"steps": 9}},
                                   {"train": {"lr_scheduler": "linear"}}, {"train": {"warmup_steps": 2}},
                                   {"processes": 2}], ids=["seed", "steps", "lr_scheduler", "warmup_steps", "processes"])
def test_a_checkpoint_is_resumed_only_with_the_same_seed_schedule_and_process_count(workspace, other):
    """Each changes the steps a resumed run would take (the noise, the rates, the data each process
    trains on): a checkpoint of the run before has another fingerprint, so it is not resumed."""
    def mark(base=None, train=None, processes=1):
        p = params_lib.parse({"base": {"seed": 3, **(base or {})}, "model": {"id": "tiny", "resolution": 32},
                              "train": {"steps": 8, "lr_scheduler": "cosine", **(train or {})}})
        run = SimpleNamespace(params=p, accelerator=SimpleNamespace(num_processes=processes, mixed_precision="no"))
        return loop.fingerprint(run, workspace / "cache", "tiny")

    assert mark() == mark()
    assert mark(**other) != mark()


def test_a_key_the_family_refuses_stops_training_before_any_checkpoint_is_removed(uninterrupted, tmp_path):
    """SD 1.x would ignore SD3's loss weighting. The refusal came from the first training step,
    after the checkpoints of the params before had been removed as stale: a mistyped family or key
    cost the previous run's checkpoints."""
    ws = clone(uninterrupted, tmp_path / "refused")
    before = [c.name for c in checkpoint.all_checkpoints(ws / "checkpoints")]
    assert before
    (ws / "params.yaml").write_text(PARAMS.replace("log_every: 1,", "log_every: 1, loss_weighting: cosmap,"))
    done = train(ws)
    assert done.returncode == 2
    assert done.stderr == ("error: train.loss_weighting: is for flow-matching models (model.family: sd3); "
                           "epsilon/v models would ignore it, so leave it at 'none'\n")
    assert [c.name for c in checkpoint.all_checkpoints(ws / "checkpoints")] == before


@pytest.mark.parametrize("change, built, now", [("resolution: 32", "model.resolution: 32", "64"),
                                                 ("id: tiny,", "model.family: sd1", "sd3")])
def test_a_cache_built_with_other_model_params_is_refused_before_any_checkpoint_is_removed(
        uninterrupted, tmp_path, change, built, now):
    """The train stage run by hand after a param change (dvc repro re-runs the cache first):
    resolution 64 trained on the 32-px latents without a word; sd3 on SD1 items was a KeyError
    traceback, after the checkpoints had been removed as another run's."""
    ws = clone(uninterrupted, tmp_path / "other")
    before = [c.name for c in checkpoint.all_checkpoints(ws / "checkpoints")]
    new = "resolution: 64" if "resolution" in change else "id: tiny, family: sd3,"
    (ws / "params.yaml").write_text(PARAMS.replace(change, new))
    done = train(ws)
    assert done.returncode == 2
    assert done.stderr == (f"error: cache/index.json: built with {built}, but params.yaml now says {now}; build it "
                           f"again with `dvc repro cache` (or `python -m stages.cache`)\n")
    assert [c.name for c in checkpoint.all_checkpoints(ws / "checkpoints")] == before


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(workspace, tmp_path):
    ws = clone(workspace, tmp_path / "nan")
    shutil.rmtree(ws / "checkpoints", ignore_errors=True)
    p = params_lib.load(ws / "params.yaml")
    # Poison an item that is first trained on after the first checkpoint (step 2).
    items = io.read_json(ws / "cache/index.json")["items"]
    fake = SimpleNamespace(params=p, items=cache.load(ws / "cache"), batches={},
                           accelerator=SimpleNamespace(num_processes=1, process_index=0))
    seen = [set(loop.sample_indices(fake, s, 0)) for s in range(p.train.steps)]
    step, first = next((s, i) for s in range(2, p.train.steps) for i in seen[s]
                       if not any(i in earlier for earlier in seen[:s]))
    bad = items[first]["key"]
    path = ws / "cache/items" / f"{bad}.safetensors"
    tensors = load_file(str(path))
    tensors["latents"] = torch.full_like(tensors["latents"], float("nan"))
    save_file(tensors, str(path))
    done = train(ws)
    assert done.returncode == 2
    # Steps count from 1 in messages and checkpoint names; `step` counted from 0.
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: train: the loss became nan at step {step + 1};")
    assert "Traceback" not in done.stderr
    kept = [int(c.name.split("-")[1]) for c in checkpoint.all_checkpoints(ws / "checkpoints")]
    assert kept == [k for k in range(2, step + 1, 2)][-2:]
    assert not (ws / "models/lora").exists()


def test_cache_reencodes_exactly_what_changed(workspace, tmp_path):
    ws = clone(workspace, tmp_path / "cache")
    p = params_lib.load(ws / "params.yaml")
    rows = captions_for(ws / "data/raw")
    before = sorted(os.listdir(ws / "cache/items"))
    same = cache.build(rows, ws / "data/raw", ws / "cache", sd, p.model, p.cache)
    assert (same["encoded"], same["reused"]) == (0, len(rows))
    rows[1]["caption"] = "a different caption"
    one = cache.build(rows, ws / "data/raw", ws / "cache", sd, p.model, p.cache)
    assert (one["encoded"], one["removed"]) == (1, 1)
    after = sorted(os.listdir(ws / "cache/items"))
    assert len(set(before) - set(after)) == 1
    # The item encoded alone is, byte for byte, the one a fresh build makes beside the others.
    cache.build(rows, ws / "data/raw", tmp_path / "fresh", sd, p.model, p.cache)
    for name in after:
        assert (tmp_path / "fresh/items" / name).read_bytes() == (ws / "cache/items" / name).read_bytes(), name
    # The family's module one comment longer: other encoding code, so every item is encoded again
    # (DVC re-runs the stage on such a change; the keys make the re-run do the work).
    edited = tmp_path / "sd_edited.py"
    edited.write_text(Path(sd.__file__).read_text() + "\n# edited\n")
    spec = importlib.util.spec_from_file_location("sd_edited", edited)
    sd_edited = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_edited)
    recoded = cache.build(rows, ws / "data/raw", ws / "cache", sd_edited, p.model, p.cache)
    assert (recoded["encoded"], recoded["removed"]) == (len(rows), len(rows))
    assert cache.build(rows, ws / "data/raw", ws / "cache", sd_edited, p.model, p.cache)["reused"] == len(rows)
    bigger = params_lib.parse({"model": {"id": "tiny", "resolution": 40}}).model
    every = cache.build(rows, ws / "data/raw", ws / "cache", sd, bigger, p.cache)
    assert every["encoded"] == len(rows)


def test_buckets_group_by_shape_and_a_small_bucket_makes_a_small_batch(tmp_path):
    from PIL import Image

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(5):  # five landscape images and one portrait: the portrait bucket has 1 < batch size
        Image.new("RGB", (96, 48), (40 * i, 20, 20)).save(raw / f"wide_{i}.png")
    Image.new("RGB", (48, 96), (20, 200, 20)).save(raw / "tall.png")
    p = params_lib.parse({"model": {"id": "tiny", "resolution": 32}, "train": {"batch_size": 2},
                          "cache": {"buckets": True, "bucket_step": 16}})
    rows = captions_for(raw)
    cache.build(rows, raw, tmp_path / "cache", sd, p.model, p.cache)
    items = cache.load(tmp_path / "cache")
    shapes = {tuple(it["latents"].shape) for it in items}
    assert len(shapes) == 2  # a wide bucket and a tall one
    fake = SimpleNamespace(params=p, items=items, batches={},
                           accelerator=SimpleNamespace(num_processes=1, process_index=0))
    epoch = loop.epoch_batches(fake, 0)
    assert sorted(len(b) for b in epoch) == [1, 1, 2, 2]
    for batch in epoch:
        assert len({tuple(items[i]["latents"].shape) for i in batch}) == 1
    assert sorted(i for b in epoch for i in b) == list(range(6))


def in_process_params(workspace, **train):
    raw = {"base": {"seed": 3, "device": "cpu"}, "model": {"id": "tiny", "resolution": 32},
           "train": {"steps": 2, "batch_size": 2, "wandb": "disabled", "lora": {"rank": 4, "alpha": 4.0}, **train}}
    return params_lib.parse(raw)


def test_qlora_without_cuda_is_one_clear_line(workspace):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError) as err:
        loop.setup(in_process_params(workspace, qlora=True), workspace / "cache")
    assert str(err.value).startswith("train.qlora: 4-bit NF4 loading needs a CUDA GPU")


def test_fp16_on_the_cpu_is_one_clear_line(workspace):
    with pytest.raises(UserError) as err:  # it was a dtype RuntimeError deep in the first step
        loop.train_step(loop.setup(in_process_params(workspace, mixed_precision="fp16"), workspace / "cache"), 0)
    assert str(err.value) == "train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU"


@pytest.mark.parametrize("optimizer, lr", [("adamw8bit", 1.0e-3), ("prodigy", 1.0)])
def test_other_optimizers_train_on_cpu(workspace, optimizer, lr):
    # rank 64: bitsandbytes keeps 8-bit state only for tensors of at least 4096 elements (its
    # default min_8bit_size); the tiny model's 64-wide layers give 64x64 LoRA matrices
    run = loop.setup(in_process_params(workspace, optimizer=optimizer, lr=lr, lora={"rank": 64, "alpha": 64.0}),
                     workspace / "cache")
    before = {k: v.clone() for k, v in lora_state(run).items()}
    losses = [loop.train_step(run, s).item() for s in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = lora_state(run)
    assert any((after[k] != before[k]).any() for k in before)
    inner = run.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        assert type(inner) is bnb.optim.AdamW8bit
        states = [inner.state[p] for g in inner.param_groups for p in g["params"] if p.numel() >= 4096]
        assert states, "no LoRA tensor large enough for 8-bit state"
        assert all(st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8 for st in states)
    else:
        from prodigyopt import Prodigy

        assert type(inner) is Prodigy
        assert all("d" in g and g["d"] > 0 for g in inner.param_groups)
        assert all({"s", "p0"} <= inner.state[p].keys() for g in inner.param_groups for p in g["params"])


def test_max_grad_norm_null_trains_unclipped_and_still_measures_the_norm(workspace):
    """null turns clipping off (.inf used to, and is now refused like every non-finite param).
    The norm the optimizer sees is read from its gradients as its step begins."""
    from accelerate.state import AcceleratorState

    def one_step(bound):
        AcceleratorState._reset_state(reset_partial_state=True)
        run = loop.setup(in_process_params(workspace, max_grad_norm=bound), workspace / "cache")
        seen = []
        run.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]])).item()))
        loop.train_step(run, 0)
        return float(run.grad_norm), seen[0]

    norm, stepped = one_step(None)
    assert math.isfinite(norm) and norm > 0
    assert stepped == pytest.approx(norm, rel=1e-5)  # not clipped
    norm, stepped = one_step(1.0e-3)
    assert norm > 1.0e-2 and stepped == pytest.approx(1.0e-3, rel=1e-3)  # clipped to the bound


def lora_state(run):
    from sdtune.train import lora

    return lora.peft_state(run.accelerator.unwrap_model(run.denoiser))


def test_wandb_offline_logs_metrics_and_validation_images_and_no_secret(workspace, tmp_path):
    """Nor a signed URL's signature in data.source: W&B's config holds the params, redacted."""
    ws = clone(workspace, tmp_path / "wandb")
    shutil.rmtree(ws / "checkpoints", ignore_errors=True)
    signed = "https://someone:PASSWORDSECRET@127.0.0.1/sargent.zip?X-Goog-Signature=SIGNATURESECRET&X-Goog-Expires=60"
    (ws / "params.yaml").write_text(PARAMS.replace("wandb: disabled", "wandb: offline").replace("steps: 8", "steps: 2")
                                    + f"data: {{source: '{signed}'}}\n")
    done = wandb_stage("train", ws)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((ws / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("*.png")), "the validation image was not logged"
    assert_no_secret(ws / "wandb")
    logged = b"".join(p.read_bytes() for p in (ws / "wandb").rglob("*") if p.is_file())
    assert b"sargent.zip?X-Goog-Signature=***" in logged  # the config is there, its secrets are not
    assert b"SIGNATURESECRET" not in logged and b"PASSWORDSECRET" not in logged


def test_attention_forces_the_named_kernel_and_sdpa_leaves_the_choice_to_pytorch():
    flags = {"math": torch.backends.cuda.math_sdp_enabled, "flash": torch.backends.cuda.flash_sdp_enabled,
             "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
             "cudnn": torch.backends.cuda.cudnn_sdp_enabled}
    default = {name: enabled() for name, enabled in flags.items()}
    assert set(loop.BACKENDS) == set(flags)
    for choice in loop.BACKENDS:
        with loop.attention(choice):
            assert {name for name, enabled in flags.items() if enabled()} == {choice}
    with loop.attention("sdpa"):
        assert {name: enabled() for name, enabled in flags.items()} == default
    assert {name: enabled() for name, enabled in flags.items()} == default


def test_weight_dtype_follows_mixed_precision():
    assert loop.weight_dtype("no") == torch.float32
    assert loop.weight_dtype("fp16") == torch.float16
    assert loop.weight_dtype("bf16") == torch.bfloat16


def test_a_training_step_reads_nothing_back_to_the_host(workspace):
    """No .item() or data-dependent shape in the step (noise, loss, clipping, fused AdamW, EMA):
    the loop reads the losses back once per log interval, so a GPU never waits on the host."""
    from conftest import HostReads

    run = loop.setup(in_process_params(workspace, ema_decay=0.9, snr_gamma=5.0), workspace / "cache")
    loop.train_step(run, 0)  # the first step builds the optimizer's state
    with HostReads() as host:
        loss = loop.train_step(run, 1)
    assert host.reads == []
    assert torch.isfinite(loss)


def test_loss_curve_draws_the_running_mean_of_the_noisy_per_step_loss(tmp_path):
    from PIL import Image

    from sdtune.train import outputs

    assert outputs.running_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert outputs.running_mean([5.0, 1.0], 1) == [5.0, 1.0]
    # a twentieth of the run, but never a "mean" of one step (the 30-step demo's was)
    assert [loop.smoothing_window(n) for n in (3, 30, 1000)] == [3, 5, 50]
    history = [{"step": s, "loss": 1.0 + (s % 2)} for s in range(1, 41)]
    outputs.loss_plot(history, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as img:
        assert img.format == "PNG" and img.size == (600, 350)
    # One logged step (train.steps: 1): a line through one point drew nothing but the legend.
    outputs.loss_plot([{"step": 1, "loss": 0.5}], tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as img:
        orange = [xy for xy in ((x, y) for x in range(img.width) for y in range(img.height))
                  if img.getpixel(xy)[:3] == (255, 127, 14)]  # matplotlib's C1, the running mean
    assert any(x < img.width * 0.6 for x, _ in orange) and len(orange) > 40  # a marker, not only the legend's line


def test_deterministic_keeps_cudnn_heuristics_and_each_run_sets_both_flags(workspace):
    """cuDNN picks convolution algorithms by timing unless the run must be deterministic; both
    flags are set either way, since the profile stage prepares several runs in one process."""
    try:
        for deterministic in (True, False):
            loop.prepare(in_process_params(workspace, deterministic=deterministic), cache.load(workspace / "cache"))
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            assert torch.backends.cudnn.benchmark is (not deterministic)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def train_in_process(workspace, ckpt_dir, validate=None, lrs: list | None = None, log=None, **train):
    """loop.train on the module's cache in this process, from a fresh accelerate state; returns (run, stats).
    `lrs`: a list to append the learning rate the optimizer steps with to, each step."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(in_process_params(workspace, **train), workspace / "cache")
    if lrs is not None:
        run.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return run, loop.train(run, ckpt_dir, workspace / "cache", validate=validate, log=log)


def test_w_and_b_gets_every_steps_loss_in_order_before_the_validation_images(workspace, tmp_path):
    """W&B got the last row of each flush alone (one step in log_every), and none of the rows a
    validation flushed; a row logged after the validation image's step would be dropped by W&B."""
    logged, at_validation = [], {}
    run, _ = train_in_process(workspace, tmp_path / "checkpoints", log=lambda row: logged.append(row["step"]),
                              validate=lambda run: at_validation.update({run.step: list(logged)}),
                              steps=10, log_every=3, checkpoint_every=4, validate_every=5)
    assert logged == list(range(1, 11)) == [row["step"] for row in run.history]
    assert at_validation == {5: [1, 2, 3, 4, 5], 10: list(range(1, 11))}


class Interrupted(Exception):
    """Stands in for a kill: raised by a validation, right after its step's checkpoint."""


def interrupted_then_resumed(workspace, ckpt_dir, at: int, used: list, **train):
    """A run stopped right after step `at`'s checkpoint, then run again: (the resumed Run, its stats);
    `used` gets the resumed run's learning rates."""
    def stop(run):
        raise Interrupted

    with pytest.raises(Interrupted):
        train_in_process(workspace, ckpt_dir, validate=stop, validate_every=at, checkpoint_every=at, **train)
    run, stats = train_in_process(workspace, ckpt_dir, lrs=used, validate_every=at, checkpoint_every=at, **train)
    assert stats["resumed_from"] == str(ckpt_dir / f"step-{at:07d}")
    return run, stats


COSINE = {"steps": 6, "lr": 1.0e-3, "lr_scheduler": "cosine", "warmup_steps": 2}


def cosine_with_warmup(step: int) -> float:
    """COSINE's rate at (0-based) `step`: linear warmup from 0, then a half cosine down to 0."""
    lr, steps, warmup = COSINE["lr"], COSINE["steps"], COSINE["warmup_steps"]
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def test_the_optimizer_steps_with_the_warmup_then_cosine_rates(workspace, tmp_path):
    used = []
    run, _ = train_in_process(workspace, tmp_path / "checkpoints", lrs=used, **COSINE)
    want = [cosine_with_warmup(s) for s in range(COSINE["steps"])]
    assert used == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert [h["lr"] for h in run.history] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_a_resumed_run_continues_the_lr_schedule_where_its_checkpoint_was(workspace, tmp_path):
    """Not warmup and cosine from the start again: the schedule's state comes back with the checkpoint."""
    used = []
    run, _ = interrupted_then_resumed(workspace, tmp_path / "checkpoints", 3, used, **COSINE)
    want = [cosine_with_warmup(s) for s in range(COSINE["steps"])]
    assert used == pytest.approx(want[3:], rel=1e-6, abs=1e-12)
    assert [h["lr"] for h in run.history] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_gradient_accumulation_steps_with_the_mean_gradient_of_its_micro_batches(workspace):
    """grad_accum: 2 with batch 1 steps with the gradient of a batch of 2: the mean of the two
    micro-batches' gradients, each on its own item (the epoch's batches in turn) and its own noise."""
    from accelerate.state import AcceleratorState

    train = {"grad_accum": 2, "batch_size": 1, "max_grad_norm": None}
    run = loop.setup(in_process_params(workspace, **train), workspace / "cache")
    stepped = []
    run.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: stepped.append(
        [p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    loss = loop.train_step(run, 0)
    # The micro-batches of each step take different items: three steps are an epoch of the six.
    seen = [loop.sample_indices(run, step, micro) for step in range(3) for micro in range(2)]
    assert sorted(i for batch in seen for i in batch) == list(range(6))

    AcceleratorState._reset_state(reset_partial_state=True)
    ref = loop.setup(in_process_params(workspace, **train), workspace / "cache")  # the same initial LoRA
    seed, losses = ref.params.base.seed, []
    for micro, idx in enumerate(loop.epoch_batches(ref, 0)[:2]):
        batch = {k: torch.stack([ref.items[i][k] for i in idx]) for k in ref.items[0]}
        generator = torch.Generator().manual_seed(seed * 1_000_003 + micro)  # the global batch's draws
        losses.append(ref.family.training_loss(ref.denoiser, ref.noise_scheduler, batch, generator,
                                               ref.params.train).mean())
    (sum(losses) / 2).backward()
    want = [p.grad for p in lora_lib.trainable(ref.denoiser)]
    torch.testing.assert_close(loss, sum(losses).detach() / 2, rtol=1e-5, atol=1e-7)
    assert len(stepped) == 1 and len(stepped[0]) == len(want)
    for got, expected in zip(stepped[0], want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


def test_a_resumed_run_with_lora_dropout_trains_the_uninterrupted_runs_lora_to_the_bit(workspace, tmp_path):
    """LoRA dropout draws its masks from torch's RNG: the checkpoint's RNG state must come back, or the
    resumed steps drop other units (those of the run's first steps, after setup's seeding)."""
    train = {"steps": 4, "deterministic": True, "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.3}}
    straight, _ = train_in_process(workspace, tmp_path / "straight", validate_every=2, checkpoint_every=2, **train)
    resumed, _ = interrupted_then_resumed(workspace, tmp_path / "resumed", 2, [], **train)
    want, got = lora_state(straight), lora_state(resumed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("part", ["lora.safetensors", "state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_and_temporaries_go(workspace, tmp_path, capsys,
                                                                                     part):
    """A state.json that cannot be read was reported as another run's checkpoint."""
    ckpt = tmp_path / "checkpoints"
    train_in_process(workspace, ckpt, steps=3, checkpoint_every=1, keep_checkpoints=2)
    first, second = checkpoint.all_checkpoints(ckpt)
    damaged = second / part
    damaged.write_bytes(damaged.read_bytes()[:50])  # a disk that filled up, a copy cut short
    left = ckpt / ".step-0000003.k2x9.tmp"  # what a kill mid-write leaves
    left.mkdir()
    (left / "lora.safetensors").write_bytes(b"half")
    capsys.readouterr()
    _, stats = train_in_process(workspace, ckpt, steps=3, checkpoint_every=1, keep_checkpoints=2)
    assert stats["resumed_from"] == str(first)
    out = capsys.readouterr().out
    if part == "state.json":  # no fingerprint to tell whose it is: removed, and said why
        assert f"train: removed {second.name} in {ckpt}: its state.json could not be read" in out
        assert "other params" not in out
    else:
        assert f"train: warning: {second} is damaged (" in out and "trying the checkpoint before it" in out
    assert not left.exists()


def test_a_resume_on_another_device_says_it_will_not_be_bit_identical(workspace, tmp_path, capsys):
    """Another thread count splits the CPU's reductions otherwise (another card, its kernels): the
    checkpoint is resumed, as its run is as good, but the user is told the LoRA will differ."""
    ckpt, threads = tmp_path / "checkpoints", torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_in_process(workspace, ckpt, steps=3, checkpoint_every=1)
        for now in (1, 2):
            torch.set_num_threads(now)
            checkpoint.discard(ckpt, 3)  # as the stage does: the rerun resumes at step 2
            capsys.readouterr()
            _, stats = train_in_process(workspace, ckpt, steps=3, checkpoint_every=1)
            assert stats["resumed_from"] == str(ckpt / "step-0000002")
            out = capsys.readouterr().out
            if now == 1:
                assert "bit-identical" not in out  # the same device: silent
    finally:
        torch.set_num_threads(threads)
    assert "train: warning: step-0000002 was made on " in out and "1 threads, this run is on " in out
    assert "2 threads: its kernels round otherwise" in out


def test_a_failing_validation_keeps_its_steps_checkpoint_and_a_rerun_resumes_there(workspace, tmp_path):
    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    ckpt = tmp_path / "checkpoints"
    for steps in (2, 3):  # validation at a checkpoint step, then at the last step (no checkpoint_every there)
        with pytest.raises(torch.OutOfMemoryError):
            train_in_process(workspace, ckpt, validate=out_of_memory, steps=steps, checkpoint_every=2,
                             validate_every=steps)
        assert checkpoint.all_checkpoints(ckpt)[-1].name == f"step-{steps:07d}"
    _, stats = train_in_process(workspace, ckpt, steps=3, checkpoint_every=2, validate_every=3)
    assert stats["resumed_from"] == str(ckpt / "step-0000003")


def test_checkpoints_of_other_training_code_are_not_resumed(workspace, tmp_path, monkeypatch, capsys):
    """DVC re-runs train when its code deps change (sdtune/train, sdtune/families, the validation
    images' generate.py, ...): the rerun starts over."""
    ckpt = tmp_path / "checkpoints"
    train_in_process(workspace, ckpt, checkpoint_every=1)
    code = tmp_path / "code"
    for path in loop.TRAINING_CODE:
        copy = shutil.copytree if path.is_dir() else shutil.copy
        (code / path.relative_to(loop.SDTUNE)).parent.mkdir(parents=True, exist_ok=True)
        copy(path, code / path.relative_to(loop.SDTUNE))
    monkeypatch.setattr(loop, "TRAINING_CODE", [code / path.relative_to(loop.SDTUNE) for path in loop.TRAINING_CODE])
    _, stats = train_in_process(workspace, ckpt, checkpoint_every=1)  # the same code elsewhere: resumed
    assert stats["resumed_from"] == str(ckpt / "step-0000002")
    for changed in ["families/common.py", "evaluate/generate.py"]:  # any edit: DVC re-runs on any
        (code / changed).write_text((code / changed).read_text() + "\n# changed\n")
        capsys.readouterr()
        _, stats = train_in_process(workspace, ckpt, checkpoint_every=1)
        assert stats["resumed_from"] is None
        assert "made with other params, data or code" in capsys.readouterr().out


def test_an_upgrade_of_a_library_that_changes_the_numbers_starts_over(monkeypatch):
    """bitsandbytes and prodigyopt make the optimizer's update, transformers a validation prompt's
    embedding, Pillow a validation PNG's bytes: a run resumed across an upgrade matches no
    uninterrupted run. prodigyopt has no __version__: versions are read from pip's metadata."""
    first = loop.training_code()
    assert loop.training_code() == first
    for dist in ["bitsandbytes", "prodigyopt", "transformers", "pillow", "torch"]:
        monkeypatch.setattr(io, "library_version", lambda d, real=io.library_version, upgraded=dist:
                            (real(d) or "absent") + ".post1" if d == upgraded else real(d))
        assert loop.training_code() != first, dist
        monkeypatch.undo()


def test_a_checkpoint_follows_the_model_its_revision_names_and_the_caches_items(workspace, tmp_path, monkeypatch):
    """A branch that moved, or a local model whose weights (the UNet too) changed, is another base:
    its checkpoints are not resumed. The same commit named by branch or by hash is the same base,
    and the cache index's revision string is not part of what must match; its items are."""
    from huggingface_hub import constants

    run = loop.setup(in_process_params(workspace), workspace / "cache")
    cache = tmp_path / "cache"
    shutil.copytree(workspace / "cache", cache)

    def mark(**model):
        run.params = params_lib.parse({"model": {"resolution": 32, **model}})
        return loop.fingerprint(run, cache, loop.base_revision(run))

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_snapshot(tmp_path / "hub", "org/model", "main", "a" * 40)
    on_main = mark(id="org/model", revision="main")
    assert mark(id="org/model", revision="a" * 40) == on_main
    hub_snapshot(tmp_path / "hub", "org/model", "main", "b" * 40)
    assert mark(id="org/model", revision="main") != on_main

    local = tmp_path / "weights"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "w.safetensors").write_bytes(b"u")
    first = mark(id=str(local))
    (local / "unet" / "w.safetensors").write_bytes(b"uu")
    assert mark(id=str(local)) != first

    index = json.loads((cache / "index.json").read_text())
    first = mark(id="tiny")
    (cache / "index.json").write_text(json.dumps(index | {"revision": "a" * 40, "resolved_revision": "a" * 40}))
    assert mark(id="tiny") == first
    index["items"][0]["key"] = "0" * 64
    (cache / "index.json").write_text(json.dumps(index))
    assert mark(id="tiny") != first


def cpu_loss_scaler(run):
    """fp16's loss scaler where accelerate keeps it, on the CPU: accelerate makes one only for fp16 on
    a GPU. The real GradScaler and AcceleratedOptimizer, so a real overflow makes a real skip."""
    from accelerate.optimizer import AcceleratedOptimizer

    acc = run.accelerator
    acc.scaler = torch.amp.GradScaler("cpu")
    run.optimizer = AcceleratedOptimizer(run.optimizer.optimizer, scaler=acc.scaler)
    acc._optimizers = [run.optimizer]
    return run


def test_an_fp16_overflow_skips_schedule_and_ema_and_the_loss_scale_survives_resume(workspace, tmp_path):
    from accelerate.state import AcceleratorState

    from sdtune.train import lora

    params = in_process_params(workspace, steps=3, checkpoint_every=1, lr_scheduler="linear", ema_decay=0.9)
    ckpt = tmp_path / "checkpoints"
    run = cpu_loss_scaler(loop.setup(params, workspace / "cache"))
    # An fp16 overflow in the second step (run.step is 1 while it runs): the scaler skips it.
    lora.trainable(run.denoiser)[0].register_hook(lambda g: g * math.inf if run.step == 1 else g)
    loop.train(run, ckpt, workspace / "cache")
    assert run.accelerator.scaler.get_scale() == 65536 / 2
    assert run.lr_scheduler.last_epoch == 2 and run.ema.optimization_step == 2  # 3 steps, one skipped

    AcceleratorState._reset_state(reset_partial_state=True)
    again = cpu_loss_scaler(loop.setup(params, workspace / "cache"))
    stats = loop.train(again, ckpt, workspace / "cache")
    assert stats["resumed_from"] == str(ckpt / "step-0000003")
    assert again.accelerator.scaler.get_scale() == 65536 / 2


def test_the_published_lora_is_the_ema_shadow_not_the_raw_weights(workspace, tmp_path):
    run, _ = train_in_process(workspace, tmp_path / "checkpoints", steps=3, ema_decay=0.9)
    model = run.accelerator.unwrap_model(run.denoiser)
    raw = {k: v.clone() for k, v in lora_lib.diffusers_state(model).items()}
    shadow = [s.clone() for s in run.ema.shadow_params]  # in the order of the trainable tensors
    published = loop.final_lora(run)
    assert list(published) == list(raw) and len(published) == len(shadow)
    assert all(torch.equal(p, s) for p, s in zip(published.values(), shadow))
    assert any(not torch.equal(published[k], raw[k]) for k in raw)


def test_validation_samples_the_ema_weights_and_leaves_the_training_as_it_was(workspace, tmp_path, monkeypatch):
    from sdtune.evaluate import generate
    from sdtune.train import lora

    train = {"steps": 3, "ema_decay": 0.9, "deterministic": True, "validation_prompts": ["a picture 1"],
             "validation_seeds": [0], "validation_steps": 2}
    plain, _ = train_in_process(workspace, tmp_path / "plain", **train)
    without = loop.final_lora(plain)

    ema_then, sampled = [], []
    real_sample = generate.sample

    def sample(pipe, *args, **kwargs):  # the weights the images are drawn with
        sampled.append([w.clone() for w in lora.trainable(getattr(pipe, plain.family.DENOISER_ATTR))])
        return real_sample(pipe, *args, **kwargs)

    monkeypatch.setattr(generate, "sample", sample)
    validator = validate_lib.Validator(plain.params, plain.family, tmp_path / "validation")

    def validate(run):
        ema_then.append([s.clone() for s in run.ema.shadow_params])
        return validator(run)

    run, _ = train_in_process(workspace, tmp_path / "validated", validate=validate, validate_every=1, **train)
    assert len(sampled) == len(ema_then) == 3
    for drawn, ema in zip(sampled, ema_then):
        assert all(torch.equal(d, e) for d, e in zip(drawn, ema))
    with_validation = loop.final_lora(run)
    assert with_validation.keys() == without.keys()
    assert all(torch.equal(with_validation[k], without[k]) for k in without)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback to the CPU happens only without CUDA")
def test_a_real_model_is_not_trained_on_the_cpu_unless_asked(tmp_path):
    """base.device: auto without a GPU (a VM whose driver failed) stops the train stage at once;
    base.device: cpu, or the tiny model, trains there."""
    (tmp_path / "params.yaml").write_text("model: {id: org/some-model}\n")
    out = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: base.device: auto found no CUDA GPU; training org/some-model on the CPU would take days. "
        "Check nvidia-smi, or set base.device: cpu to train there anyway")
    assert not (tmp_path / "reports").exists()

    from stages import train as train_stage

    for raw in ({"model": {"id": "org/some-model"}, "base": {"device": "cpu"}}, {"model": {"id": "tiny"}}):
        train_stage.check_device(params_lib.parse(raw))  # no error


def test_a_checkpoint_without_a_loss_scaler_resumes_into_a_run_with_one(tmp_path):
    """Made where `auto` meant bf16, resumed where it means fp16: nothing to restore into the scaler,
    which keeps its own scale, while the rest comes back. (The fingerprint now names the resolved
    precision; restore still must not fail on it.)"""
    def parts():
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW([weight])
        return weight, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    weight, optimizer, schedule = parts()
    weight.grad = torch.ones(2)
    optimizer.step()
    schedule.step()
    history = [{"step": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0}]
    checkpoint.save(tmp_path, 1, {"w": weight.detach()}, optimizer, schedule, None, None, history, 2, "mark")
    _, saved = checkpoint.latest(tmp_path, "mark")
    _, fresh_optimizer, fresh_schedule = parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    lora = {}
    step, restored = checkpoint.restore(saved, lora.update, fresh_optimizer, fresh_schedule, None, scaler)
    assert (step, restored) == (1, history)
    assert torch.equal(lora["w"], weight.detach())
    assert fresh_schedule.last_epoch == 1 and fresh_schedule.get_last_lr() == schedule.get_last_lr() == [5e-4]
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert scaler.get_scale() == 1024.0


def test_the_loras_params_hash_follows_the_train_stages_params_not_the_device_nor_the_data_stages():
    """params_sha256 changes with the params DVC re-trains for, and only with them: not with where
    it ran (base.device), nor with a data stage's key (data.max_archive_bytes re-runs fetch; when
    data/raw comes out the same DVC skips train, and the LoRA's hash must still be its params')."""
    from sdtune import runtime

    def digest(**sections):
        return runtime.provenance(params_lib.parse(sections))["params_sha256"]

    assert digest(base={"device": "auto"}) == digest(base={"device": "cpu"})
    assert digest(data={"retries": 1}) == digest(data={"retries": 5})
    assert digest(data={"max_archive_bytes": 10**9}) == digest(data={"max_archive_bytes": 3 * 10**10})
    assert digest(base={"seed": 1}) != digest(base={"seed": 2})
    assert digest(model={"resolution": 64}) != digest(model={"resolution": 128})
    assert digest(train={"steps": 3}) != digest(train={"steps": 4})
    # nor with the keys of the loop around the step: a rerun for one resumes to the same tensors,
    # and a LoRA differing by its metadata alone re-ran quantize, evaluate and profile
    assert digest(train={"log_every": 1, "validate_every": 2}) == digest(train={"log_every": 50})


def test_the_loras_base_commit_is_what_the_revision_resolved_to_not_its_name(uninterrupted):
    """base_revision is the name asked for ("main" moves); base_commit what it named when training began."""
    from sdtune import runtime

    p = params_lib.parse({"model": {"id": "org/model", "revision": "main"}})
    meta = runtime.provenance(p, base_commit="c" * 40)
    assert (meta["base_revision"], meta["base_commit"]) == ("main", "c" * 40)
    written = io.read_safetensors_metadata(uninterrupted / "models/lora" / common.LORA_FILE)
    model = params_lib.load(uninterrupted / "params.yaml").model
    assert written["base_commit"] == common.resolved_revision(model) != model.revision
    assert written["base_revision"] == model.revision


def test_the_loras_git_commit_says_when_the_code_differs_from_it(tmp_path, monkeypatch):
    """`dvc exp run` trains on uncommitted code: the commit alone named code the LoRA was not trained with."""
    from sdtune import runtime

    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "sdtune").mkdir()
    (tmp_path / "sdtune" / "optim.py").write_text("lr = 1\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("steps = 1\n")
    (tmp_path / "params.yaml").write_text("train: {}\n")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
        subprocess.run([*git, *args], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "params.yaml").write_text("train: {steps: 3}\n")  # what dvc exp run -S edits: in the params hash
    assert runtime.git_commit() == head
    (tmp_path / "sdtune" / "optim.py").write_text("lr = 2\n")
    assert runtime.git_commit() == head + "+modified"
    subprocess.run([*git, "commit", "-qam", "c2"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runtime.git_commit() == head
    (tmp_path / "stages" / "train.py").write_text("steps = 2\n")  # the stage scripts are code too
    assert runtime.git_commit() == head + "+modified"
    subprocess.run([*git, "checkout", "-q", "stages/train.py"], check=True)
    # Committing a run's dvc.lock and params moves HEAD, not the code: a rerun's LoRA names the same
    # commit, so the stages after train are not re-run for its metadata alone.
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "run"], check=True)
    assert runtime.git_commit() == head


def test_lora_layers_add_their_products_inside_gemms_and_train_peft_s_lora(workspace):
    """train.lora.addmm (the default) gives each LoRA Linear layer AddmmLora's forward; three float32
    steps train the LoRA that peft's own forward trains, to float32's rounding."""
    from accelerate.state import AcceleratorState
    from peft.tuners.lora import Linear as LoraLinear

    from sdtune.train import lora

    def trained(addmm: bool):
        AcceleratorState._reset_state(reset_partial_state=True)
        run = loop.setup(in_process_params(workspace, lora={"rank": 4, "alpha": 8.0, "addmm": addmm}), workspace / "cache")
        layers = [m for m in run.denoiser.modules() if isinstance(m, LoraLinear)]
        for step in range(3):
            loop.train_step(run, step)
        return lora_state(run), {getattr(m.forward, "__func__", None) is lora._addmm_forward for m in layers}

    (ours, addmm), (peft_s, not_addmm) = trained(True), trained(False)
    assert addmm == {True} and not_addmm == {False}
    assert ours.keys() == peft_s.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], peft_s[key], rtol=1e-4, atol=1e-6, msg=key)


def bf16_run(arch: str, autocast: bool, **lora):
    """A CPU training Run in bf16 over bench's tiny random denoiser of `arch`, the same one each
    call (seeded), with a rank-4 LoRA and these lora keys."""
    return tiny_loop_run(arch, torch.bfloat16, lora, mixed_precision="bf16", autocast=autocast)


def test_under_mixed_precision_lora_inputs_skip_peft_casts_with_the_same_bits(workspace):
    """bf16: peft's cast of each LoRA input to float32, which autocast undoes at once, is skipped.
    Three steps train the same LoRA to the bit with fewer copies; DoRA (its weight norm follows
    the input's dtype), LoRA dropout (its scale would round to bf16) and full precision keep
    peft's behaviour."""
    from accelerate.state import AcceleratorState
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.n += func._overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    def trained(casts: bool, **train):
        # peft's own forward: AddmmLora (train.lora.addmm) casts its operands itself. Under autocast,
        # as the skip needs: without autocast peft's casts are what run the float32 adapter on bf16.
        train.setdefault("lora", {"rank": 4, "alpha": 4.0, "addmm": False})
        train.setdefault("autocast", True)
        AcceleratorState._reset_state(reset_partial_state=True)
        run = loop.setup(in_process_params(workspace, mixed_precision="bf16", **train), workspace / "cache")
        layers = [m for m in run.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        skipped = [not m.cast_input_dtype_enabled for m in layers]
        for m in layers:
            m.cast_input_dtype_enabled = casts
        Copies.n = 0
        kept = []  # per step: what autograd keeps for the backward
        with Copies():
            for step in range(3):
                with kept_for_backward() as step_kept:
                    loop.train_step(run, step)
                kept.append(sum(n for n, _ in step_kept.values()))
        return lora_state(run), Copies.n, skipped, max(kept)

    skipping, fewer, skipped, kept_less = trained(casts=False)
    casting, more, _, kept_more = trained(casts=True)
    assert skipped and all(skipped)  # what setup did
    assert skipping.keys() == casting.keys()
    assert all(torch.equal(skipping[k], casting[k]) for k in skipping)
    assert more - fewer >= 3 * 2 * len(skipped)  # at least one copy saved per layer, forward and backward
    # With the cast, a LoRA's down-projection keeps its own bf16 copy of the layer's input for the
    # backward, beside the one the frozen layer keeps; without it both keep the same tensor.
    assert kept_less < kept_more

    for keeps_casts in ({"use_dora": True}, {"dropout": 0.1}):
        _, _, flags, _ = trained(casts=True, lora={"rank": 4, "alpha": 4.0, **keeps_casts})
        assert flags and not any(flags), keeps_casts
    AcceleratorState._reset_state(reset_partial_state=True)
    full = loop.setup(in_process_params(workspace), workspace / "cache")
    assert all(m.cast_input_dtype_enabled for m in full.denoiser.modules() if isinstance(m, BaseTunerLayer))
    # bf16 without autocast (the default): the layers skip the casts too, under an autocast of their own.
    AcceleratorState._reset_state(reset_partial_state=True)
    plain = loop.setup(in_process_params(workspace, mixed_precision="bf16", lora={"rank": 4, "alpha": 4.0, "addmm": False}),
                       workspace / "cache")
    layers = [m for m in plain.denoiser.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert {getattr(m, lora_lib.AUTOCAST) for m in layers} == {torch.bfloat16}


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd35m"])
def test_a_step_walks_no_module_tree_for_the_dtype_or_the_lora_tensors(arch, monkeypatch):
    """Walking the model's modules costs ms a step on the host at SD1.5's ~2,000 (diffusers' `.dtype`
    walks them all, 3 ms on a 2-core CPU; listing the LoRA tensors 1.8 ms), which a GPU waits for at
    small batches. The loop reads both once: the LoRA tensors are the optimizer's and the EMA's,
    and the dtype is what diffusers' `.dtype` says."""
    run = tiny_loop_run(arch, torch.bfloat16, mixed_precision="bf16", ema_decay=0.9)
    model = run.accelerator.unwrap_model(run.denoiser)
    ids = [id(p) for p in run.lora_params]
    assert ids and ids == [id(p) for p in lora_lib.trainable(model)]
    assert ids == [id(p) for group in run.optimizer.param_groups for p in group["params"]]
    assert common.model_dtype(run.denoiser) == model.dtype == torch.bfloat16
    assert common.model_dtype(SimpleNamespace(module=model)) == torch.bfloat16  # through DDP's wrapper
    # A walk of the tree calls named_modules once per module it visits (before: 3,800 calls a step
    # for the tiny SD1.5's 1,266 modules; now 2, the first parameter's path).
    visits = []
    named_modules = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        visits.append(type(self).__name__)
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    loop.train_step(run, 0)
    assert len(visits) < sum(1 for _ in model.modules()) / 10, visits[:20]


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_the_update_launches_a_few_kernels_however_many_lora_tensors(ema_decay):
    """Every op the update dispatches is a kernel launch on a GPU, several µs of host time a step.
    Clipping, fused AdamW and the EMA each take all the LoRA tensors in one multi-tensor op; the
    EMA's plain update ran three ops per tensor (480 for the tiny SD1.5's 160, more for the real one)."""
    run = tiny_loop_run("sd15", torch.float32, ema_decay=ema_decay)
    counted = {}

    class Timer:  # loop.NullTimer's interface: each phase of the step counted apart
        def phase(self, name):
            counted[name] = DispatchedOps()
            return counted[name]

    loop.train_step(run, 0)  # the first step makes AdamW's state
    before = [p.detach().clone() for p in run.ema.shadow_params] if ema_decay else []
    loop.train_step(run, 1, Timer())
    assert len(run.lora_params) == 160
    assert 0 < counted["optimizer"].count < 40, counted["optimizer"].seen
    if ema_decay:  # the EMA still made its update, tensor by tensor
        d = run.ema.cur_decay_value
        for old, new, param in zip(before, run.ema.shadow_params, run.lora_params, strict=True):
            torch.testing.assert_close(new, old - (1 - d) * (old - param.detach()))
        assert any(not torch.equal(old, new) for old, new in zip(before, run.ema.shadow_params))


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd35m"])
def test_latents_cached_in_bf16_are_noised_in_float32(arch):
    """cache.dtype: bfloat16 keeps the cache small; the noise levels stay float32's. In bf16 the
    noising would lose timesteps 0 and 1 altogether and most of the low levels' spacing."""
    run = tiny_loop_run(arch, torch.float32)
    batch = {k: torch.stack([item[k] for item in run.items]) for k in run.items[0]}
    as_cached = {**batch, "latents": batch["latents"].to(torch.bfloat16)}
    widened = {**batch, "latents": as_cached["latents"].float()}  # the same numbers, exactly

    def loss(b):
        with torch.no_grad():
            return run.family.training_loss(run.denoiser, run.noise_scheduler, b, torch.Generator().manual_seed(5),
                                            run.params.train)

    assert torch.equal(loss(as_cached), loss(widened))


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd35m"])
def test_without_autocast_each_family_trains_its_bf16_base_in_bf16(arch):
    """train.autocast: false switches autocast off around the forward (accelerate's wrapper and the
    loop's own context alike), and each family hands its bf16 denoiser bf16 inputs. On a CPU,
    whose autocast keeps norms in bf16, that is the autocast step to the bit: the casts the
    families make are the ones autocast made at the first layers."""
    def first_step(autocast: bool):
        run = bf16_run(arch, autocast)  # the same random denoiser both times
        seen = set()
        for m in run.denoiser.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.register_forward_pre_hook(lambda m, args: seen.add((torch.is_autocast_enabled("cpu"), args[0].dtype)))
        before = {k: v.clone() for k, v in lora_state(run).items()}
        loss = loop.train_step(run, 0)
        after = lora_state(run)
        assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
        return loss, after, seen

    loss_with, lora_with, seen_with = first_step(True)
    loss_without, lora_without, seen_without = first_step(False)
    assert seen_with == {(True, torch.bfloat16)}
    assert seen_without == {(False, torch.bfloat16)}
    assert torch.isfinite(loss_without) and torch.equal(loss_without, loss_with)
    assert {v.dtype for v in lora_without.values()} == {torch.float32}
    assert all(torch.equal(lora_without[k], lora_with[k]) for k in lora_with)


@pytest.mark.parametrize("keeps_peft_forward", [{"dropout": 0.1}, {"use_dora": True}])
def test_without_autocast_layers_on_peft_forward_train_as_under_autocast(keeps_peft_forward):
    """The LoRA layers that keep peft's forward (LoRA dropout, DoRA; a 4-bit base on CUDA) run it
    under an autocast of their own when the step has none: the same LoRA to the bit as the
    autocast step, and no float32 copy of each layer's input kept for the backward."""
    def first_step(autocast: bool):
        run = bf16_run("sd15", autocast, **keeps_peft_forward)
        with kept_for_backward() as kept:
            loss = loop.train_step(run, 0)
        float32 = sum(n for n, dtype in kept.values() if dtype == torch.float32)
        return loss, lora_state(run), float32

    loss_with, lora_with, float32_with = first_step(True)
    loss_without, lora_without, float32_without = first_step(False)
    assert torch.equal(loss_without, loss_with)
    assert all(torch.equal(lora_without[k], lora_with[k]) for k in lora_with)
    assert float32_without == float32_with


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_validation_samples_the_denoiser_trained_without_autocast(family, tmp_path):
    """accelerate hands the prepared denoiser's output back in float32, which makes the pipeline's
    latents float32 after its first step: without autocast the bf16 denoiser must still get bf16."""
    from accelerate.state import AcceleratorState

    from sdtune.train import validate as validate_lib

    AcceleratorState._reset_state(reset_partial_state=True)
    p = params_lib.parse({"base": {"seed": 3, "device": "cpu"}, "model": {"family": family, "id": "tiny", "resolution": 32},
                          "train": {"wandb": "disabled", "mixed_precision": "bf16", "autocast": False,
                                    "validation_prompts": ["a picture 1"], "validation_seeds": [0], "validation_steps": 3}})
    run = loop.prepare(p, items=[])
    path = validate_lib.Validator(p, run.family, tmp_path)(run)
    from PIL import Image

    with Image.open(path) as image:
        pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 0  # a picture, not a blank


def test_the_report_gives_the_speed_of_the_steps_a_resumed_run_trained(workspace, tmp_path):
    """train.json's seconds and speeds are of the steps this process ran: after a resume, fewer than
    the run's. Resumed at the last step (a failure after the loop), none ran: no 0.00 steps/s."""
    from sdtune import report

    ckpt = tmp_path / "checkpoints"
    _, stats = interrupted_then_resumed(workspace, ckpt, 2, [], steps=4)
    assert stats["steps"] == 4 and stats["steps_run"] == 2
    assert stats["steps_per_second"] == pytest.approx(2 / stats["seconds"])
    (line,) = [ln for ln in report.training_section(stats) if ln.startswith("Final loss")]
    assert (f"after 4 steps, resumed from step 2: 2 of 4 steps ran in {stats['seconds']:.1f} s "
            f"({stats['steps_per_second']:.2f} steps/s, {stats['images_per_second']:.2f} images/s).") in line
    _, stats = train_in_process(workspace, ckpt, steps=4, validate_every=2, checkpoint_every=2)
    assert stats["resumed_from"] == str(ckpt / "step-0000004") and stats["steps_run"] == 0
    (line,) = [ln for ln in report.training_section(stats) if ln.startswith("Final loss")]
    assert line.endswith(f"after 4 steps, resumed from step 4: 0 of 4 steps ran in {stats['seconds']:.1f} s.")
    _, stats = train_in_process(workspace, tmp_path / "straight", steps=2)
    assert stats["steps_run"] == 2 and stats["resumed_from"] is None
    (line,) = [ln for ln in report.training_section(stats) if ln.startswith("Final loss")]
    assert line.endswith(f"after 2 steps in {stats['seconds']:.1f} s ({stats['steps_per_second']:.2f} steps/s, "
                         f"{stats['images_per_second']:.2f} images/s).")


def test_the_ema_is_restored_onto_the_device_of_the_weights_it_follows(workspace, tmp_path):
    """Only rank 0 writes checkpoints: read from its card, every rank's EMA shadows landed on cuda:0
    and the next EMA step failed on the others. Here the weights sit on meta, as another card would."""
    from diffusers.training_utils import EMAModel

    ckpt = tmp_path / "checkpoints"
    train_in_process(workspace, ckpt, steps=2, checkpoint_every=2, ema_decay=0.9)
    saved = checkpoint.read(checkpoint.all_checkpoints(ckpt)[-1])
    shadows = saved["state"]["ema"]["shadow_params"]
    assert shadows and all(t.device.type == "cpu" for t in shadows)
    weights = [torch.nn.Parameter(torch.empty_like(t, device="meta")) for t in shadows]
    optimizer = torch.optim.AdamW(weights)
    ema = EMAModel(weights, decay=0.9)
    ema.shadow_params = [torch.zeros_like(t, device="cpu") for t in shadows]
    checkpoint.restore(saved, lambda tensors: None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       ema, None)
    assert all(t.device.type == "meta" for t in ema.shadow_params)
    ema.step(weights)  # on the weights' device: no "not on the expected device"


def test_the_speed_is_the_trainings_own_and_counts_short_batches(workspace, tmp_path):
    """train.json's speed took in the time spent drawing validation images and writing checkpoints,
    and counted every batch as full, where each epoch's last is short (6 images in batches of 4)."""
    import time as clock

    def slow_validation(run):
        clock.sleep(0.5)

    run, stats = train_in_process(workspace, tmp_path / "ck", validate=slow_validation, steps=4, batch_size=4,
                                  validate_every=2, checkpoint_every=2)
    assert len(run.items) == 6 and stats["images"] == 12  # two epochs of 4 + 2, not 4 x 4
    assert stats["wall_seconds"] - stats["seconds"] >= 2 * 0.5  # validated after steps 2 and 4
    assert stats["images_per_second"] == pytest.approx(12 / stats["seconds"])
    assert stats["steps_per_second"] == pytest.approx(4 / stats["seconds"])


def test_a_non_finite_gradient_stops_the_run_before_its_checkpoint(workspace, tmp_path, monkeypatch):
    """A finite loss with an infinite gradient made the weights NaN; that step's checkpoint was written,
    the run stopped a step later, and a rerun resumed the NaN weights."""
    real = loop.train_step

    def step(run, i, *args, **kwargs):
        if i != 1:
            return real(run, i, *args, **kwargs)
        hook = lora_lib.trainable(run.denoiser)[0].register_hook(lambda grad: grad * float("inf"))
        try:
            return real(run, i, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(loop, "train_step", step)
    ckpt = tmp_path / "ck"
    with pytest.raises(UserError, match=r"train: the gradient norm became (inf|nan) at step 2; stopped"):
        train_in_process(workspace, ckpt, steps=4, checkpoint_every=2, log_every=1)
    assert checkpoint.all_checkpoints(ckpt) == []  # step 2's, with NaN weights, was not written


def test_wandb_online_without_a_key_is_one_line_before_the_model_loads(workspace, tmp_path, monkeypatch):
    """wandb.init raised its UsageError as a traceback, after the base model had loaded."""
    from sdtune import runtime

    ws = clone(workspace, tmp_path / "ws")
    (ws / "params.yaml").write_text(PARAMS.replace("wandb: disabled", "wandb: online"))
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "NETRC", "WANDB_MODE")}
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=ws, capture_output=True, text=True, timeout=300,
                          env={**env, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: train.wandb: online needs a W&B API key: set WANDB_API_KEY or run `wandb login`, or use offline "
        "(and `wandb sync` the run later)"], done.stderr
    assert not (ws / "models").exists()
    # The key from either place is enough; offline needs none.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    runtime.check_wandb("offline")
    (tmp_path / "home").mkdir()
    (tmp_path / "home/.netrc").write_text("machine api.wandb.ai\n  login user\n  password local-key\n")
    (tmp_path / "home/.netrc").chmod(0o600)
    runtime.check_wandb("online")
    (tmp_path / "home/.netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    runtime.check_wandb("online")


def test_a_cache_encoded_by_another_revision_of_the_model_is_not_trained_on(workspace, tmp_path):
    """DVC re-runs the cache stage on a changed param, not on a moved "main" or edited local weights:
    train would have paired the old encoders' latents with the new denoiser."""
    ws = clone(workspace, tmp_path / "ws")
    index = io.read_json(ws / "cache/index.json")
    assert index["resolved_revision"].startswith("tiny:")  # what the cache stage resolved "tiny" to
    io.write_json(ws / "cache/index.json", index | {"resolved_revision": "tiny:0000000000000000"})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run = loop.setup(in_process_params(ws), ws / "cache")
    with pytest.raises(UserError) as err:
        loop.train(run, ws / "ck", ws / "cache")
    assert str(err.value) == (f"{ws / 'cache/index.json'}: encoded with tiny at tiny:0000000000000000, but "
                              f"model.revision (main) now names {index['resolved_revision']}; encode it again with "
                              f"`dvc repro -f cache`, or pin model.revision")
    assert not (ws / "ck").exists() and run.step == 0


def test_a_resumed_run_drops_the_later_images_and_a_killed_writes_temporary(tmp_path):
    """A kill while step 30's image was renamed into place left .step-0000030.png.<x>.tmp inside
    reports/validation, a DVC output, and no rerun removed it."""
    out = tmp_path / "validation"
    out.mkdir()
    for name in ["step-0000010.png", "step-0000020.png", "step-0000030.png", ".step-0000030.png.k2x9ab_1.tmp"]:
        (out / name).write_bytes(b"png")
    validate_lib.Validator(params_lib.parse({}), None, out).drop_after(20)
    assert sorted(p.name for p in out.iterdir()) == ["step-0000010.png", "step-0000020.png"]


class DispatchedOps(TorchDispatchMode):
    """The aten ops a block of code runs (`seen`), and how many it dispatches (`count`)."""

    def __init__(self):
        super().__init__()
        self.seen, self.count = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func)
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("choice, fused", [("sdpa", True), ("math", False)])
def test_train_attention_math_runs_the_unfused_kernel_in_the_training_step(choice, fused):
    """The profile matrix's math-attention cell measures what train.attention: math trains with:
    the step itself, not only the helper, must run the unfused kernel."""
    run = tiny_loop_run("sd15", torch.float32, attention=choice)
    with DispatchedOps() as ops:
        loop.train_step(run, 0)
    assert (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in ops.seen) == fused


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_checkpoint_of_another_mixed_precision_is_another_runs(tmp_path, precision):
    """train.mixed_precision: auto is bf16 on one card and fp16 or none on another: not one run."""
    io.write_json(tmp_path / "index.json", {"items": []})
    p = params_lib.parse({"model": {"id": "tiny", "resolution": 32}, "train": {"mixed_precision": "auto"}})

    def mark(mixed):
        run = SimpleNamespace(params=p, accelerator=SimpleNamespace(num_processes=1, mixed_precision=mixed))
        return loop.fingerprint(run, tmp_path, "tiny")

    assert mark("no") != mark(precision) == mark(precision)


def test_batches_of_two_buckets_are_interleaved_and_shuffled_within_each():
    """With aspect-ratio buckets, an epoch in bucket order would train all of one shape first, and
    unshuffled members would pair the same items every epoch."""
    wide, tall = torch.zeros(4, 4, 8), torch.zeros(4, 8, 4)
    items = [{"latents": wide} for _ in range(8)] + [{"latents": tall} for _ in range(8)]
    p = params_lib.parse({"base": {"seed": 3}, "model": {"id": "tiny", "resolution": 32}, "train": {"batch_size": 2}})
    run = SimpleNamespace(params=p, items=items, batches={},
                          accelerator=SimpleNamespace(num_processes=1, process_index=0))
    epochs = [loop.epoch_batches(run, epoch) for epoch in range(3)]
    orders = ["".join("w" if batch[0] < 8 else "t" for batch in batches) for batches in epochs]
    assert all(sorted(order) == sorted("wwwwtttt") for order in orders)
    assert not all(order in ("wwwwtttt", "ttttwwww") for order in orders), orders
    consecutive = {(i, i + 1) for i in range(0, 16, 2)}
    assert not all({tuple(batch) for batch in batches} == consecutive for batches in epochs)


@pytest.mark.parametrize("keys, said", [
    ({"center_crop": False}, "cache.center_crop: False"),
    ({"dtype": "bfloat16"}, "cache.dtype: bfloat16"),
    ({"buckets": True, "bucket_step": 16}, "cache.crop_step: 16"),
])
def test_a_cache_built_with_any_other_encoding_setting_is_refused(tmp_path, keys, said):
    """A cache built by hand with other params: each setting in its items' keys is compared."""
    base = {"base": {"seed": 3}, "model": {"id": "tiny", "resolution": 32}}
    other = params_lib.parse(base | {"cache": keys})
    io.write_json(tmp_path / "index.json", {"items": [], "settings": cache.settings(other.model, other.cache)})
    run = SimpleNamespace(params=params_lib.parse(base), accelerator=None, family=None)
    with pytest.raises(UserError, match=f"built with {said}"):
        loop.check_cache_model(run, tmp_path)


def test_the_last_step_is_validated_when_it_is_no_multiple_of_validate_every(workspace, tmp_path):
    seen = []
    train_in_process(workspace, tmp_path / "checkpoints", validate=lambda r: seen.append(r.step),
                     steps=3, validate_every=2, checkpoint_every=2)
    assert seen == [2, 3]


def test_final_loss_is_the_mean_over_the_loss_curves_window(workspace, tmp_path):
    """The number REPORT.md quotes is where the curve's running mean ends, not one step's loss."""
    run, stats = train_in_process(workspace, tmp_path / "checkpoints", steps=12, checkpoint_every=100, log_every=1)
    window = loop.smoothing_window(12)
    assert stats["final_loss_steps"] == window == 5
    assert stats["final_loss"] == pytest.approx(sum(h["loss"] for h in run.history[-window:]) / window)
