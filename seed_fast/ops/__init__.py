"""Ops: each with a plain-torch reference (`<op>_ref`) and a dispatching entry point."""

from .codebook_lookup import (
    codebook_lookup,
    codebook_lookup_check,
    codebook_lookup_ref,
    vector_quantize,
    vector_quantize_ref,
)
from .dispatch_log import record_dispatch
from .lora_linear import lora_dropout_mask, lora_linear, lora_linear_ref
from .qformer_attention import qformer_attention, qformer_attention_ref

__all__ = [
    "codebook_lookup",
    "codebook_lookup_check",
    "codebook_lookup_ref",
    "lora_dropout_mask",
    "lora_linear",
    "lora_linear_ref",
    "qformer_attention",
    "qformer_attention_ref",
    "record_dispatch",
    "vector_quantize",
    "vector_quantize_ref",
]
