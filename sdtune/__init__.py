"""sdtune: LoRA fine-tuning of Stable Diffusion as a reproducible, profiled DVC pipeline."""

import logging
import sys
import warnings
from pathlib import Path

__version__ = "0.1.0"


def _refuse_a_stage_run_as_a_file() -> None:
    """`python stages/train.py` puts stages/ first on sys.path, where stages/profile.py hides the
    standard library's profile module that transformers imports: a 30-line traceback about
    partially initialised modules. The stages are modules, run as `python -m stages.<name>`."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script and getattr(main, "__spec__", None) is None and Path(script).resolve().parent.name == "stages":
        print(f"error: run a stage as a module, from the repository root: python -m stages.{Path(script).stem} "
              f"(or docker/run {Path(script).stem})", file=sys.stderr)
        raise SystemExit(2)


_refuse_a_stage_run_as_a_file()

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

# diffusers still passes huggingface_hub a deprecated download argument, and a model id that is
# not found locally printed hub's two-line warning about it above sdtune's one-line error.
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)
