"""EVA-CLIP ViT (BLIP-2's layout, state-dict names as in `eva_vit_g.pth`) and timm-style blocks.

EVA's attention keeps separate `q_bias` and `v_bias` and no k bias; timm blocks (the de-tokenizer's
`blocks_image`) have a plain `qkv` bias. Both are pre-norm with LayerNorm eps 1e-6 and exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import qformer_attention
from ..config import VisionConfig


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Self-attention; `eva_bias=True` gives EVA's q_bias/v_bias (no k bias) parametrisation."""

    def __init__(self, dim: int, heads: int, eva_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.eva_bias = eva_bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=not eva_bias)
        if eva_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = "ref"  # SeedTokenizer.to_fast switches it to "sdpa"
        self._bias_cache: tuple | None = None  # (key, [q_bias, 0, v_bias]) outside autograd

    def qkv_bias(self) -> torch.Tensor:
        """EVA's q / k / v bias [q_bias, 0, v_bias]. Without gradients it is built once and kept while
        q_bias and v_bias are unchanged (their storage and version counters), not rebuilt per call."""
        q, v = self.q_bias, self.v_bias
        if (torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)) or torch.compiler.is_compiling():
            return torch.cat([q, torch.zeros_like(q), v])
        try:
            key = (q.data_ptr(), q._version, v.data_ptr(), v._version, q.dtype, q.device)
        except RuntimeError:  # inference-mode tensors keep no version counter: build it each call
            return torch.cat([q, torch.zeros_like(q), v])
        if self._bias_cache is None or self._bias_cache[0] != key:
            with torch.no_grad():
                self._bias_cache = (key, torch.cat([q, torch.zeros_like(q), v]))
        return self._bias_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.eva_bias:
            qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        out = qformer_attention(q, k, v, impl=self.attn_impl)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, eva_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, eva_bias=eva_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, C)


class EvaViT(nn.Module):
    """Normalized images (B, 3, S, S) -> tokens (B, 1 + (S/p)^2, width), CLS first, no final norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.ln_eps, eva_bias=True) for _ in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, 256, 1408)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 257, 1408)
        for blk in self.blocks:
            x = blk(x)
        return x
