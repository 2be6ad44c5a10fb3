"""A Flamingo-style continuous baseline (arXiv 2204.14198): image features -> Perceiver Resampler ->
gated cross-attention layers inserted into a frozen transformers causal LM.

Against SEED's discrete codes this is the continuous alternative on the same data: the LM never
sees image tokens; every `every`-th decoder layer first cross-attends (tanh-gated, gates start at 0
so the untouched LM is the starting point) to a fixed number of resampled visual latents.

    conn = FlamingoConnector(llm.model, media_dim=tok.config.vision.width)
    logits = conn(input_ids, attention_mask, media=vit_features).logits    # only conn's weights train
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import qformer_attention
from ..preprocess import InputError
from .connector import IGNORE, load_exact, media_features, open_connector_run


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
        )


class _Attend(nn.Module):
    """Queries from x attend to `kv` (no mask): LN'd inputs, bias-free projections."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InputError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.to_q(self.norm(x)).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(kv)).chunk(2, dim=-1)
        k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (k, v))
        out = qformer_attention(q, k, v, key_padding_mask=kv_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class PerceiverResampler(nn.Module):
    """Media features (B, M, media_dim) -> num_latents latents (B, num_latents, dim). Each layer: the
    latents attend to [media; latents], then a feed-forward."""

    def __init__(self, media_dim: int, dim: int, *, depth: int = 2, heads: int = 8, num_latents: int = 64):
        super().__init__()
        self.media_proj = nn.Linear(media_dim, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleList([_Attend(dim, dim, heads), _FeedForward(dim)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        if media.dim() != 3 or media.shape[-1] != self.media_proj.in_features:
            raise InputError(f"media must be (B, M, {self.media_proj.in_features}), got shape {tuple(media.shape)}")
        m = self.media_proj(media)
        x = self.latents[None].expand(media.shape[0], -1, -1)
        mask = None
        if media_mask is not None:
            ones = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask = torch.cat([media_mask.to(torch.bool), ones], 1)
        for attn, ff in self.layers:
            x = x + attn(x, torch.cat([m, x], 1), mask)
            x = x + ff(x)
        return self.norm(x)


class GatedCrossAttentionBlock(nn.Module):
    """LM hidden states (B, T, d) += tanh(a) * xattn(latents) ; += tanh(b) * ffw. a = b = 0 at init."""

    def __init__(self, dim: int, latent_dim: int, heads: int):
        super().__init__()
        self.attn = _Attend(dim, latent_dim, heads)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff = _FeedForward(dim)
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, latents)
        return x + self.ff_gate.tanh() * self.ff(x)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM (LLaMA: model.layers, OPT: model.decoder.layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return mod
    raise InputError(f"no list of {n} decoder layers found in {type(model).__name__}")


class FlamingoConnector(nn.Module):
    """Resampler + gated cross-attention before every `every`-th layer of a frozen LM (forward
    pre-hooks: the LM's code is not touched; `remove()` takes them out)."""

    def __init__(
        self,
        lm: nn.Module,
        media_dim: int,
        *,
        every: int = 1,
        num_latents: int = 64,
        resampler_depth: int = 2,
        heads: int | None = None,
    ):
        super().__init__()
        cfg = lm.config
        dim = cfg.hidden_size
        heads = heads or cfg.num_attention_heads
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        self.lm = [lm]  # not a submodule: the frozen LM is not part of the connector's state
        lm.requires_grad_(False)
        self.resampler = PerceiverResampler(media_dim, dim, depth=resampler_depth, heads=heads, num_latents=num_latents)
        layers = decoder_layers(lm)
        self.where = list(range(0, len(layers), every))
        self.xattn = nn.ModuleList(GatedCrossAttentionBlock(dim, dim, heads) for _ in self.where)
        self._latents: torch.Tensor | None = None
        self._hooks = [
            layers[i].register_forward_pre_hook(self._hook(j), with_kwargs=True) for j, i in enumerate(self.where)
        ]

    def _hook(self, j: int):
        def pre(module, args, kwargs):
            if self._latents is None:
                return None
            if args:
                return (self.xattn[j](args[0], self._latents), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self.xattn[j](kwargs["hidden_states"], self._latents)
            return args, kwargs

        return pre

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        media: torch.Tensor,
        media_mask: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """media (B, M, media_dim): e.g. ViT features or a Q-Former's continuous embeddings."""
        if media.shape[0] != input_ids.shape[0]:
            raise InputError(f"{input_ids.shape[0]} sequences but {media.shape[0]} media items")
        self._latents = self.resampler(media, media_mask).to(self.lm[0].get_input_embeddings().weight.dtype)
        try:
            return self.lm[0](input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
        finally:
            self._latents = None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        media: torch.Tensor,
        media_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy (by default) continuation through the LM's own `generate` and KV cache, the
        resampled latents set for the whole call: every new token cross-attends to the media.
        Returns the LM's output ids (prompt included)."""
        if media.shape[0] != input_ids.shape[0]:
            raise InputError(f"{input_ids.shape[0]} sequences but {media.shape[0]} media items")
        lm = self.lm[0]
        self._latents = self.resampler(media, media_mask).to(lm.get_input_embeddings().weight.dtype)
        try:
            kw = dict(do_sample=False, max_new_tokens=max_new_tokens)
            kw.update(generate_kwargs)
            return lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            self._latents = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class CaptionSequences:
    """Captions -> (ids, mask, labels) right-padded: [bos] prompt caption eos, loss on caption + eos."""

    def __init__(self, llm, prompt: str | None):
        tt = llm.text_tokenizer
        if tt.eos_token_id is None:
            raise ValueError("the LM's text tokenizer has no eos token; caption sequences need one to end")
        self.llm, self.eos = llm, tt.eos_token_id
        self.pad = tt.pad_token_id if tt.pad_token_id is not None else self.eos
        if prompt is None:
            prompt = llm.template.caption.replace("<image>", "").strip()
        self.prompt = llm.encode_turn(prompt)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [(self.prompt, self.llm._text_ids(c) + [self.eos]) for c in captions]
        n = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            k = len(p) + len(a)
            ids[i, :k] = torch.tensor(p + a)
            lab[i, len(p) : k] = torch.tensor(a)
            mask[i, :k] = 1
        return ids, mask, lab


class FlamingoModule(nn.Module):
    """Holds the trainable connector (the only submodule); the LM and tokenizer ride along unregistered."""

    def __init__(self, connector, tok, seqs: CaptionSequences, media: str):
        super().__init__()
        self.connector = connector
        self._frozen = (tok, seqs)
        self.media = media

    def token_losses(self, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok, seqs = self._frozen
        with torch.no_grad():
            feats = media_features(tok, pixels, self.media)
        ids, mask, labels = seqs(captions)
        dev = feats.device
        logits = self.connector(ids.to(dev), mask.to(dev), media=feats, use_cache=False).logits
        target = labels[:, 1:].to(dev)
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        return ce, target

    def forward(self, batch) -> dict:
        if len(batch) == 0:
            zero = sum(p.sum() * 0 for p in self.connector.parameters())
            return {"loss": zero}
        ce, target = self.token_losses(batch.pixels, batch.captions)
        n = (target != IGNORE).sum().clamp_min(1)
        gates = [b.attn_gate.detach().tanh().abs() for b in self.connector.xattn]
        return {"loss": ce.sum() / n, "gate": torch.stack(gates).mean()}


@torch.no_grad()
def flamingo_captions(
    connector, llm, tok, pixels: torch.Tensor, seqs: CaptionSequences, media: str, *, max_new_tokens: int = 16
) -> list[str]:
    """Greedy captions through the connector (the LM's own KV-cached `generate`; the latents stay
    set for the whole call, so every new token cross-attends to the image)."""
    feats = media_features(tok, pixels, media)
    ids = torch.tensor([seqs.prompt] * feats.shape[0], device=feats.device)
    out = connector.generate(
        ids,
        torch.ones_like(ids),
        media=feats,
        max_new_tokens=max_new_tokens,
        eos_token_id=seqs.eos,
        pad_token_id=seqs.pad,
    )
    return llm._decode_text(out[:, ids.shape[1] :].tolist())


def load_flamingo(folder: str | Path, *, device=None):
    """A `run/flamingo` folder -> (connector, llm, tokenizer, meta), ready for `flamingo_captions`."""
    root, meta, llm, tok = open_connector_run(folder, "flamingo", "connector.safetensors")
    conn = FlamingoConnector(
        llm.model,
        meta["media_dim"],
        every=meta["every"],
        num_latents=meta["num_latents"],
        resampler_depth=meta["resampler_depth"],
    )
    load_exact(conn, root / "connector.safetensors", "connector")
    if device is not None:
        llm.model.to(device)
        tok.to(device)
        conn.to(device)
    return conn.eval(), llm, tok, meta
