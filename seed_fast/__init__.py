"""seed_fast: a fast, faithful SEED image tokenizer and the systems around it."""

__version__ = "0.1.0"

from .models import CheckpointError, InputError, LoadReport, SeedLLM, SeedTokenizer, TokenizerConfig, get_config

__all__ = ["CheckpointError", "InputError", "LoadReport", "SeedLLM", "SeedTokenizer", "TokenizerConfig", "get_config", "__version__"]
