"""SEED's quantizer: 768 -> 32 (`encode_task_layer`), nearest of K codes, 32 -> 768 (`decode_task_layer`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...ops import codebook_lookup, vector_quantize
from ..config import QuantizerConfig


class Quantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig, hidden: int):
        super().__init__()
        self.cfg = cfg
        self.encode_task_layer = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, cfg.code_dim))
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.decode_task_layer = nn.Sequential(
            nn.Linear(cfg.code_dim, cfg.code_dim), nn.Tanh(), nn.Linear(cfg.code_dim, hidden)
        )

    def reset_codebook(self) -> None:
        k = self.cfg.codebook_size
        nn.init.uniform_(self.codebook.weight, -1.0 / k, 1.0 / k)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal embeddings (B, 32, hidden) -> (z_q straight-through (B, 32, code_dim), codes (B, 32), VQ loss).

        Loss as released ("legacy" order): mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2).
        Distances are fp32 whatever the dtype (inside `codebook_lookup`).
        """
        z = self.encode_task_layer(emb)  # (B, 32, code_dim)
        return vector_quantize(z, self.codebook.weight, self.cfg.beta)

    def lookup(self, emb: torch.Tensor) -> torch.Tensor:
        """Causal embeddings (..., hidden) -> codes (...)."""
        codes, _ = codebook_lookup(self.encode_task_layer(emb), self.codebook.weight)
        return codes

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, 32) -> decoded embeddings (B, 32, hidden)."""
        return self.decode_task_layer(self.codebook(codes))
