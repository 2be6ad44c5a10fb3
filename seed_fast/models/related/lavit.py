"""LaVIT's dynamic visual tokenizer (arXiv 2309.04669): a variable number of codes per image.

    EVA ViT (last block, no final norm, CLS dropped): (B, 256, 1408)
      -> token_predictor: keep / drop log-probabilities per patch (B, 256, 2), index 0 = keep
      -> selection: Gumbel-softmax hard (training, and upstream's inference) or deterministic
         (threshold on p(keep), or the top-k patches): keep (B, 256) in {0, 1}
      -> causal_encoder (the token merger): the kept tokens, in raster order, attend causally to
         each other and cross-attend to the dropped tokens' (ln_vision-normed) ViT features
      -> encode_task_layer (1408 -> 1408 -> tanh -> 32), nearest of 16384 l2-normalized codes
         (`codebook_lookup(metric="cosine")`) -> codes, one sequence per image
    LLM layout: [IMG] (32000), codes + 32002, [/IMG] (32001).

Module and parameter names follow the released `tokenizer_encoder.bin` (token_predictor.*,
causal_encoder.*, quantize.embedding.weight, encode_task_layer.*, vit_proj.*; the ViT under
encoder.*), so `load_official` is a plain, reported state-dict load. `LavitFeatureDecoder` follows
the released `highres_tokenizer_decoder.bin` core (in_proj, pos_embed, query_embed, blocks, norm,
decode_task_layer) and reconstructs the 256 ViT features from the codes.

The merger runs as one batched op over variable-length sets (kept tokens and dropped tokens each
gathered into a padded tensor, the attention op's key padding mask): `merge_tokens`. Its spec is
the per-image loop `merge_tokens_ref`. Upstream instead runs all 256 tokens with 0/1 masks and an
eps-smoothed softmax; on the kept tokens that is the same computation up to that 1e-6 smoothing.
Its one visible edge case is kept: an image with no dropped token cross-attends uniformly to all of
its tokens. Every image keeps at least one token (its most likely one) so no code sequence is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import codebook_lookup, qformer_attention
from ..checkpoint import CheckpointError
from ..config import VisionConfig
from ..preprocess import InputError, images_to_tensor, normalize
from ..seed.vit import EvaViT, Mlp

IMG_ID, END_IMG_ID, CODE_OFFSET = 32000, 32001, 32002  # LaVIT's LLaMA vocabulary layout


@dataclass
class LavitConfig:
    name: str = "lavit"
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(depth=40))
    heads: int = 16  # merger and decoder
    merger_depth: int = 12
    mlp_hidden: int = 6144
    codebook_size: int = 16384
    code_dim: int = 32
    llm_dim: int = 4096  # vit_proj (continuous tokens for understanding)
    decoder_depth: int = 12
    keep_ratio: float = 1 / 3  # the keep-ratio loss's target
    keep_weight: float = 2.0
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @property
    def width(self) -> int:
        return self.vision.width

    @property
    def num_patches(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2


LAVIT_PRESETS = {
    "lavit": LavitConfig(),
    # the embedded model's ViT (`mini` SeedTokenizer preset: 64 px, 8 px patches, 128 wide), so a LaVIT
    # tokenizer can be trained on CPU over a trained ViT
    "mini-lavit": LavitConfig(
        name="mini-lavit",
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_hidden=384),
        heads=4,
        merger_depth=2,
        mlp_hidden=256,
        codebook_size=1024,
        code_dim=16,
        llm_dim=256,
        decoder_depth=2,
    ),
    "tiny-lavit": LavitConfig(
        name="tiny-lavit",
        vision=VisionConfig(image_size=64, patch_size=8, width=64, depth=2, heads=4, mlp_hidden=128),
        heads=4,
        merger_depth=2,
        mlp_hidden=128,
        codebook_size=512,
        code_dim=16,
        llm_dim=96,
        decoder_depth=2,
    ),
}


def get_lavit_config(name: str) -> LavitConfig:
    if name not in LAVIT_PRESETS:
        raise ValueError(f"unknown LaVIT preset {name!r}; choose from {sorted(LAVIT_PRESETS)}")
    return LAVIT_PRESETS[name]


# ------------------------------------------------------------------------------------- selector
class TokenPredictor(nn.Module):
    """Per-patch keep / drop log-probabilities from a local half and a (kept-weighted) global half."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) -> log-probabilities (B, N, 2) in fp32; [..., 0] is keep. The predictor runs in
        fp32 whatever its parameters' dtype (it is small, and its log-probabilities decide which
        patches are kept), so a bf16 / fp16 tokenizer selects as its fp32 weights would."""
        h = _run_fp32(self.in_conv, x.float())
        c = h.shape[-1] // 2
        policy = torch.ones_like(h[..., :1]) if policy is None else policy.to(h).view(*h.shape[:2], 1)
        glob = (h[..., c:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp_min(1e-6)
        return _run_fp32(self.out_conv, torch.cat([h[..., :c], glob.expand(-1, h.shape[1], -1)], -1))


def _run_fp32(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A Sequential of Linear / LayerNorm / parameter-free layers applied in fp32 (weights upcast on
    the fly; with fp32 weights this is the plain forward)."""

    def up(t):
        return None if t is None else t.float()

    for layer in seq:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, up(layer.weight), up(layer.bias))
        elif isinstance(layer, nn.LayerNorm):
            x = F.layer_norm(x, layer.normalized_shape, up(layer.weight), up(layer.bias), layer.eps)
        else:
            x = layer(x)
    return x


