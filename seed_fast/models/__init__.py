from .checkpoint import CheckpointError, LoadReport
from .config import PRESETS, TokenizerConfig, get_config
from .preprocess import InputError
from .tokenizer import SeedTokenizer

__all__ = ["CheckpointError", "InputError", "LoadReport", "PRESETS", "SeedTokenizer", "TokenizerConfig", "get_config"]
