"""Image decoders: codes or generation embeddings to pixels (unCLIP and the embedded decoder)."""
