"""The SEED tokenizer: EVA ViT, causal Q-Former, quantizer, generation-embedding heads."""
