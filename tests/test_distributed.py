"""Two CPU processes over gloo (torchrun): ranks see different data and end with the same LoRA."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file

from conftest import OFFLINE, ROOT, captions_for, tiny_cache
from fixtures_data import free_port
from sdtune import params as params_lib
from sdtune.families import common

PARAMS = """\
base: {seed: 5, device: cpu}
model: {id: tiny, resolution: 32}
train: {steps: 4, batch_size: 2, lr: 1.0e-3, checkpoint_every: 100, log_every: 1, wandb: disabled,
        lora: {rank: 4, alpha: 4.0}}
"""


def stale_checkpoints(ckpt_dir, n=100, files=40):
    """Checkpoints of another run, big enough that removing them takes a while, and a temporary
    a kill mid-write left behind."""
    for step in range(1, n + 1):
        folder = ckpt_dir / f"step-{step:07d}"
        folder.mkdir(parents=True)
        for i in range(files):
            (folder / f"part{i}").write_bytes(b"x" * 100)
        (folder / "state.json").write_text(json.dumps({"step": step, "fingerprint": "another run"}))
    (ckpt_dir / ".step-0000101.k2x9.tmp").mkdir()


def torchrun(workspace, out, **env):
    """tests/dist_train.py in two CPU processes over gloo, in `workspace`, dumping into `out`."""
    out.mkdir(exist_ok=True)
    port = free_port()  # a fixed port collided with another test run on the same machine
    launcher = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = [*launcher.split(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(ROOT / "tests/dist_train.py"), str(out)]
    return subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_two_ranks_see_different_data_remove_stale_checkpoints_once_and_save_rank0s_lora(tmp_path):
    """Rank 0 alone removes another run's checkpoints: both ranks removing them raced (FileNotFoundError)."""
    (tmp_path / "params.yaml").write_text(PARAMS)
    tiny_cache(tmp_path / "data/raw", tmp_path / "cache", 8, 40, params_lib.load(tmp_path / "params.yaml"))
    stale_checkpoints(tmp_path / "checkpoints")
    out = tmp_path / "dump"
    done = torchrun(tmp_path, out)
    assert done.returncode == 0, done.stderr[-4000:]
    assert os.listdir(tmp_path / "checkpoints") == ["step-0000004"]  # this run's last step

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # every step's one micro-batch (steps: 4, grad_accum 1) recorded on each rank, batch_size 2 each:
    # zip over an empty or short record would compare nothing
    for r in ranks:
        assert [(s, m) for s, m, _ in r["seen"]] == [(0, 0), (1, 0), (2, 0), (3, 0)]
        assert all(len(idx) == 2 for _, _, idx in r["seen"])
    for (s0, m0, idx0), (s1, m1, idx1) in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert (s0, m0) == (s1, m1)
        assert not set(idx0) & set(idx1), f"step {s0}: both ranks trained on {set(idx0) & set(idx1)}"

    # The loss each rank logs is the mean of both ranks' (one curve, and a NaN on one stops both)
    for step in range(4):
        both = [r["own_losses"][step] for r in ranks]
        assert both[0] != both[1]  # different batches
        for r in ranks:
            assert r["history"][step]["loss"] == pytest.approx(sum(both) / 2, rel=1e-6)

    held = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    saved = load_file(str(tmp_path / "models/lora" / common.LORA_FILE))
    assert held[0].keys() == held[1].keys()
    for key in held[0]:
        assert (held[0][key] == held[1][key]).all(), key  # DDP kept the ranks in step
    # The published file holds exactly what rank 0 holds, in peft's key spelling (the family's
    # save_lora converts; diffusers' writer adds the "unet." prefix).
    published = convert_unet_state_dict_to_peft(held[0])
    assert {k.removeprefix("unet."): v for k, v in saved.items()}.keys() == published.keys()
    for key, value in saved.items():
        assert (value == published[key.removeprefix("unet.")]).all(), key


@pytest.mark.slow
def test_two_ranks_resume_to_the_lora_of_an_uninterrupted_run(tmp_path):
    """With LoRA dropout each rank draws its masks from its own RNG, and with aspect-ratio buckets
    the ranks' batches differ in size, so their RNGs part: a resumed rank 1 must get its own RNG
    state back, not rank 0's."""
    from PIL import Image

    from sdtune.data import cache
    from sdtune.families import sd

    params = PARAMS.replace("checkpoint_every: 100", "checkpoint_every: 2").replace(
        "alpha: 4.0}", "alpha: 4.0, dropout: 0.2}") + "cache: {buckets: true, bucket_step: 16}\n"
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for ws in (straight, stopped):
        (ws / "data/raw").mkdir(parents=True)
        (ws / "params.yaml").write_text(params)
        for i in range(4):  # a wide bucket of four and a square one of three (a batch of 1)
            Image.new("RGB", (96, 48), (40 * i, 20, 20)).save(ws / f"data/raw/wide_{i}.png")
            if i < 3:
                Image.new("RGB", (64, 64), (20, 40 * i, 20)).save(ws / f"data/raw/square_{i}.png")
        p = params_lib.load(ws / "params.yaml")
        cache.build(captions_for(ws / "data/raw"), ws / "data/raw", ws / "cache", sd, p.model, p.cache)
    done = torchrun(straight, straight / "dump")
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads((straight / "dump/rank0.json").read_text())["seen"], \
        json.loads((straight / "dump/rank1.json").read_text())["seen"]
    assert torchrun(stopped, stopped / "dump", STOP_AT="3").returncode != 0  # after step 2's checkpoint
    assert os.listdir(stopped / "checkpoints") == ["step-0000002"] and not (stopped / "dump/rank0.json").exists()
    # One process (a VM back with a GPU fewer) is refused; it removed the checkpoint as another run's.
    alone = subprocess.run([sys.executable, "-m", "stages.train"], cwd=stopped, capture_output=True, text=True,
                           timeout=600, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})
    assert alone.returncode == 2 and alone.stderr.startswith(
        "error: checkpoints/step-0000002: made by this run with 2 process(es), resumed with 1;"), alone.stderr
    assert len(alone.stderr.splitlines()) == 1
    assert os.listdir(stopped / "checkpoints") == ["step-0000002"]
    done = torchrun(stopped, stopped / "dump")
    assert done.returncode == 0, done.stderr[-4000:]
    for r in (0, 1):
        want, got = (load_file(str(ws / f"dump/rank{r}.safetensors")) for ws in (straight, stopped))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f"rank {r}, {seen}"


@pytest.mark.slow
def test_docker_run_trains_with_two_processes(tmp_path):
    """The scale-out path the README documents: SDTUNE_PROCESSES=2 docker/run train."""
    (tmp_path / "params.yaml").write_text(PARAMS.replace("steps: 4", "steps: 2"))
    tiny_cache(tmp_path / "data/raw", tmp_path / "cache", 4, 40, params_lib.load(tmp_path / "params.yaml"))
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    done = subprocess.run([str(ROOT / "docker/run"), "train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                            "SDTUNE_PROCESSES": "2", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "reports/train.json").read_text())
    assert report["processes"] == 2
    assert (tmp_path / "models/lora" / common.LORA_FILE).is_file()
