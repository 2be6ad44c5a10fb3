"""Names that changed across the transformers releases seed_fast supports.

transformers 5.25 renamed the models' `past_key_values` argument and output field to `cache`, and
warns on the old name (removal planned for 5.40); older releases only know `past_key_values`.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache


@lru_cache(maxsize=None)
def cache_name() -> str:
    """The name of a causal LM's KV-cache argument and output field in the installed transformers."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


def with_cache(cache) -> dict:
    """Keyword arguments passing `cache` to a transformers model's forward."""
    return {cache_name(): cache}


def output_cache(output):
    """The KV cache a model's output carries."""
    return getattr(output, cache_name())