def select_tokens(
    log_probs: torch.Tensor,
    mode: str = "threshold",
    *,
    threshold: float = 0.5,
    k: int | None = None,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep / drop decisions (B, N) in {0, 1} (float, differentiable in "gumbel" mode through the
    straight-through hard sample, as F.gumbel_softmax(hard=True)).

    mode "gumbel": sample (training; upstream samples at inference too, so its token counts vary);
         "expected": keep the round(sum of p(keep)) most likely patches: deterministic, and as many
                     tokens as the sampler keeps on average (the default at inference);
         "threshold": keep where p(keep) >= threshold (deterministic);
         "topk": keep the k most likely patches (deterministic, fixed length).
    Every image keeps at least its most likely patch."""
    if log_probs.dim() != 3 or log_probs.shape[-1] != 2:
        raise InputError(f"log_probs must be (B, N, 2), got shape {tuple(log_probs.shape)}")
    n = log_probs.shape[1]
    if mode == "gumbel":
        if not tau > 0:
            raise InputError(f"tau must be > 0, got {tau}")
        u = torch.rand(
            log_probs.shape, generator=generator, device="cpu" if generator is not None else log_probs.device
        )
        g = -torch.log((-torch.log(u.to(log_probs.device).clamp(1e-10, 1.0))).clamp_min(1e-10))  # Gumbel(0, 1)
        soft = ((log_probs + g) / tau).softmax(-1)
        hard = F.one_hot(soft.argmax(-1), 2).to(soft)
        keep = (hard - soft.detach() + soft)[..., 0]
    elif mode == "expected":
        p = log_probs[..., 0].exp()
        count = p.sum(-1).round().clamp(1, n).long()  # (B,)
        rank = p.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)  # each patch's rank
        keep = (rank < count[:, None]).to(log_probs.dtype)
    elif mode == "threshold":
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold must lie in [0, 1], got {threshold}")
        keep = (log_probs[..., 0].exp() >= threshold).to(log_probs.dtype)
    elif mode == "topk":
        if k is None or not 1 <= k <= n:
            raise InputError(f"mode 'topk' needs 1 <= k <= {n}, got k={k}")
        idx = log_probs[..., 0].topk(k, dim=-1).indices
        keep = torch.zeros_like(log_probs[..., 0]).scatter(1, idx, 1.0)
    else:
        raise InputError(f"unknown selection mode {mode!r}; choose 'gumbel', 'expected', 'threshold' or 'topk'")
    none = (keep.detach() > 0.5).sum(-1) == 0  # (B,)
    if bool(none.any()):
        best = F.one_hot(log_probs[..., 0].argmax(-1), n).to(keep)
        keep = torch.where(none[:, None], best + keep - keep.detach(), keep)
    return keep


def keep_ratio_loss(keep: torch.Tensor, target: float, weight: float = 2.0) -> torch.Tensor:
    """weight * mean over images of (target - fraction kept)^2."""
    return weight * (target - keep.float().mean(-1)).square().mean()


# --------------------------------------------------------------------------------------- merger
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # (B, H, N, Dh)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def heads_of(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)


class MergerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-5)
        self.token_causal_attn = CausalSelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.token_cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_hidden)


class TokenMerger(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, mlp_hidden: int):
        super().__init__()
        self.blocks = nn.ModuleList(MergerBlock(dim, heads, mlp_hidden) for _ in range(depth))
        self.ln_vision = nn.LayerNorm(dim, eps=1e-5)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.attn_impl = "auto"


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def merge_tokens_ref(merger: TokenMerger, feats: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """The specification, one image at a time: feats (B, N, C) ViT features, keep (B, N) {0, 1} ->
    per image the merged kept tokens (n_kept_i, C), in raster order."""
    out = []
    for b in range(feats.shape[0]):
        sel = keep[b] > 0.5
        x = feats[b, sel][None]  # (1, L, C)
        dropped = merger.ln_vision(feats[b, ~sel])[None]  # (1, M, C)
        uniform = dropped.shape[1] == 0
        if uniform:
            dropped = merger.ln_vision(feats[b])[None]
        for blk in merger.blocks:
            att = blk.token_causal_attn
            q, k, v = att.split(blk.norm0(x))
            x = x + att.proj(_merge_heads(qformer_attention(q, k, v, causal=True, impl="ref")))
            ca = blk.token_cross_attn
            qc = ca.heads_of(ca.query(blk.norm1(x)))
            kc, vc = ca.heads_of(ca.key(dropped)), ca.heads_of(ca.value(dropped))
            if uniform:  # nothing dropped: upstream's masked softmax degenerates to a uniform average
                qc = torch.zeros_like(qc)
            x = x + ca.proj(_merge_heads(qformer_attention(qc, kc, vc, impl="ref")))
            x = x + blk.mlp(blk.norm2(x))
        out.append(merger.norm(x)[0])
    return out


def _gather(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of feats where mask, per image, left-aligned in raster order: (B, Lmax, C) + valid (B, Lmax)."""
    b, n, c = feats.shape
    counts = mask.sum(-1)
    lmax = max(1, int(counts.max()))
    # stable order: selected positions first, in raster order
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :lmax]  # (B, Lmax)
    out = feats.gather(1, order[..., None].expand(-1, -1, c))
    valid = torch.arange(lmax, device=feats.device)[None] < counts[:, None]
    return out, valid


