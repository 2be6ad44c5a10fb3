"""De-tokenizer heads: decoded code embeddings (B, 32, hidden) -> generation embedding."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import DetokenizerConfig, QFormerConfig
from .qformer import QFormer
from .vit import Block


class MlpDetokenizer(nn.Module):
    """Released v2 head: + pos_embed_image -> blocks_image -> image_down per token -> flatten -> proj."""

    def __init__(self, cfg: DetokenizerConfig, q: QFormerConfig):
        super().__init__()
        hidden = q.hidden
        self.pos_embed_image = nn.Parameter(torch.zeros(1, q.num_queries, hidden))
        mlp_hidden = int(hidden * cfg.mlp_ratio)
        self.blocks_image = nn.ModuleList(Block(hidden, cfg.heads, mlp_hidden, cfg.ln_eps) for _ in range(cfg.depth))
        layers: list[nn.Module] = []
        dims = (hidden, *cfg.down_dims)
        for i in range(len(cfg.down_dims)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        self.image_down = nn.Sequential(*layers)  # indices 0, 2, 4 for the released (256, 128, 32)
        self.distill_image_proj = nn.Linear(q.num_queries * cfg.down_dims[-1], cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed_image  # (B, 32, 768)
        for blk in self.blocks_image:
            x = blk(x)
        x = self.image_down(x).flatten(1)  # (B, 32 * 32)
        return self.distill_image_proj(x)  # (B, 1024)


class ReverseQFormerDetokenizer(nn.Module):
    """A bidirectional Q-Former whose learned queries cross-attend to the decoded embeddings.

    1 query -> (B, out_dim) (the upstream alternative to the MLP head); 77 queries -> (B, 77, out_dim)
    (SEED v1, replacing SD v1.4's text conditioning).
    """

    def __init__(self, cfg: DetokenizerConfig, q: QFormerConfig):
        super().__init__()
        self.reverse_qformer = QFormer(
            num_queries=cfg.rq_queries,
            hidden=q.hidden,
            layers=cfg.rq_layers,
            heads=q.heads,
            ffn=q.ffn,
            encoder_width=q.hidden,
            cross_attention_freq=cfg.rq_cross_attention_freq,
            eps=q.ln_eps,
            causal=False,
        )
        self.proj = nn.Linear(q.hidden, cfg.out_dim)
        self.squeeze = cfg.rq_queries == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(self.reverse_qformer(x))  # (B, Q, out_dim)
        return out[:, 0] if self.squeeze else out


class Reconstructor(nn.Module):
    """Training-only head: decoded codes + pos_embed -> blocks -> reconstructed causal embeddings."""

    def __init__(self, cfg: DetokenizerConfig, q: QFormerConfig):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, q.num_queries, q.hidden))
        mlp_hidden = int(q.hidden * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(Block(q.hidden, cfg.heads, mlp_hidden, cfg.ln_eps) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x  # (B, 32, 768)


def build_detokenizer(cfg: DetokenizerConfig, q: QFormerConfig) -> nn.Module:
    if cfg.kind == "mlp":
        return MlpDetokenizer(cfg, q)
    return ReverseQFormerDetokenizer(cfg, q)
