"""Small word-level text tokenizers built offline (no model hub): for tests, the tiny presets and the
embedded default model, whose captions come from a closed vocabulary.

Special tokens follow LLaMA's layout: `<unk>` 0, `<s>` 1, `</s>` 2, then `<pad>` 3.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
_WORD = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[str]:
    """The pre-tokenization the word tokenizer applies: lower-cased words and single punctuation."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(
    corpus: Iterable[str], *, extra_words: Iterable[str] = (), vocab_size: int | None = None, min_freq: int = 1
):
    """A `PreTrainedTokenizerFast` whose vocabulary is the specials, then `extra_words`, then the
    corpus words by falling frequency (ties alphabetical, so the result is deterministic).

    vocab_size: pad with filler tokens `<extra_N>` up to exactly this many entries (e.g. 32000 to
    reproduce LLaMA's id layout), or raise if the words do not fit.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for text in corpus for w in words_of(text))
    vocab: dict[str, int] = {}
    for w in list(SPECIALS) + [w.lower() for w in extra_words]:
        vocab.setdefault(w, len(vocab))
    for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if c >= min_freq:
            vocab.setdefault(w, len(vocab))
    if vocab_size is not None:
        if len(vocab) > vocab_size:
            raise ValueError(f"build_word_tokenizer: {len(vocab)} words do not fit in vocab_size={vocab_size}")
        for i in range(vocab_size - len(vocab)):
            vocab[f"<extra_{i}>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    # WordPiece's decoder joins words with spaces and removes the space before punctuation
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=True,
    )
