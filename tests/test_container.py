"""The real image: build docker/Dockerfile with podman and run pipeline stages in it through docker/run.

The CUDA base and CUDA torch are swapped for a Debian base made with debootstrap and the CPU torch wheel
(build args); everything else is the real Dockerfile, the real lock and the real wrapper. Setup, base
image and build go through .ci/container.sh, which installs podman & co. when they are missing (root
only) and reports when containers cannot run here, which skips these tests with that reason.
First run on a clean machine: several minutes (the lock's wheels come from PyPI); reruns hit the cache.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / ".ci" / "container.sh"
RUN = ROOT / "docker" / "run"
TAG = "localhost/sdtune-ci:test"
CANNOT_RUN = 3  # .ci/container.sh's exit status for "containers cannot run on this machine"

# A stage of our own: reports what the wrapper set up inside the container.
PROBE = '''\
import json, os, sys
from pathlib import Path
import sdtune
names = ("HF_TOKEN", "WANDB_MODE", "HF_HUB_OFFLINE", "HF_HOME", "PYTHONUNBUFFERED",
         "GOOGLE_APPLICATION_CREDENTIALS", "NOT_PASSED")
creds = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
Path("probe.json").write_text(json.dumps({
    "argv": sys.argv[1:], "cwd": os.getcwd(), "uid": os.getuid(), "gid": os.getgid(),
    "env": {n: os.environ.get(n) for n in names},
    "sdtune": sdtune.__file__,
    "creds": Path(creds).read_text() if creds else None,
    "creds_writable": os.access(creds, os.W_OK) if creds else None,
}))
'''


def _helper(*args, timeout):
    return subprocess.run(["bash", str(HELPER), *args], capture_output=True, text=True, timeout=timeout)


def _container_env():
    out = _helper("env", timeout=60)
    assert out.returncode == 0, out.stderr
    env = dict(os.environ)
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return env


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    t0 = time.monotonic()
    setup = _helper("setup", timeout=900)
    if setup.returncode == CANNOT_RUN:
        reason = (setup.stdout.strip().splitlines() or ["no reason given"])[-1]
        print(f"SKIP container tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    assert setup.returncode == 0, f"{setup.stdout}\n{setup.stderr}"
    t_setup = time.monotonic() - t0

    # The build context: what .dockerignore would let through, plus the CPU torch wheel in docker/.
    ctx = tmp_path_factory.mktemp("context")
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, ctx / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.whl")
    shutil.copytree(ROOT / "sdtune", ctx / "sdtune", ignore=ignore)
    shutil.copytree(ROOT / "docker", ctx / "docker", ignore=ignore)

    t1 = time.monotonic()
    build = _helper("build", str(ctx), TAG, timeout=1500)
    t_build = time.monotonic() - t1
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}"
    print(f"container: setup {t_setup:.0f} s, build {t_build:.0f} s", file=sys.stderr)
    return TAG


def _podman(*args, env):
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_image_metadata(image):
    env = _container_env()
    info = json.loads(_podman("image", "inspect", image, env=env))[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    env_vars = dict(e.split("=", 1) for e in config["Env"])
    assert env_vars["PYTHONUNBUFFERED"] == "1"
    assert env_vars["HF_HOME"].startswith("/var/cache/sdtune")
    assert "/var/cache/sdtune" in config.get("Volumes", {})
    # Run as built (no --user): the numeric non-root user, with the locked CPU torch.
    out = _podman("run", "--rm", "--network", "none", image, "python", "-c",
                  "import os, torch, diffusers, dvc, sdtune; print(os.getuid(), torch.__version__)", env=env)
    uid, torch_version = out.split()
    assert uid == "10001"
    assert torch_version.endswith("+cpu")
    # torch.compile works in the image: inductor builds C++ against Python.h (Triton, on CUDA, C).
    out = _podman("run", "--rm", "--network", "none", image, "python", "-c",
                  "import torch; f = torch.compile(lambda x: (x.sin() + 1).sum()); print(float(f(torch.zeros(4))))",
                  env=env)
    assert out.split()[-1] == "4.0"


def _workspace(tmp_path, source):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(ROOT / "sdtune", ws / "sdtune", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (ws / "stages").mkdir()
    if (ROOT / "stages").is_dir():
        for script in (ROOT / "stages").glob("*.py"):
            shutil.copy2(script, ws / "stages" / script.name)
    (ws / "stages" / "probe.py").write_text(PROBE)
    (ws / "params.yaml").write_text(f"data:\n  source: {source}\n")
    return ws


def _run(ws, stage, *args, env):
    return subprocess.run([str(RUN), stage, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=600)


def test_wrapper_plumbing(image, tmp_path):
    ws = _workspace(tmp_path, "synthetic://6")
    creds = tmp_path / "creds.json"
    creds.write_text('{"type": "test"}')
    env = _container_env() | {
        "SDTUNE_RUNNER": "podman", "SDTUNE_IMAGE": image, "SDTUNE_CACHE_VOLUME": str(tmp_path / "hf"),
        "HF_TOKEN": "hf_dummy", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
        "GOOGLE_APPLICATION_CREDENTIALS": str(creds), "NOT_PASSED": "x",
    }
    (tmp_path / "hf").mkdir()
    out = _run(ws, "probe", "--flag", "two words", env=env)
    assert out.returncode == 0, out.stderr
    probe = json.loads((ws / "probe.json").read_text())
    assert probe["argv"] == ["--flag", "two words"]
    assert probe["cwd"] == str(ws)
    assert (probe["uid"], probe["gid"]) == (os.getuid(), os.getgid())
    assert probe["env"]["HF_TOKEN"] == "hf_dummy"
    assert probe["env"]["WANDB_MODE"] == "disabled"
    assert probe["env"]["HF_HUB_OFFLINE"] == "1"
    assert probe["env"]["NOT_PASSED"] is None
    assert probe["env"]["HF_HOME"] == "/var/cache/sdtune/huggingface"
    assert probe["env"]["PYTHONUNBUFFERED"] == "1"
    assert probe["sdtune"] == str(ws / "sdtune" / "__init__.py"), "the workspace's sdtune must win"
    assert probe["creds"] == '{"type": "test"}'
    assert probe["creds_writable"] is False

    bad = _run(ws, "nope", env=env)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "unknown stage 'nope'" in bad.stderr


@pytest.mark.skipif(not (ROOT / "stages" / "fetch.py").exists(), reason="stages/fetch.py is not written yet")
def test_fetch_stage_in_container_matches_local(image, tmp_path):
    ws = _workspace(tmp_path, "synthetic://6")
    (tmp_path / "hf").mkdir()
    env = _container_env() | {"SDTUNE_RUNNER": "podman", "SDTUNE_IMAGE": image,
                              "SDTUNE_CACHE_VOLUME": str(tmp_path / "hf"),
                              "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.monotonic()
    out = _run(ws, "fetch", env=env)
    print(f"container: fetch in podman {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((ws / "data" / "raw.manifest.json").read_text())
    assert manifest["source"] == "synthetic://6"
    files = {row["file"] for row in manifest["files"]}
    assert files and files == {p.name for p in (ws / "data" / "raw").iterdir()}
    assert sum(f.endswith(".png") for f in files) == 6

    # Same command without a container: the same outputs, byte for byte.
    in_container = (ws / "data" / "raw.manifest.json").read_bytes()
    shutil.rmtree(ws / "data")
    local = _run(ws, "fetch", env={k: v for k, v in env.items() if k != "SDTUNE_RUNNER"} | {"PYTHON": sys.executable})
    assert local.returncode == 0, local.stderr
    assert (ws / "data" / "raw.manifest.json").read_bytes() == in_container


def test_a_stage_already_running_in_the_workspace_is_not_started_twice(image, tmp_path):
    """A killed client can leave its container running; a second run of that stage must not start
    another one beside it (on a GPU VM: two trainers on one GPU and one checkpoints/)."""
    ws = _workspace(tmp_path, "synthetic://6")
    (ws / "stages" / "sleeper.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "hf").mkdir()
    env = _container_env() | {"SDTUNE_RUNNER": "podman", "SDTUNE_IMAGE": image,
                              "SDTUNE_CACHE_VOLUME": str(tmp_path / "hf")}

    def running():
        return [n for n in _podman("ps", "--format", "{{.Names}}", env=env).split() if n.endswith("-sleeper")]

    first = subprocess.Popen([str(RUN), "sleeper"], cwd=ws, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running(), "the first run's container never started"
        second = _run(ws, "sleeper", env=env)
        assert second.returncode != 0 and "already in use" in second.stderr, second.stderr
        assert len(running()) == 1
    finally:
        first.kill()
        for name in running():
            subprocess.run(["podman", "rm", "--force", name], env=env, capture_output=True, timeout=60)
