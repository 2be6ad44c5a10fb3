"""Fast seed_fast paths put into other libraries' models, one call per model family, each with its undo."""

from .blip2 import apply_seed_fast_to_blip2, revert_seed_fast_blip2

__all__ = ["apply_seed_fast_to_blip2", "revert_seed_fast_blip2"]
