"""VW-LMM's visual words (arXiv 2403.07720): image features supervised as distributions over the
text vocabulary, for any transformers causal LM (the one inside a SeedLLM included).

    vm_head = Linear(hidden, text vocabulary, bias=False)
    visual word of a patch      w_t = softmax(vm_head(projected patch t))              (B, P, V)
    training objective          text loss + KL(w_{t+1} || LM's prediction at image position t)
    PIF ("pseudo image features") the LM reads w_t @ E_text instead of the projected patch: each
                                 row a convex combination of text embeddings.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .preprocess import InputError


class VisualWordHead(nn.Module):
    """`vm_head`: projected patches (..., hidden) -> visual-word logits (..., vocab)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        if hidden < 1 or vocab < 2:
            raise InputError(f"VisualWordHead needs hidden >= 1 and vocab >= 2, got {hidden}, {vocab}")
        self.vm_head = nn.Linear(hidden, vocab, bias=False)

    @classmethod
    def for_lm(cls, model: nn.Module, vocab: int | None = None) -> "VisualWordHead":
        """A head sized for a transformers causal LM: its hidden size, and its text vocabulary
        (`vocab`, default the input embedding's rows; a SeedLLM passes vocab.base so the image
        tokens are not words)."""
        emb = model.get_input_embeddings().weight
        vocab = emb.shape[0] if vocab is None else vocab
        if not 2 <= vocab <= emb.shape[0]:
            raise InputError(f"vocab must lie in [2, {emb.shape[0]}] (the LM's embedding rows), got {vocab}")
        return cls(emb.shape[1], vocab).to(device=emb.device, dtype=emb.dtype)

    @property
    def vocab(self) -> int:
        return self.vm_head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vm_head(x)

    def words(self, x: torch.Tensor) -> torch.Tensor:
        """Visual words: distributions over the vocabulary (..., vocab), fp32."""
        return self(x).float().softmax(-1)

    def pseudo_image_features(self, x: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """PIF: softmax(vm_head(x)) @ E_text -> (..., hidden). text_embeddings: (vocab, hidden), the
        LM's input embedding rows of the same vocabulary."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[0] != self.vocab:
            raise InputError(
                f"text_embeddings must be ({self.vocab}, hidden) to match vm_head's vocabulary, "
                f"got {tuple(text_embeddings.shape)}"
            )
        return (self.words(x) @ text_embeddings.float()).to(text_embeddings.dtype)

    def top_words(self, x: torch.Tensor, tokenizer, k: int = 1) -> list[list[list[str]]]:
        """The k most likely words of every patch: [image][patch] -> k strings (a visualization)."""
        if x.dim() != 3:
            raise InputError(f"x must be (B, P, hidden), got shape {tuple(x.shape)}")
        idx = self(x).topk(k, dim=-1).indices.cpu()  # (B, P, k)
        return [[[tokenizer.decode([int(t)]).strip() for t in patch] for patch in img] for img in idx]


def visual_word_kl(lm_logits: torch.Tensor, target_words: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """KL(target || LM) averaged over image positions.

    lm_logits: (B, T, V_lm) the LM's logits; only the first V columns (the text vocabulary the
    visual words live in) are compared, renormalized. target_words: (B, T, V) the visual word that
    position t must predict (the NEXT patch's word, already shifted). image_mask: (B, T) bool, the
    positions where a next patch exists."""
    v = target_words.shape[-1]
    if lm_logits.shape[:2] != target_words.shape[:2] or image_mask.shape != lm_logits.shape[:2]:
        raise InputError(
            f"lm_logits {tuple(lm_logits.shape)}, target_words {tuple(target_words.shape)} and "
            f"image_mask {tuple(image_mask.shape)} must share (B, T)"
        )
    if lm_logits.shape[-1] < v:
        raise InputError(f"the LM has {lm_logits.shape[-1]} logits but the visual words span {v} words")
    sel = image_mask.to(torch.bool)
    if not bool(sel.any()):
        return lm_logits.sum() * 0.0  # no image position in the batch: zero, still in the graph
    logq = lm_logits[sel][:, :v].float().log_softmax(-1)
    p = target_words[sel].float()
    return F.kl_div(logq, p, reduction="batchmean")


def visual_word_kl_ref(lm_logits: torch.Tensor, target_words: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """The same loss written out: mean over image positions of sum_w p(w) (log p(w) - log q(w)), fp64."""
    v = target_words.shape[-1]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(lm_logits.shape[0]):
        for t in range(lm_logits.shape[1]):
            if not bool(image_mask[b, t]):
                continue
            q = torch.softmax(lm_logits[b, t, :v].double(), -1)
            p = target_words[b, t].double()
            nz = p > 0
            total = total + (p[nz] * (p[nz].log() - q[nz].log())).sum()
            count += 1
    return total / max(count, 1)


def next_patch_targets(
    words: torch.Tensor, image_positions: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the visual words of an image's patches as targets of the positions before them.

    words: (B, P, V) visual words of the P patches; image_positions: (B, P) int, where each patch
    sits in the LM sequence (consecutive). Returns target_words (B, T, V) and mask (B, T): position
    of patch t gets the word of patch t + 1 (the last patch predicts nothing)."""
    b, p, v = words.shape
    if image_positions.shape != (b, p):
        raise InputError(f"image_positions must be {(b, p)}, got {tuple(image_positions.shape)}")
    if int(image_positions.max()) >= seq_len or int(image_positions.min()) < 0:
        raise InputError(
            f"image_positions must lie in [0, {seq_len}), "
            f"got [{int(image_positions.min())}, {int(image_positions.max())}]"
        )
    targets = words.new_zeros(b, seq_len, v)
    mask = torch.zeros(b, seq_len, dtype=torch.bool, device=words.device)
    pos = image_positions[:, :-1]
    targets.scatter_(1, pos[..., None].expand(-1, -1, v), words[:, 1:])
    mask.scatter_(1, pos, True)
    return targets, mask
