"""Shared test setup: offline, quiet, and a helper to copy the repo into a temporary git repo."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["fixtures_data"]  # gcs_emulator, http_server, drive_stand_in

ROOT = Path(__file__).resolve().parent.parent

# Nothing in a test may reach the network beyond 127.0.0.1.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "DVC_NO_ANALYTICS": "1", "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "GIT_AUTHOR_NAME": "sdtune tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
           "GIT_COMMITTER_NAME": "sdtune tests", "GIT_COMMITTER_EMAIL": "tests@localhost"}
os.environ.update(OFFLINE)


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


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The offline demo, run once for the session by `make demo` in a fresh copy of the repo."""
    repo = copy_repo(tmp_path_factory.mktemp("demo"))
    out = run(["make", "demo"], repo, timeout=1200)
    (repo / "demo.log").write_text(out.stdout + out.stderr)
    return repo
