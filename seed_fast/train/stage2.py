"""Stage II: train the quantizer and de-tokenizer on a frozen ViT + causal Q-Former.

total = vq_weight * VQ + cos_weight * mean(1 - cos(blocks(decode(z_q) + pos_embed), causal_emb))
        + mse_weight * MSE(generation embedding, target image embedding)
(SEED_SPEC section 3: 5, 2 and 0.5), and, given stage I's heads (`stage2.itc_heads`), optionally
        + itc_weight * mean(1 - cos(vision_proj(rebuilt last query), vision_proj(last causal query)))
        + itc_text_weight * InfoNCE(vision_proj(rebuilt last query), stage I's frozen text features)
(not in SEED: they make the codes keep what tells captions apart). The target is a CLIP vision model's
image embedding when
`stage2.target` names a transformers CLIPVisionModelWithProjection folder, or for the synthetic set
a fixed encoder: the image pooled to 8 x 8 and sent through a seeded random projection.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models.preprocess import normalize
from ..models.seed.codebook_utils import codebook_stats, codebook_usage, kmeans_init, restart_dead_codes
from ..models.seed.itc import gather_pairs, load_itc_heads, retrieval_at_k
from ..models.seed.quantizer import Quantizer
from ..ops import vector_quantize
from .config import ConfigError, TrainConfig
from .data import make_collate
from .sources import make_source
from .task import Task, load_tokenizer

TRAINED = ("quantizer.", "detokenizer.", "reconstructor.")


class PixelTarget(nn.Module):
    """A frozen stand-in for CLIP on synthetic images: 8 x 8 pooled RGB -> seeded projection ->
    unit norm * sqrt(out_dim) (so each value is about 1 in size)."""

    def __init__(self, out_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 64, out_dim, generator=g) / 8.0)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(pixels.float(), 8).flatten(1) - 0.5  # (B, 192)
        y = x @ self.proj
        return F.normalize(y, dim=-1) * y.shape[-1] ** 0.5


class ClipTarget(nn.Module):
    def __init__(self, folder: str, image_mean, image_std):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.model = (
            CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        )
        self.mean, self.std = image_mean, image_std
        self.size = self.model.config.image_size

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(pixels.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = normalize(x, self.mean, self.std).to(self.model.dtype)
        return self.model(pixel_values=x).image_embeds.float()


class ItcTarget(nn.Module):
    """The stage-I image feature as the generation target, for tokenizers that serve as their own
    CLIP (the embedded model): the last causal query -> stage I's `vision_proj` -> unit norm *
    sqrt(dim). It reads the frozen causal embeddings stage II computes anyway, not pixels."""

    uses_causal = True

    def __init__(self, vision_proj: nn.Linear):
        super().__init__()
        self.proj = vision_proj

    @torch.no_grad()
    def forward(self, causal: torch.Tensor) -> torch.Tensor:
        y = self.proj(causal[:, -1]).float()
        return F.normalize(y, dim=-1) * y.shape[-1] ** 0.5


class Stage2Module(nn.Module):
    def __init__(self, tok, target: nn.Module, s2, itc_proj: nn.Linear | None = None, itc_heads=None):
        super().__init__()
        self.tok, self.target, self.w = tok, target, s2
        self.itc_proj = itc_proj  # stage I's vision_proj (frozen), for the retrieval-feature losses
        # stage I's text branch (frozen) for the contrastive loss; a plain attribute, not a submodule,
        # so its copy of the tokenizer stays out of this module's parameters and state dict
        self.__dict__["_itc_heads"] = itc_heads
        if s2.itc_text_queue > 0:  # earlier captions' text features and caption ids: a ring, checkpointed
            dim = itc_proj.out_features
            self.register_buffer("text_queue", torch.zeros(s2.itc_text_queue, dim))
            self.register_buffer("text_queue_ids", torch.full((s2.itc_text_queue,), -1, dtype=torch.long))
            self.register_buffer("text_queue_next", torch.zeros((), dtype=torch.long))
        self.last_z: torch.Tensor | None = None
        self.last_codes: torch.Tensor | None = None

    def forward(self, batch) -> dict:
        tok = self.tok
        if len(batch) == 0:  # every sample was unreadable: a zero loss that still touches every parameter
            zero = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
            return {"loss": zero, "vq": zero.detach(), "cos": zero.detach(), "mse": zero.detach()}
        pixels = batch.pixels.to(tok.device)
        with torch.no_grad():
            x = normalize(pixels, tok.config.image_mean, tok.config.image_std).to(tok.dtype)
            causal = tok.causal_embeddings(x)  # (B, 32, hidden), frozen
        z = tok.quantizer.encode_task_layer(causal)  # (B, 32, code_dim)
        z_st, codes, vq = vector_quantize(z, tok.quantizer.codebook.weight, tok.config.quantizer.beta)
        dec = tok.quantizer.decode_task_layer(z_st)  # (B, 32, hidden)
        recon = tok.reconstructor(dec)
        cos = (1 - F.cosine_similarity(recon.float(), causal.float(), dim=-1)).mean()
        gen = tok.detokenizer(dec)
        target = self.target(causal) if getattr(self.target, "uses_causal", False) else self.target(pixels)
        mse = F.mse_loss(gen.float(), target)
        loss = self.w.vq_weight * vq + self.w.cos_weight * cos + self.w.mse_weight * mse
        parts = {"vq": vq.detach(), "cos": cos.detach(), "mse": mse.detach()}
        if self.w.itc_weight > 0:
            # the retrieval feature rebuilt from codes (last query -> vision_proj) against the continuous one
            f_rec = self.itc_proj(recon[:, -1]).float()
            if getattr(self.target, "uses_causal", False):
                f_ref = target  # the same projection, scaled: the cosine does not see the scale
            else:
                with torch.no_grad():
                    f_ref = self.itc_proj(causal[:, -1]).float()
            itc = (1 - F.cosine_similarity(f_rec, f_ref, dim=-1)).mean()
            loss = loss + self.w.itc_weight * itc
            parts["itc"] = itc.detach()
        if self.w.itc_text_weight > 0:
            itc_text = self._text_contrastive(recon[:, -1], batch.captions)
            loss = loss + self.w.itc_text_weight * itc_text
            parts["itc_text"] = itc_text.detach()
        self.last_z, self.last_codes = z.detach(), codes.detach()
        return {"loss": loss, **parts}

    def _text_contrastive(self, last: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Stage I's symmetric InfoNCE (its temperature, label smoothing 0.1), the image side read
        from the codes; the text side is frozen. Under torchrun every rank's texts are negatives."""
        heads = self._itc_heads
        img = F.normalize(self.itc_proj(last).float(), dim=-1)
        with torch.no_grad():
            txt = heads.encode_text(captions)
            temp = heads.temp.detach().float().clamp(0.001, 0.5)
        all_img, all_txt, offset = gather_pairs(img, txt)
        labels = torch.arange(img.shape[0], device=img.device) + offset
        i2t_logits = img @ all_txt.t() / temp
        if self.w.itc_text_queue > 0:
            ids = _caption_ids(captions, img.device)
            all_ids = ids
            if dist.is_initialized() and dist.get_world_size() > 1:
                parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, ids)
                all_ids = torch.cat(parts)
            # queued captions equal to the sample's own, and empty slots, are not negatives
            ok = (self.text_queue_ids[None, :] >= 0) & (self.text_queue_ids[None, :] != ids[:, None])
            queue_logits = img @ self.text_queue.clone().t() / temp  # a copy: the queue is updated below
            i2t = _smoothed_ce(
                torch.cat([i2t_logits, queue_logits], 1),
                labels,
                torch.cat([torch.ones_like(i2t_logits, dtype=torch.bool), ok], 1),
                0.1,
            )
            self._enqueue(all_txt, all_ids)
        else:
            i2t = F.cross_entropy(i2t_logits, labels, label_smoothing=0.1)
        t2i = F.cross_entropy(txt @ all_img.t() / temp, labels, label_smoothing=0.1)
        return (i2t + t2i) / 2

    @torch.no_grad()
    def _enqueue(self, feats: torch.Tensor, ids: torch.Tensor) -> None:
        q = self.text_queue.shape[0]
        feats, ids = feats[-q:], ids[-q:]  # a batch larger than the queue keeps its last captions
        slots = (self.text_queue_next + torch.arange(len(ids), device=ids.device)) % q
        self.text_queue[slots] = feats.to(self.text_queue.dtype)
        self.text_queue_ids[slots] = ids
        self.text_queue_next.copy_((self.text_queue_next + len(ids)) % q)


