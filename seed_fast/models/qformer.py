"""BLIP-2 Q-Former, query branch only, with optional causal self-attention among the queries.

Post-norm BERT layers. Per-layer module names mirror the released checkpoint
(`attention.self.query`, `crossattention.output.LayerNorm`, `intermediate_query.dense`, ...), so a
layer's keys map by prefix alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import qformer_attention


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        out = qformer_attention(q, k, v, causal=causal)
        return out.transpose(1, 2).flatten(2)  # (B, Lq, hidden)


class AddNorm(nn.Module):
    """BERT's SelfOutput / Output: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, d_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.self = MultiHeadAttention(hidden, heads, kv_width)
        self.output = AddNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return self.output(self.self(x, kv, causal), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, encoder_width: int, cross: bool, eps: float):
        super().__init__()
        self.attention = AttentionBlock(hidden, heads, hidden, eps)
        self.has_cross_attention = cross
        if cross:
            self.crossattention = AttentionBlock(hidden, heads, encoder_width, eps)
        self.intermediate_query = Intermediate(hidden, ffn)
        self.output_query = AddNorm(ffn, hidden, eps)

    def forward(self, x: torch.Tensor, encoder_states: torch.Tensor, causal: bool) -> torch.Tensor:
        x = self.attention(x, x, causal=causal)
        if self.has_cross_attention:
            x = self.crossattention(x, encoder_states)
        return self.output_query(self.intermediate_query(x), x)


class QFormer(nn.Module):
    """Learned queries (1, Q, hidden) -> LayerNorm -> layers -> (B, Q, hidden).

    Cross-attention to `encoder_states` (B, L, encoder_width) in layers i with i % freq == 0.
    """

    def __init__(
        self,
        *,
        num_queries: int,
        hidden: int,
        layers: int,
        heads: int,
        ffn: int,
        encoder_width: int,
        cross_attention_freq: int,
        eps: float,
        causal: bool,
    ):
        super().__init__()
        self.causal = causal
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden))
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, heads, ffn, encoder_width, i % cross_attention_freq == 0, eps) for i in range(layers)
        )

    def forward(self, encoder_states: torch.Tensor, query_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if query_embeds is None:
            query_embeds = self.query_tokens.expand(encoder_states.shape[0], -1, -1)
        x = self.norm(query_embeds)  # (B, Q, hidden)
        for layer in self.layers:
            x = layer(x, encoder_states, self.causal)
        return x
