"""transformers' Auto classes for seed_fast's image tokenizer: a SeedTokenizer folder's config.json
carries `"model_type": "seed_tokenizer"`, and once this module is imported (SeedLLM imports it)
`AutoConfig.from_pretrained(folder_or_hub_id)` returns a `SeedTokenizerConfig` and
`AutoModel.from_pretrained(folder_or_hub_id)` a `SeedTokenizer`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, PretrainedConfig

from .config import TokenizerConfig
from .seed.tokenizer import MODEL_TYPE, SeedTokenizer


class SeedTokenizerConfig(PretrainedConfig):
    """The config.json of a SeedTokenizer folder as transformers reads it: `config` holds the
    architecture (seed_fast.TokenizerConfig's fields), `format_version` the folder format."""

    model_type = MODEL_TYPE

    def tokenizer_config(self):
        """The architecture as a seed_fast TokenizerConfig."""
        return TokenizerConfig.from_dict(self.config)


def register() -> None:
    """Register SeedTokenizerConfig / SeedTokenizer with AutoConfig / AutoModel (idempotent)."""
    AutoConfig.register(MODEL_TYPE, SeedTokenizerConfig, exist_ok=True)
    AutoModel.register(SeedTokenizerConfig, SeedTokenizer, exist_ok=True)


register()
