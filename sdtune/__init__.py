"""sdtune: LoRA fine-tuning of Stable Diffusion as a reproducible, profiled DVC pipeline."""

import logging

__version__ = "0.1.0"

# Import-time notices from optional kernels that sdtune never uses (bitsandbytes' hub kernels,
# torchao's CUDA extensions on a CPU machine, torchao's pickle-era tensor classes: sdtune only
# reads safetensors). They would greet every stage with a wall of false alarms.
for _name in ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _DropMessage(logging.Filter):
    """Drops a logger's records whose message contains `text`, keeping its other warnings."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# transformers 5 falls back to the PIL image processors when torchvision is missing, which sdtune
# does not install (it only resizes with PIL), and says so at every import of a diffusers pipeline.
logging.getLogger("transformers.utils.import_utils").addFilter(_DropMessage("requires torchvision (not installed)"))
