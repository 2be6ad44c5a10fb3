from .checkpoint import CheckpointError, LoadReport
from .config import PRESETS, TokenizerConfig, get_config
from .llm.seed_llm import ImageVocab, PromptTemplate, SeedLLM
from .preprocess import InputError
from .seed.tokenizer import SeedTokenizer

__all__ = [
    "CheckpointError",
    "ImageVocab",
    "InputError",
    "LoadReport",
    "PRESETS",
    "PromptTemplate",
    "SeedLLM",
    "SeedTokenizer",
    "TokenizerConfig",
    "get_config",
]
