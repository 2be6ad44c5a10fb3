"""The embedded default model, an application built on the library: its loader (`load_default`), its
weights (`assets/`), the recipe that trains it (`recipe`), its demo and evaluation (`demo`,
`related_eval`) and the scene checker that judges its images (`checker`).

The library (ops, models, train, export) never imports this package.
"""

from .loader import DEFAULT_DIR, DefaultModel, DefaultModelError, GenerationConfig, check_folder, load_default

__all__ = ["DEFAULT_DIR", "DefaultModel", "DefaultModelError", "GenerationConfig", "check_folder", "load_default"]
