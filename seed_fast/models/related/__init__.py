"""Related systems: LaVIT's dynamic tokenizer, VW-LMM's visual words, a Flamingo-style baseline."""
