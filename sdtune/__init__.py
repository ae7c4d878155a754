"""sdtune: LoRA fine-tuning of Stable Diffusion as a reproducible, profiled DVC pipeline."""

import logging

__version__ = "0.1.0"

# Import-time notices from optional kernels that sdtune never uses (bitsandbytes' hub kernels,
# torchao's CUDA extensions on a CPU machine, torchao's pickle-era tensor classes: sdtune only
# reads safetensors). They would greet every stage with a wall of false alarms.
for _name in ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
