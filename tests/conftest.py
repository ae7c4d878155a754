"""Shared test setup: offline, quiet, a fresh accelerate state per test, a tiny SD1 cache,
and a helper to copy the repo into a temporary git repo."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest_plugins = ["fixtures_data"]  # gcs_emulator, http_server, drive_stand_in

ROOT = Path(__file__).resolve().parent.parent

# Nothing in a test may reach the network beyond 127.0.0.1.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "DVC_NO_ANALYTICS": "1", "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "GIT_AUTHOR_NAME": "sdtune tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
           "GIT_COMMITTER_NAME": "sdtune tests", "GIT_COMMITTER_EMAIL": "tests@localhost"}
os.environ.update(OFFLINE)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process: without a reset, a test's loop.setup would get the
    state (device, mixed precision) an earlier test left behind, and pass or fail by test order.
    A test that sets up two runs still resets between them itself."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def keep_threads():
    """Puts torch's thread count back at the end of a module whose tests or fixtures change it
    (module-scoped: test_bench's module fixture runs its benchmarks with one thread)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def captions_for(raw: Path) -> list[dict]:
    """captions.jsonl rows for the *.png in raw, in name order: "a picture 0", "a picture 1", ..."""
    from sdtune import io

    return [{"file": p.name, "sha256": io.sha256_file(p), "caption": f"a picture {i}"}
            for i, p in enumerate(sorted(raw.glob("*.png")))]



@contextlib.contextmanager
def kept_for_backward():
    """storage address -> (bytes, dtype) of each tensor autograd keeps for the backward in the block
    (all alive together until a step's backward, so no address repeats within a step)."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = (tensor.untyped_storage().nbytes(), tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield kept


class StubDenoiser(torch.nn.Module):
    """A denoiser that hands what it is given to `fn`, with one frozen parameter of `dtype`: the
    families read the frozen denoiser's dtype from its parameters (common.model_dtype)."""

    def __init__(self, fn, dtype: torch.dtype):
        super().__init__()
        self.fn = fn
        self.weight = torch.nn.Parameter(torch.zeros((), dtype=dtype), requires_grad=False)

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def tiny_loop_run(arch: str, dtype: torch.dtype, lora: dict | None = None, **train):
    """A CPU training Run (sdtune.train.loop.prepare) over bench's tiny random denoiser of `arch`
    in `dtype`, the same one each call (seeded): rank-4 LoRA with these lora keys, batch 2, these
    train keys."""
    from accelerate.state import AcceleratorState

    from bench import archs
    from sdtune import params
    from sdtune.train import loop

    spec = archs.get(arch)
    AcceleratorState._reset_state(reset_partial_state=True)
    raw = {"base": {"seed": 3, "device": "cpu"},
           "model": {"family": spec.family, "id": "tiny", "resolution": archs.TINY_RES},
           "train": {"steps": 2, "batch_size": 2, "wandb": "disabled",
                     "lora": {"rank": 4, "alpha": 4.0, **(lora or {})}, **train}}
    torch.manual_seed(0)
    denoiser = archs.build(spec, True, torch.device("cpu"), dtype)
    return loop.prepare(params.parse(raw), archs.cache_items(spec, 2, archs.TINY_RES, tiny=True), denoiser=denoiser)

def assert_unet_unchanged(model, before, arch: str, rtol: float, atol: float) -> None:
    """model, a tiny UNet of `arch` changed in place, and before, a copy taken before the change,
    give the same sample in NCHW and in channels-last memory."""
    from bench import archs

    latents, cond = archs.inputs(archs.get(arch), 2, archs.TINY_RES, "cpu", torch.float32, tiny=True)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            model.to(memory_format=fmt)
            before.to(memory_format=fmt)
            x = latents.contiguous(memory_format=fmt)
            torch.testing.assert_close(model(x, t, **cond).sample, before(x, t, **cond).sample, rtol=rtol, atol=atol)


def tiny_cache(raw: Path, cache_dir: Path, n: int, size: int, params) -> Path:
    """n synthetic size x size images in raw, captioned by captions_for and cached for the tiny SD1
    model under params.model and params.cache. Returns cache_dir."""
    from sdtune.data import cache, synthetic
    from sdtune.families import sd

    synthetic.generate(raw, n, size=size)
    cache.build(captions_for(raw), raw, cache_dir, sd, params.model, params.cache)
    return cache_dir


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value back to Python (.item(), bool(t), nonzero):
    on a GPU each one makes the host wait for the device. CPU tests run the same code, so a read
    added to the training step fails here before it slows a GPU run."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def hub_snapshot(hub, repo: str, ref: str, commit: str) -> None:
    """A Hub cache entry as huggingface_hub lays it out: refs/<ref> names the snapshot's commit."""
    entry = hub / f"models--{repo.replace('/', '--')}"
    (entry / "snapshots" / commit).mkdir(parents=True)
    (entry / "snapshots" / commit / "model_index.json").write_text("{}")
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / ref).write_text(commit)


def repo_files() -> list[str]:
    """The files of the working tree that git would commit (tracked, or untracked and not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_repo(dest: Path, skip=("tests/",)) -> Path:
    """A fresh git repo holding this working tree, committed (dvc exp and dvclive need a commit)."""
    for rel in repo_files():
        if rel.startswith(skip):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy of sdtune for a test"], dest)
    return dest


def run(cmd, cwd, timeout=900, check=True, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **OFFLINE, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


# Not a key: a marker the W&B tests plant as WANDB_API_KEY and then look for in what was written.
FAKE_WANDB_KEY = "fake-wandb-key-for-tests-only"


def wandb_stage(name: str, cwd) -> subprocess.CompletedProcess:
    """`python -m stages.<name>` in `cwd` with W&B as its params say (not disabled as in the other
    tests) and a fake WANDB_API_KEY that assert_no_secret looks for."""
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "WANDB_API_KEY": FAKE_WANDB_KEY}
    env.pop("WANDB_MODE")
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_no_secret(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert FAKE_WANDB_KEY.encode() not in path.read_bytes(), path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The offline demo, run once for the session by `make demo` in a fresh copy of the repo."""
    repo = copy_repo(tmp_path_factory.mktemp("demo"))
    out = run(["make", "demo"], repo, timeout=1200)
    (repo / "demo.log").write_text(out.stdout + out.stderr)
    return repo


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory):
    """A non-zero LoRA for the tiny SD1 model, written the way the train stage writes it."""
    from sdtune import params as params_lib
    from sdtune.families import sd
    from sdtune.train import lora

    unet = sd.tiny_unet()
    # alpha ≠ rank: a loader that misses the file's adapter metadata fuses it at the wrong strength
    cfg = params_lib.parse({"train": {"lora": {"rank": 4, "alpha": 8.0}}}).train.lora
    lora.add(unet, cfg, sd.LORA_TARGETS)
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.15
    out = tmp_path_factory.mktemp("lora")
    sd.save_lora(out, lora.diffusers_state(unet), {"base_model": "tiny"},
                 adapter_metadata=lora.adapter_metadata(cfg, sd.LORA_TARGETS))
    return out
