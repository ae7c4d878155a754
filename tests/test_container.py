"""The real image: docker/Dockerfile built with podman, pipeline stages run in it through docker/run.

The CUDA base and CUDA torch are swapped for a Debian base made with debootstrap and the CPU torch wheel
(build args); everything else is the real Dockerfile, the real lock and the real wrapper.
Nothing here reaches the network. The image is built beforehand, by `bash .ci/container.sh test-image`
(podman & co., the base image and the build need apt, a Debian mirror and PyPI; .ci/run does it before
`make test`), and labelled with the hash of what it was built from. These tests use it only if it exists
and that label matches this checkout (`.ci/container.sh inputs-hash`); otherwise they skip, naming the
command, or fail when SDTUNE_CONTAINER_REQUIRED=1 (set by .ci/run once the build succeeded). Their
containers, docker/run's included, get no network but loopback (`.ci/container.sh test-env`).
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
TAG = os.environ.get("SDTUNE_CI_TEST_TAG", "localhost/sdtune-ci:test")  # .ci/container.sh's TEST_TAG
LABEL = "org.sdtune.ci.inputs"  # .ci/container.sh's INPUTS_LABEL
BUILD = "bash .ci/container.sh test-image"

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
    "net": sorted(os.listdir("/sys/class/net")),
}))
'''


def _helper(*args, timeout):
    return subprocess.run(["bash", str(HELPER), *args], capture_output=True, text=True, timeout=timeout)


def _container_env():
    # test-env: CONTAINERS_CONF with netns = "none", so every container started here, by docker/run
    # too, has loopback and nothing else.
    out = _helper("test-env", timeout=60)
    assert out.returncode == 0, out.stderr
    env = dict(os.environ)
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return env


def _unusable(reason):
    if os.environ.get("SDTUNE_CONTAINER_REQUIRED") == "1":
        pytest.fail(f"{reason} (SDTUNE_CONTAINER_REQUIRED=1)")
    print(f"SKIP container tests: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image():
    """The image .ci/container.sh test-image built from this checkout; never builds it (that needs the network)."""
    if shutil.which("podman") is None:
        _unusable(f"podman is not installed; `{BUILD}` installs it and builds the image (needs the network)")
    env = _container_env()
    out = subprocess.run(["podman", "image", "inspect", "--format", f'{{{{index .Labels "{LABEL}"}}}}', TAG],
                         capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        _unusable(f"no image {TAG} here; build it first with `{BUILD}` (needs the network)")
    built_from = out.stdout.strip().removeprefix("<no value>")
    now = _helper("inputs-hash", timeout=120)
    assert now.returncode == 0, now.stderr
    now = now.stdout.strip()
    if built_from != now:
        _unusable(f"image {TAG} is stale: built from inputs {built_from[:12] or '(no label)'}, this checkout's "
                  f"are {now[:12]} (pyproject.toml, README.md, sdtune/, docker/ or the base changed); "
                  f"rebuild it with `{BUILD}` (needs the network)")
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
    assert probe["net"] == ["lo"], "the tests' containers must have no network but loopback"

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
