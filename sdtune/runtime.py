"""What every stage shares: its device, its wall time, and provenance strings."""

import contextlib
import netrc
import os
import subprocess
import time
import urllib.parse
from pathlib import Path

import torch

from sdtune import __version__, io
from sdtune.errors import UserError
from sdtune.params import ALONG_THE_WAY

REPORTS = Path("reports")
# The pipeline's stages in dvc.yaml's order (a test holds the two together).
STAGES = ("fetch", "caption", "cache", "train", "quantize", "evaluate", "profile", "report")


def check_wandb(mode: str) -> None:
    """train.wandb: online needs a W&B API key, from WANDB_API_KEY or the ~/.netrc entry `wandb login`
    writes. Without one wandb.init failed with a traceback, and in the train stage only after the
    model had loaded."""
    if mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    raise UserError("train.wandb: online needs a W&B API key: set WANDB_API_KEY or run `wandb login`, or use "
                    "offline (and `wandb sync` the run later)")


def redacted(source: str) -> str:
    """A URL as it may be kept and shown (the manifest, REPORT.md, W&B): its user part and its
    query's values (a signed URL's signature, a token) masked; any other source as it is.
    params.yaml still holds it whole: git keeps what is put there."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() not in ("http", "https"):
        return source
    netloc = "***@" + parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{urllib.parse.quote(k, safe='')}=***"
                     for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def wandb_config(params) -> dict:
    """The params as W&B's run config: all of them, data.source redacted (W&B is a third party)."""
    config = params.model_dump(mode="json")
    config["data"]["source"] = redacted(config["data"]["source"])
    return config


def device(choice: str, key: str = "base.device") -> torch.device:
    """base.device ("auto", "cpu" or "cuda", validated with the params) as a torch device.
    `key`: what the user set it with, for the error (the CLI's --device)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a host sync. A copy to CUDA from ordinary (pageable)
    memory blocks the host until the GPU has run everything queued before it, so the host could
    not prepare step n+1 while the GPU runs step n; from pinned memory a non-blocking copy just
    joins the queue (torch's pinned-memory cache keeps the buffer alive until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def stage(name: str):
    """Time a stage and record it in reports/stages/<name>.json (the profile report reads these).
    Under torchrun only rank 0 writes it: another rank leaves before the LoRA is written, and its
    shorter time, written last, would have been the stage's."""
    t0 = time.perf_counter()
    yield
    if os.environ.get("RANK", "0") == "0":
        io.write_json(REPORTS / "stages" / f"{name}.json", {"stage": name, "seconds": time.perf_counter() - t0})


def git_commit() -> str:
    """The last commit that changed the code under sdtune/ or stages/, with "+modified" when the
    code differs from HEAD's: `dvc exp run` trains on uncommitted code (its params.yaml edits are
    in the params hash instead). Not HEAD: committing dvc.lock after a run moves it, and a rerun
    would write a LoRA that differs by this field alone, re-running every stage after train."""
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%H", "--", "sdtune", "stages"], capture_output=True,
                              text=True, timeout=10)
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "sdtune", "stages"], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    return head.stdout.strip() + ("+modified" if diff.returncode == 1 else "")


# The params a LoRA's params_sha256 hashes: those dvc.yaml lists for the train stage (a test holds
# the two together). What the stages before it made of theirs is in the LoRA's other hashes (the
# dataset, the cache index), by content: a change to their params that leaves their
# outputs as they were (DVC then skips train) leaves the LoRA's lineage true. Not base.device:
# where it ran is in train.json, not part of what was asked.
LORA_PARAMS = ("train", "model", "base.seed")


def params_hash(params, keys, leave_out=()) -> str:
    """The sha256 of the values of `keys` (dotted: a section or one key in it), without the dotted
    keys in `leave_out`."""
    dumped = params.model_dump()
    for key in leave_out:
        section, _, name = key.rpartition(".")
        dumped[section].pop(name)
    picked = {}
    for key in keys:
        value = dumped
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return io.sha256_json(picked)


def provenance(params, base_commit: str = "unknown", raw_dir="data/raw", cache_index="cache/index.json") -> dict:
    """The lineage a LoRA carries: base model, data, params, code. `base_commit` is what the train
    stage resolved the revision to (common.resolved_revision: a branch like "main" moves)."""
    raw, index = Path(raw_dir), Path(cache_index)
    return {
        "sdtune_version": __version__,
        "base_model": params.model.id,
        "base_revision": params.model.revision,
        "base_commit": base_commit,
        "cache_index_sha256": io.sha256_file(index) if index.exists() else "unknown",
        "model_family": params.model.family,
        # What the denoiser learned to predict, where params overrode the checkpoint's: sampled
        # otherwise, such a LoRA gives noise (generate warns).
        "prediction_type": params.model.prediction_type,
        # data/raw's files by content, read from the folder train depends on (as a folder source's
        # data.sha256 pin, `sha256sum` in the shell); not the manifest's bytes, which also name
        # data.source: the same images fetched from elsewhere are the same data.
        "dataset_sha256": io.tree_sha256(io.manifest(raw)) if raw.is_dir() else "unknown",
        # Not the keys of the loop around the step: a rerun for log_every resumes to the same
        # tensors, and the same file leaves the stages after train as they were.
        "params_sha256": params_hash(params, LORA_PARAMS, [f"train.{k}" for k in ALONG_THE_WAY]),
        "git_commit": git_commit(),
    }
