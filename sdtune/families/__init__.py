"""Model families: everything that differs between SD 1.x/2.x, SDXL and SD3.x lives here.

Each family is one module with the same functions (see `base.py`); the rest of sdtune
asks `get(name)` for the module and never checks which family it holds.
"""

import importlib

from sdtune.errors import UserError

MODULES = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3"}


def get(name: str):
    if name not in MODULES:
        raise UserError(f"model.family: unknown family {name!r}; allowed: {', '.join(MODULES)}")
    return importlib.import_module(f"sdtune.families.{MODULES[name]}")
