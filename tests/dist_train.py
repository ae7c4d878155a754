"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: train, then dump what each rank holds."""

import json
import os
import sys

from safetensors.torch import save_file

from sdtune import params as params_lib, runtime
from sdtune.train import loop, lora, outputs

out = sys.argv[1]
rank = int(os.environ["RANK"])
params = params_lib.load("params.yaml")
run = loop.setup(params, "cache")

seen = []
original = loop.sample_indices


def recording(run_, step, micro):
    idx = original(run_, step, micro)
    seen.append([step, micro, idx])
    return idx


loop.sample_indices = recording
own_losses, real_step = [], loop.train_step


def own_loss(run_, step, *args, **kwargs):
    if step == int(os.environ.get("STOP_AT", -1)):  # every rank at once, as a kill of the job would
        raise SystemExit(f"rank {rank}: stopped before step {step}")
    loss = real_step(run_, step, *args, **kwargs)
    own_losses.append(loss.item())  # this process's batches alone
    return loss


loop.train_step = own_loss
loop.train(run, "checkpoints", "cache")
state = lora.diffusers_state(run.accelerator.unwrap_model(run.denoiser))
save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"seen": seen, "world": run.accelerator.num_processes, "own_losses": own_losses,
               "history": run.history}, f)
if run.accelerator.is_main_process:
    outputs.write_lora("models/lora", run, loop.final_lora(run), runtime.provenance(params))
