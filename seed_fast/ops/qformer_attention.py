"""Multi-head attention as the Q-Former, ViT and de-tokenizer use it.

`qformer_attention_ref` is the specification: plain torch, scores and softmax in fp32 (fp64 for fp64
inputs), output in the input dtype. Fused backends are added behind `qformer_attention(impl=...)`.
"""

from __future__ import annotations

import math

import torch

IMPLS = ("auto", "ref")


def qformer_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v.

    q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh); fp32 / fp16 / bf16 / fp64.
    causal: query i attends to keys 0..i (needs Lq == Lk; the 32-query self-attention).
    key_padding_mask: (B, Lk) bool, True = attend (keep), False = padding.
    Returns (B, H, Lq, Dh) in q's dtype. A query row with no key to attend gives zeros.
    """
    _check_qkv(q, k, v, causal, key_padding_mask)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    keep = None
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)
        keep = pad if keep is None else keep & pad
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


def qformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Dispatching entry point; same contract as `qformer_attention_ref`."""
    if impl not in IMPLS:
        raise ValueError(f"qformer_attention: unknown impl {impl!r}; available here: {IMPLS}")
    return qformer_attention_ref(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def _check_qkv(q, k, v, causal, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"qformer_attention: {name} must be (B, H, L, Dh), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"qformer_attention: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"qformer_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"qformer_attention: q {tuple(q.shape)} does not match k {tuple(k.shape)} in batch, heads or Dh"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"qformer_attention: causal needs Lq == Lk, got {q.shape[-2]} and {k.shape[-2]}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[-2]):
        raise ValueError(
            f"qformer_attention: key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[-2])}, "
            f"got {tuple(key_padding_mask.shape)}"
        )
