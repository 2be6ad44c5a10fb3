"""seed_fast: a fast, faithful SEED image tokenizer and the systems around it.

The public names below are imported on first use, so that `seed_fast.export.runtime` (numpy
+ onnxruntime only) can be imported on a machine without torch.
"""

__version__ = "0.2.0"

__all__ = [
    "CheckpointError",
    "InputError",
    "LoadReport",
    "SeedLLM",
    "SeedTokenizer",
    "TokenizerConfig",
    "get_config",
    "__version__",
]


def __getattr__(name: str):
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'seed_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
