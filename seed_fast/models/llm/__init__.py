"""The SEED LLM: a causal LM with the image vocabulary, its decoding loop and text tokenizer."""

from .seed_llm import ImageVocab, PromptTemplate, SeedLLM, get_template, seed_lora_config, tiny_causal_lm

__all__ = ["ImageVocab", "PromptTemplate", "SeedLLM", "get_template", "seed_lora_config", "tiny_causal_lm"]