def _caption_ids(captions: list[str], device) -> torch.Tensor:
    """A stable 63-bit id per caption string (the same in every process)."""
    import hashlib

    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1 for c in captions],
        dtype=torch.long,
        device=device,
    )


def _smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy with label smoothing `eps` spread over the valid classes of each row only
    (torch's label_smoothing when every class is valid)."""
    logp = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    smooth = -logp.masked_fill(~valid, 0.0).sum(1) / valid.sum(1)
    return ((1 - eps) * nll + eps * smooth).mean()


def reshape_quantizer(tok, codebook_size: int | None, code_dim: int | None, *, seed: int = 0) -> bool:
    """Give `tok` a quantizer of the requested shape (None keeps that dimension), freshly initialized
    from `seed`; its config follows, so the saved tokenizer records the new shape. Returns whether
    anything changed (the same shape keeps the tokenizer's quantizer and its weights)."""
    import dataclasses

    old = tok.config.quantizer
    new = dataclasses.replace(old, codebook_size=codebook_size or old.codebook_size, code_dim=code_dim or old.code_dim)
    if new == old:
        return False
    ref = next(tok.quantizer.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q = Quantizer(new, tok.config.qformer.hidden)
        q.reset_codebook()
    tok.quantizer = q.to(device=ref.device, dtype=ref.dtype)
    tok.config.quantizer = new
    return True


class Stage2Task(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):

        self.cfg = cfg
        tok = load_tokenizer(cfg)
        if tok.reconstructor is None:
            raise ConfigError(
                "stage 2 needs the reconstruction head: the tokenizer config has reconstruction_blocks=False"
            )
        reshape_quantizer(tok, cfg.stage2.codebook_size, cfg.stage2.code_dim, seed=cfg.seed)
        tok = tok.to(device)
        tok.requires_grad_(False)
        for name, p in tok.named_parameters():
            if name.startswith(TRAINED):
                p.requires_grad_(True)
        out_dim = tok.config.detokenizer.out_dim
        s2 = cfg.stage2
        self.itc = None
        if s2.itc_heads:  # stage I's text branch and projections: retrieval with codes at evaluation
            self.itc = load_itc_heads(tok, s2.itc_heads)
        if s2.target == "pixels":
            target = PixelTarget(out_dim, seed=cfg.seed)
        elif s2.target == "itc":
            if self.itc is None:
                raise ConfigError(
                    "stage2.target 'itc' needs stage2.itc_heads (the stage-I run whose vision_proj it uses)"
                )
            proj_dim = self.itc.vision_proj.out_features
            if proj_dim != out_dim:
                raise ConfigError(
                    f"stage2.target 'itc': stage I's vision_proj gives {proj_dim} dims "
                    f"but detokenizer.out_dim is {out_dim}"
                )
            target = ItcTarget(self.itc.vision_proj)
        else:
            target = ClipTarget(s2.target, tok.config.image_mean, tok.config.image_std)
        self.tok = tok
        if s2.itc_weight > 0 and self.itc is None:
            raise ConfigError("stage2.itc_weight needs stage2.itc_heads (the stage-I run whose vision_proj it uses)")
        if s2.itc_text_weight > 0 and self.itc is None:
            raise ConfigError(
                "stage2.itc_text_weight needs stage2.itc_heads (the stage-I run whose text branch it uses)"
            )
        if self.itc is not None:
            self.itc.requires_grad_(False)
            for name, p in tok.named_parameters():  # the heads hold the same tokenizer: keep its trained parts
                if name.startswith(TRAINED):
                    p.requires_grad_(True)
        proj = self.itc.vision_proj if self.itc is not None else None
        self.module = Stage2Module(tok, target.to(device), s2, proj, self.itc)
        self.image_size = tok.config.vision.image_size

    def keeps(self, key: str) -> bool:
        return key.startswith(tuple("tok." + t for t in TRAINED)) or key.startswith("text_queue")

    def _sync_codebook(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.tok.quantizer.codebook.weight.data, src=0)

    def on_first_batch(self, batch) -> None:
        if self.cfg.stage2.codebook_init != "kmeans" or len(batch) == 0:
            return
        with torch.no_grad():
            self.module(batch)
            z = self.module.last_z.flatten(0, 1).float()
            k = self.tok.codebook_size
            if z.shape[0] < k:
                raise ConfigError(
                    f"k-means init needs at least {k} vectors; the first batch gives {z.shape[0]} (raise global_batch)"
                )
            self.tok.quantizer.codebook.weight.copy_(kmeans_init(z, k, seed=self.cfg.seed))
        self._sync_codebook()

    def on_step_end(self, step: int, batch, out: dict) -> None:
        every = self.cfg.stage2.restart_dead_every
        if not every or step % every or self.module.last_codes is None:
            return
        counts = codebook_usage(self.module.last_codes, self.tok.codebook_size)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        with torch.no_grad():
            restart_dead_codes(
                self.tok.quantizer.codebook.weight, counts, self.module.last_z.flatten(0, 1), seed=self.cfg.seed + step
            )
        self._sync_codebook()

    def evaluate(self) -> dict[str, float]:
        d = self.cfg.data
        ds = make_source(self.cfg, "val")
        n = min(len(ds), d.val_n)
        collate = make_collate(self.image_size)
        codes, cos, mse, tcos, caps, f_code, f_cont, f_txt = [], [], [], [], [], [], [], []
        for i in range(0, n, 32):
            batch = collate([ds[j] for j in range(i, min(n, i + 32))])
            if len(batch) == 0:
                continue
            tok = self.tok
            pixels = batch.pixels.to(tok.device)
            x = normalize(pixels, tok.config.image_mean, tok.config.image_std).to(tok.dtype)
            causal = tok.causal_embeddings(x)
            c = tok.quantizer.lookup(causal)
            dec = tok.quantizer.embed(c)
            recon = tok.reconstructor(dec)
            gen = tok.detokenizer(dec).float()
            tgt = self.module.target
            target = tgt(causal) if getattr(tgt, "uses_causal", False) else tgt(pixels)
            codes.append(c)
            if self.itc is not None:
                caps += batch.captions
                f_code.append(F.normalize(self.itc.vision_proj(recon[:, -1]).float(), dim=-1))
                f_cont.append(F.normalize(self.itc.vision_proj(causal[:, -1]).float(), dim=-1))
                f_txt.append(self.itc.encode_text(batch.captions))
            cos.append(F.cosine_similarity(recon.float(), causal.float(), dim=-1).mean(-1))
            tcos.append(F.cosine_similarity(gen, target, dim=-1))
            mse.append(((gen - target) ** 2).mean(-1))
        if not codes:
            return {}
        stats = codebook_stats(torch.cat(codes), self.tok.codebook_size)
        extra = {}
        if caps:  # SEED's protocol: image features from the codes (decoded, reconstructed, last query)
            txt = torch.cat(f_txt)
            for name, feats in (("code", f_code), ("embed", f_cont)):
                r = retrieval_at_k(torch.cat(feats), txt, caps)
                extra.update({f"val_{name}_{k}": v for k, v in r.items() if k != "chance_r1"})
            extra["val_chance_r1"] = r["chance_r1"]
        return {
            **extra,
            "val_recon_cos": float(torch.cat(cos).mean()),
            "val_target_cos": float(torch.cat(tcos).mean()),
            "val_mse": float(torch.cat(mse).mean()),
            "val_codebook_usage": float(stats["usage_fraction"]),
            "val_perplexity": float(stats["perplexity"]),
            "val_dead_codes": int(stats["dead"]),
        }

    def export(self, run: Path) -> None:
        self.tok.save_pretrained(run / "tokenizer")