def merge_tokens(
    merger: TokenMerger, feats: torch.Tensor, keep: torch.Tensor, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched token merger: feats (B, N, C), keep (B, N) {0, 1} -> merged kept tokens (B, Lmax, C)
    (padded, left-aligned in raster order) and their mask (B, Lmax) bool. Equals `merge_tokens_ref`
    on the valid rows. No Python loop over images: kept and dropped sets are gathered into padded
    tensors, attention masks their padding."""
    if feats.dim() != 3 or keep.shape != feats.shape[:2]:
        raise InputError(f"feats must be (B, N, C) and keep (B, N), got {tuple(feats.shape)} and {tuple(keep.shape)}")
    impl = impl or merger.attn_impl
    sel = keep > 0.5
    if bool((sel.sum(-1) == 0).any()):
        raise InputError("an image keeps no token: select_tokens keeps at least one per image")
    x, valid = _gather(feats, sel)
    x = x * valid[..., None].to(x.dtype)
    dropped_any = (~sel).any(-1)  # (B,)
    # the dropped set; an image with none attends uniformly to all its tokens (upstream's edge case)
    drop_mask = torch.where(dropped_any[:, None], ~sel, torch.ones_like(sel))
    dropped, dvalid = _gather(merger.ln_vision(feats), drop_mask)
    zero_q = (~dropped_any)[:, None, None, None]
    for blk in merger.blocks:
        att = blk.token_causal_attn
        q, k, v = att.split(blk.norm0(x))
        x = x + att.proj(_merge_heads(qformer_attention(q, k, v, causal=True, key_padding_mask=valid, impl=impl)))
        ca = blk.token_cross_attn
        qc = ca.heads_of(ca.query(blk.norm1(x)))
        qc = torch.where(zero_q, torch.zeros_like(qc), qc)
        kc, vc = ca.heads_of(ca.key(dropped)), ca.heads_of(ca.value(dropped))
        x = x + ca.proj(_merge_heads(qformer_attention(qc, kc, vc, key_padding_mask=dvalid, impl=impl)))
        x = x + blk.mlp(blk.norm2(x))
    return merger.norm(x) * valid[..., None].to(x.dtype), valid


# ------------------------------------------------------------------------------------- tokenizer
class CodebookEmbedding(nn.Module):
    def __init__(self, k: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(k, d), dim=-1))


class CosineQuantizer(nn.Module):
    def __init__(self, k: int, d: int):
        super().__init__()
        self.embedding = CodebookEmbedding(k, d)


class LavitTokenizer(nn.Module):
    """Images -> variable-length code sequences (see the module docstring)."""

    def __init__(self, cfg: LavitConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.encoder = EvaViT(cfg.vision)
        self.token_predictor = TokenPredictor(w)
        self.causal_encoder = TokenMerger(w, cfg.heads, cfg.merger_depth, cfg.mlp_hidden)
        self.quantize = CosineQuantizer(cfg.codebook_size, cfg.code_dim)
        self.encode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, cfg.code_dim))
        self.vit_proj = nn.Linear(w, cfg.llm_dim)

    @classmethod
    def from_config(cls, name: str = "tiny-lavit", *, seed: int = 0) -> "LavitTokenizer":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(get_lavit_config(name))

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    def features(self, images) -> torch.Tensor:
        """Images -> ViT features (B, N, C): the last block, no final norm, CLS dropped."""
        x = images_to_tensor(images, self.config.vision.image_size).to(self.device)
        x = normalize(x, self.config.image_mean, self.config.image_std)
        return self.encoder(x.to(self.quantize.embedding.weight.dtype))[:, 1:]

    def select(self, feats: torch.Tensor, mode: str = "expected", **kwargs) -> torch.Tensor:
        return select_tokens(self.token_predictor(feats), mode, **kwargs)

    def merged(self, feats: torch.Tensor, keep: torch.Tensor, impl: str | None = None):
        return merge_tokens(self.causal_encoder, feats, keep, impl)

    def codes_from_merged(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, C) merged tokens -> codes (B, L) int64, -1 at padding."""
        z = self.encode_task_layer(tokens)
        codes, _ = codebook_lookup(z, self.quantize.embedding.weight, metric="cosine")
        return codes.masked_fill(~valid, -1)

    @torch.no_grad()
    def encode(self, images, *, mode: str = "expected", **select_kwargs) -> list[torch.Tensor]:
        """Images -> one int64 code tensor per image (its length varies). mode as in select_tokens
        (default "expected": deterministic; "gumbel" reproduces upstream's sampling)."""
        feats = self.features(images)
        keep = self.select(feats, mode, **select_kwargs)
        tokens, valid = self.merged(feats, keep)
        codes = self.codes_from_merged(tokens, valid)
        return [c[v] for c, v in zip(codes.cpu(), valid.cpu())]

    def load_official(self, state_dict: dict, *, strict: bool = False):
        """Load a released `tokenizer_encoder.bin` state dict (plus `encoder.*` ViT keys if present).
        Returns the LoadReport-style (missing, unexpected) lists; strict=True raises on either."""

        own = self.state_dict()
        bad = {
            k: (tuple(v.shape), tuple(own[k].shape))
            for k, v in state_dict.items()
            if k in own and v.shape != own[k].shape
        }
        if bad:
            k = next(iter(bad))
            raise CheckpointError(
                f"{len(bad)} tensor(s) of the wrong shape, e.g. {k}: file {bad[k][0]}, model {bad[k][1]} "
                f"(preset {self.config.name!r})"
            )
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"missing keys {missing[:5]} ({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})"
            )
        return list(missing), list(unexpected)


