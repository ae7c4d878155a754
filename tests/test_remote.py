"""The GCS DVC remote: push the demo's LoRA to gcp-storage-emulator, pull it into a fresh clone, use it."""

import os

import pytest
from PIL import Image

from conftest import run
from sdtune.families import common

pytestmark = pytest.mark.slow


def test_dvc_push_then_pull_in_a_fresh_clone_then_generate(demo, gcs_emulator, tmp_path):
    gcs_emulator.create_bucket("sdtune-dvc")
    endpoint = os.environ["STORAGE_EMULATOR_HOST"]
    # What the README tells a user to run with the Terraform output, plus the emulator's address.
    run(["dvc", "remote", "add", "-d", "-f", "gcs", "gs://sdtune-dvc/store"], demo)
    run(["dvc", "remote", "modify", "gcs", "endpointurl", endpoint], demo)
    run(["dvc", "remote", "modify", "gcs", "allow_anonymous_login", "true"], demo)
    run(["git", "add", "-A"], demo)
    run(["git", "commit", "-qm", "the demo's results and the remote"], demo)
    pushed = run(["dvc", "push", "train"], demo, timeout=300)
    assert "pushed" in pushed.stdout.lower()
    assert list(gcs_emulator.list_blobs("sdtune-dvc", prefix="store/"))

    clone = tmp_path / "elsewhere"
    run(["git", "clone", "-q", str(demo), str(clone)], tmp_path)
    assert not (clone / "models/lora").exists()
    run(["dvc", "pull", "train"], clone, timeout=300)
    lora = clone / "models/lora" / common.LORA_FILE
    assert lora.read_bytes() == (demo / "models/lora" / common.LORA_FILE).read_bytes()

    out = clone / "out.png"
    run(["sdtune", "generate", "--prompt", "a red circle", "--lora", "models/lora", "--steps", "2",
         "--seed", "7", "--out", str(out)], clone, timeout=300)
    assert Image.open(out).size == (64, 64)
