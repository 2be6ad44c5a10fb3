"""Nearest-code search for vector quantizers.

`codebook_lookup_ref` is the specification: plain torch, exact squared distances
sum((z - e)^2) accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype, processed in
chunks so that the N x K distance matrix is never held at once, ties to the lowest index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("auto", "ref")
METRICS = ("l2", "cosine")

# Elements of the (rows, K, D) difference tensor built per chunk by the reference (~64 MB in fp32).
_REF_CHUNK_ELEMS = 16 * 1024 * 1024


def codebook_lookup_ref(
    z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row for each vector of z.

    z: (..., D) fp32 / fp16 / bf16 / fp64; codebook: (K, D), same dtype family.
    metric: "l2" (squared Euclidean, SEED) or "cosine" (both sides l2-normalized, LaVIT).
    Returns (indices int64 (...), z_q = codebook[indices] (..., D) in codebook's dtype).
    """
    _check_inputs(z, codebook, metric)
    acc = torch.float64 if z.dtype == torch.float64 or codebook.dtype == torch.float64 else torch.float32
    flat = z.reshape(-1, z.shape[-1]).to(acc)
    book = codebook.to(acc)
    if metric == "cosine":
        flat = F.normalize(flat, dim=-1)
        book = F.normalize(book, dim=-1)
    n, k = flat.shape[0], book.shape[0]
    indices = torch.empty(n, dtype=torch.long, device=z.device)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, k * book.shape[1]))
    for start in range(0, n, rows):
        chunk = flat[start : start + rows]
        dist = (chunk[:, None, :] - book[None, :, :]).square().sum(-1)  # (rows, K)
        indices[start : start + rows] = dist.argmin(dim=-1)  # first minimum = lowest index
    indices = indices.reshape(z.shape[:-1])
    return indices, F.embedding(indices, codebook)


def codebook_lookup(
    z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point; same contract as `codebook_lookup_ref`."""
    if impl not in IMPLS:
        raise ValueError(f"codebook_lookup: unknown impl {impl!r}; available here: {IMPLS}")
    return codebook_lookup_ref(z, codebook, metric=metric)


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"codebook_lookup: metric must be one of {METRICS}, got {metric!r}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook_lookup: codebook must be (K, D), got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"codebook_lookup: z's last dim must equal the code dim {codebook.shape[1]}, got shape {tuple(z.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("codebook_lookup: the codebook is empty")
    for name, t in (("z", z), ("codebook", codebook)):
        if not t.is_floating_point():
            raise TypeError(f"codebook_lookup: {name} must be floating point, got {t.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"codebook_lookup: z is on {z.device} but codebook on {codebook.device}")