def lavit_token_ids(
    codes: list[torch.Tensor], *, img_id: int = IMG_ID, end_id: int = END_IMG_ID, offset: int = CODE_OFFSET
) -> list[list[int]]:
    """Per image: [IMG], codes + offset, [/IMG] (LaVIT's LLaMA ids)."""
    return [[img_id] + [int(c) + offset for c in cs] + [end_id] for cs in codes]


def pad_codes(codes: list[torch.Tensor], pad: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length codes -> (B, Lmax) int64 padded with `pad`, and the valid mask."""
    if not codes:
        raise InputError("no code sequences given")
    lmax = max(1, max(len(c) for c in codes))
    out = torch.full((len(codes), lmax), pad, dtype=torch.long)
    for i, c in enumerate(codes):
        out[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    return out, out != pad


# -------------------------------------------------------------------------------------- decoder
class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = CausalSelfAttention(dim, heads)  # same layout (qkv + proj), used unmasked
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_hidden)


class LavitFeatureDecoder(nn.Module):
    """Codes (variable length, padded) -> the 256 ViT features: 256 learned queries self-attend and
    cross-attend to the code vectors (l2-normalized codebook rows -> in_proj + pos_embed by position)."""

    def __init__(self, cfg: LavitConfig):
        super().__init__()
        w, n = cfg.width, cfg.num_patches
        self.config = cfg
        self.in_proj = nn.Linear(cfg.code_dim, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, w))
        self.query_embed = nn.Parameter(torch.zeros(1, n, w))
        self.blocks = nn.ModuleList(DecoderBlock(w, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(w, eps=1e-5)
        self.decode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w))
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.query_embed, std=0.02)

    def forward(self, code_vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """code_vectors (B, L, code_dim), valid (B, L) bool -> features (B, 256, width)."""
        b, length, _ = code_vectors.shape
        if length > self.pos_embed.shape[1]:
            raise InputError(f"{length} codes per image, the decoder takes at most {self.pos_embed.shape[1]}")
        mem = self.in_proj(code_vectors) + self.pos_embed[:, :length]
        x = self.query_embed.expand(b, -1, -1)
        for blk in self.blocks:
            q, k, v = blk.self_attn.split(blk.norm0(x))
            x = x + blk.self_attn.proj(_merge_heads(qformer_attention(q, k, v)))
            ca = blk.cross_attn
            qc, kc, vc = ca.heads_of(ca.query(blk.norm1(x))), ca.heads_of(ca.key(mem)), ca.heads_of(ca.value(mem))
            x = x + ca.proj(_merge_heads(qformer_attention(qc, kc, vc, key_padding_mask=valid)))
            x = x + blk.mlp(blk.norm2(x))
        return self.decode_task_layer(self.norm(x))


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between reconstructed and ViT features, averaged over patches."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
