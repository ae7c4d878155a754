"""Checkpoints that make a resumed run identical to an uninterrupted one.

A checkpoint is a folder `step-NNNNNNN/` holding the LoRA tensors (safetensors), the
optimizer, LR-scheduler, EMA and fp16 loss-scaler state (torch.save, read back with weights_only=True: our
own files, and still never a full unpickle), the RNG states and the loss history (JSON).
It is written under a temporary name and renamed in, so a kill mid-write leaves the
previous checkpoint as the latest.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdtune import io

PREFIX = "step-"


def _rng_state() -> tuple[dict, dict]:
    """(Python's and numpy's states as JSON, torch's generators as tensors)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return state, tensors


def _set_rng_state(state: dict, tensors: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_by_rank(accelerator) -> list[dict]:
    """Each process's torch RNG states (CPU and CUDA), by rank; a collective with several processes.
    They differ: each process draws LoRA dropout's masks for its own batches, and with aspect-ratio
    buckets their sizes differ from one process to the next."""
    _, tensors = _rng_state()
    if accelerator.num_processes == 1:
        return [tensors]
    from accelerate.utils import gather_object

    return gather_object([tensors])  # in memory, between this run's processes


def save(ckpt_dir, step: int, lora: dict, optimizer, lr_scheduler, ema, scaler, history: list, keep: int,
         fingerprint: str = "", rng_by_rank: list[dict] | None = None, device: str = "") -> Path:
    """`scaler`: fp16's GradScaler, else None. accelerate keeps it outside the optimizer's state,
    and a resumed run that started again at scale 65536 would skip other steps. `rng_by_rank`:
    rng_by_rank()'s, for a run of several processes; by default this process's alone. `device`:
    what it ran on, in words (hardware.device_name)."""
    ckpt_dir = Path(ckpt_dir)
    dest = ckpt_dir / f"{PREFIX}{step:07d}"
    state, own = _rng_state()
    rng = {f"rank{r}.{k}": v for r, tensors in enumerate(rng_by_rank or [own]) for k, v in tensors.items()}
    with io.atomic_path(dest) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                    "processes": len(rng_by_rank or [own]), "device": device,
                                                    "rng": state, "history": history}))
    for old in all_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old)
    return dest


def all_checkpoints(ckpt_dir) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def meta_of(path) -> dict:
    """The checkpoint's state.json; {} for one that cannot be read: it cannot be resumed either."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def fingerprint_of(path) -> str:
    return meta_of(path).get("fingerprint", "")


def discard(ckpt_dir, step: int) -> None:
    """Remove the checkpoint of `step`: the train stage's last one, once the LoRA is written. Kept,
    it would make a rerun DVC starts for a change the fingerprint leaves out (log_every, the stage
    script) resume at the end and train nothing."""
    shutil.rmtree(Path(ckpt_dir) / f"{PREFIX}{step:07d}", ignore_errors=True)


def remove_stale(ckpt_dir, fingerprint: str) -> None:
    """Remove what cannot be resumed: the checkpoints of a run with other params, data or code
    (another fingerprint), and the hidden temporaries a kill mid-write left. Call it from one
    process only: two removing the same folders race."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for tmp in ckpt_dir.glob(f".{PREFIX}*"):  # io.atomic_path's folders .step-N.*.tmp and .step-N.old
        shutil.rmtree(tmp)
    stale = [p for p in all_checkpoints(ckpt_dir) if fingerprint_of(p) != fingerprint]
    damaged = [p.name for p in stale if not meta_of(p)]
    for p in stale:
        shutil.rmtree(p)
    if damaged:
        print(f"train: removed {', '.join(damaged)} in {ckpt_dir}: its state.json could not be read")
    if len(stale) > len(damaged):
        print(f"train: removed {len(stale) - len(damaged)} checkpoint(s) in {ckpt_dir} made with other params, "
              f"data or code")


def read(path) -> dict:
    """Everything a checkpoint holds, read in full before anything is restored, so a damaged file
    raises here and leaves the run as it was."""
    path = Path(path)
    return {"meta": json.loads((path / "state.json").read_text()),
            "lora": load_file(str(path / "lora.safetensors")), "rng": load_file(str(path / "rng.safetensors")),
            # Onto the host: tensors saved from rank 0's card would otherwise come back on it, for every rank.
            "state": torch.load(path / "state.pt", map_location="cpu", weights_only=True)}


def latest(ckpt_dir, fingerprint: str = "") -> tuple[Path, dict] | None:
    """The newest checkpoint of this very run that reads whole, and what it holds. A damaged one
    (a truncated file) is passed over, with a warning, for the one before it."""
    for path in reversed([p for p in all_checkpoints(ckpt_dir) if fingerprint_of(p) == fingerprint]):
        try:
            return path, read(path)
        except Exception as err:  # safetensors, torch's zip reader and json each raise their own kind
            reason = str(err).partition("\n")[0]
            print(f"train: warning: {path} is damaged ({type(err).__name__}: {reason}); trying the checkpoint before it")
    return None


def restore(saved: dict, set_lora, optimizer, lr_scheduler, ema, scaler, rank: int = 0) -> tuple[int, list]:
    """Restore what `read` returned, in place, with process `rank`'s RNG; returns (step, loss history)."""
    set_lora(saved["lora"])
    state = saved["state"]
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
        # The optimizer moves its state to its weights' device itself; the EMA keeps whatever it is given.
        ema.to(device=optimizer.param_groups[0]["params"][0].device)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    meta = saved["meta"]
    prefix = f"rank{rank}."
    _set_rng_state(meta["rng"], {k.removeprefix(prefix): v for k, v in saved["rng"].items() if k.startswith(prefix)})
    return meta["step"], meta["history"]
