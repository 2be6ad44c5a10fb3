"""BLIP-2 Q-Former, query branch only, with optional causal self-attention among the queries.

Post-norm BERT layers. Per-layer module names mirror the released checkpoint
(`attention.self.query`, `crossattention.output.LayerNorm`, `intermediate_query.dense`, ...), so a
layer's keys map by prefix alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import qformer_attention


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.attn_impl = "ref"  # the reference path; QFormer.set_fast switches it

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        out = qformer_attention(q, k, v, causal=causal, impl=self.attn_impl)
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

    def forward_fast(self, x, cross_kv, causal: bool, qkv_weight, qkv_bias, impl: str) -> torch.Tensor:
        """The same layer with self-attention Q, K, V as one matmul and the cross-attention K / V
        precomputed (`cross_kv`: (k, v) as (B, H, L, Dh) views, or None)."""
        b, n, c = x.shape
        heads = self.attention.self.heads
        qkv = F.linear(x, qkv_weight, qkv_bias).view(b, n, 3, heads, c // heads)  # (B, Q, 3, H, Dh)
        # unbind, not indexing: its backward writes the three gradients into one packed buffer (a stack),
        # where indexing would zero-fill a packed-size buffer per gradient and add the three
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, Q, Dh) strided views
        att = qformer_attention(q, k, v, causal=causal, impl=impl).transpose(1, 2).reshape(b, n, c)
        x = self.attention.output(att, x)
        if cross_kv is not None:
            cq = self.crossattention.self.query(x).view(b, n, heads, c // heads).transpose(1, 2)
            att = qformer_attention(cq, *cross_kv, impl=impl).transpose(1, 2).reshape(b, n, c)
            x = self.crossattention.output(att, x)
        return self.output_query(self.intermediate_query(x), x)


class FusedLinearCache:
    """Concatenated weights of several nn.Linear, reused while none of them changed.

    The key is each source tensor's (data_ptr, _version): in-place updates (optimizer steps,
    load_state_dict) bump the version and re-assignment (`.to()`) changes the pointer, so a stale
    result is never used. A refresh writes into the same storage when shapes and dtypes allow, so
    a captured CUDA graph that reads it sees the new values. With autograd recording (training)
    the concatenation is done every call instead, so gradients reach the original weights.
    """

    def __init__(self):
        self._entries: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def get(self, name: str, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        weights = [lin.weight for lin in linears]
        biases = [lin.bias for lin in linears]
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t.requires_grad for t in weights + biases)
        ):
            return torch.cat(weights), torch.cat(biases)
        key = tuple((t.data_ptr(), t._version) for t in weights + biases)
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        with torch.no_grad():
            if (
                hit is not None
                and hit[1].shape[0] == sum(w.shape[0] for w in weights)
                and all(t.dtype == hit[1].dtype and t.device == hit[1].device for t in weights + biases)
            ):
                w, b = hit[1], hit[2]
                torch.cat(weights, out=w)
                torch.cat(biases, out=b)
            else:
                w, b = torch.cat(weights), torch.cat(biases)
        self._entries[name] = (key, w, b)
        return w, b


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
        self.fast = False
        self.fast_impl = "auto"
        self.fused = FusedLinearCache()
        self._refresh_sources = None  # (groups, source tensors) of refresh_fused, built on first use
        self._refresh_key = None

    def set_fast(self, on: bool = True, *, impl: str = "auto") -> None:
        """Fast path on / off: fused projections (one matmul for every cross-attention layer's K / V of
        the image tokens, one for each layer's self-attention Q / K / V) and attention backend `impl`
        ("auto": as measured fastest, seed_fast/ops/dispatch.py). Off restores the reference path exactly."""
        self.fast = bool(on)
        for layer in self.layers:
            layer.attention.self.attn_impl = impl if on else "ref"
            if layer.has_cross_attention:
                layer.crossattention.self.attn_impl = impl if on else "ref"
        self.fast_impl = impl
        self.fused.clear()
        self._refresh_sources = self._refresh_key = None

    def fused_linears(self) -> dict[str, list[nn.Linear]]:
        """The fast path's fused projections: name -> the nn.Linear concatenated (output dim).
        "cross_kv": every cross-attention layer's K and V (used on GPU: one matmul for all six);
        "cross_kv{i}": layer i's K and V (used on CPU, where a (B * 257, 6 * 1536) product falls out
        of cache before the later layers read it); "qkv{i}": layer i's self-attention Q, K, V."""
        groups: dict[str, list[nn.Linear]] = {"cross_kv": []}
        for i, layer in enumerate(self.layers):
            att = layer.attention.self
            groups[f"qkv{i}"] = [att.query, att.key, att.value]
            if layer.has_cross_attention:
                kv = [layer.crossattention.self.key, layer.crossattention.self.value]
                groups["cross_kv"] += kv
                groups[f"cross_kv{i}"] = kv
        return {k: v for k, v in groups.items() if v}

    @torch.no_grad()
    def refresh_fused(self) -> None:
        """Bring the fused weights the fast path uses on this module's device up to date now
        (in place where possible): run before a CUDA graph replay that reads them. When no source
        weight changed since the last refresh (one tuple of versions compared) it does nothing."""
        all_layers = self.query_tokens.is_cuda
        if self._refresh_sources is None or self._refresh_sources[0] != all_layers:
            groups = {
                name: linears
                for name, linears in self.fused_linears().items()
                if name.startswith("qkv") or (name == "cross_kv") == all_layers
            }
            tensors = [t for linears in groups.values() for lin in linears for t in (lin.weight, lin.bias)]
            self._refresh_sources = (all_layers, groups, tensors)
        _, groups, tensors = self._refresh_sources
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if key == self._refresh_key:
            return
        for name, linears in groups.items():
            self.fused.get(name, linears)
        self._refresh_key = key

    def forward(self, encoder_states: torch.Tensor, query_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if query_embeds is None:
            query_embeds = self.query_tokens.expand(encoder_states.shape[0], -1, -1)
        x = self.norm(query_embeds)  # (B, Q, hidden)
        if self.fast:
            return self._forward_fast(x, encoder_states)
        for layer in self.layers:
            x = layer(x, encoder_states, self.causal)
        return x

    def _forward_fast(self, x: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        b, length, _ = encoder_states.shape
        hidden = x.shape[-1]
        groups = self.fused_linears()
        cross = [i for i, layer in enumerate(self.layers) if layer.has_cross_attention]
        heads = self.layers[0].attention.self.heads
        cross_kv: dict[int, tuple] = {}
        if cross and encoder_states.is_cuda:
            w, bias = self.fused.get("cross_kv", groups["cross_kv"])
            kv = F.linear(encoder_states, w, bias)  # (B, L, n_cross * 2 * hidden): one matmul for all layers
            kvs = kv.view(b, length, 2 * len(cross), heads, hidden // heads).unbind(2)  # one packed gradient
            cross_kv = {i: (kvs[2 * j].transpose(1, 2), kvs[2 * j + 1].transpose(1, 2)) for j, i in enumerate(cross)}
        for i, layer in enumerate(self.layers):
            w, bias = self.fused.get(f"qkv{i}", groups[f"qkv{i}"])
            kv_i = None
            if layer.has_cross_attention:
                if i in cross_kv:
                    kv_i = cross_kv[i]
                else:  # CPU: this layer's K and V in one matmul, just before they are used
                    wkv, bkv = self.fused.get(f"cross_kv{i}", groups[f"cross_kv{i}"])
                    kv = F.linear(encoder_states, wkv, bkv).view(b, length, 2, heads, hidden // heads)
                    kv_i = tuple(t.transpose(1, 2) for t in kv.unbind(2))
            x = layer.forward_fast(x, kv_i, self.causal, w, bias, self.fast_impl)
        return x
