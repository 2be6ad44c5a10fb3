"""LaVIT stage: train the dynamic tokenizer (selector, merger, cosine quantizer, feature decoder)
over a frozen ViT.

loss = (1 - cos(decoder(codes), ViT features))          reconstruct all 256 (N) patch features
       + keep_weight * (keep_ratio - fraction kept)^2    per image, the selector's budget
       + vq_weight * (|sg[z] - e|^2 + 0.25 |z - sg[e]|^2) on l2-normalized z and codes e

Selection is Gumbel-softmax hard (straight-through) in training and deterministic ("expected": the
round(sum p(keep)) most likely patches) at evaluation. The codebook starts from cosine k-means of the
first batch's vectors and dead codes are restarted from recent vectors (`lavit.codebook_init`,
`lavit.restart_dead_every`), as stage II does. `lavit.vit_from` takes the ViT of a SeedTokenizer folder
(the embedded model's
tokenizer for the `mini-lavit` preset), as LaVIT starts from a pretrained EVA-CLIP.

    seed-fast train lavit --config run.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models import SeedTokenizer
from ..models.related.lavit import (
    LavitFeatureDecoder,
    LavitTokenizer,
    get_lavit_config,
    keep_ratio_loss,
    reconstruction_loss,
    select_tokens,
)
from ..models.seed.codebook_utils import codebook_usage, kmeans_init, restart_dead_codes
from ..ops import codebook_lookup
from .config import ConfigError, TrainConfig
from .data import make_collate
from .sources import make_source
from .task import Task


class LavitModule(nn.Module):
    def __init__(self, tok: LavitTokenizer, decoder: LavitFeatureDecoder, lcfg):
        super().__init__()
        self.tok, self.decoder, self.lcfg = tok, decoder, lcfg
        self.last_z = self.last_codes = None
        cfg = tok.config
        self.keep_ratio = cfg.keep_ratio if lcfg.keep_ratio is None else lcfg.keep_ratio
        self.keep_weight = cfg.keep_weight if lcfg.keep_weight is None else lcfg.keep_weight

    def quantize(self, merged: torch.Tensor, valid: torch.Tensor):
        """merged tokens -> (straight-through unit code vectors, codes, VQ loss over valid tokens)."""
        z = F.normalize(self.tok.encode_task_layer(merged).float(), dim=-1)
        book = F.normalize(self.tok.quantize.embedding.weight.float(), dim=-1)
        codes, _ = codebook_lookup(z.detach(), book.detach(), metric="cosine")
        self.last_z, self.last_codes = z.detach()[valid], codes[valid]
        e = book[codes]
        m = valid[..., None].float()
        n = m.sum().clamp_min(1.0) * z.shape[-1]
        vq = (((z.detach() - e) ** 2 * m).sum() + 0.25 * ((z - e.detach()) ** 2 * m).sum()) / n
        return z + (e - z).detach(), codes, vq

    def forward(self, batch, mode: str = "gumbel") -> dict:
        tok = self.tok
        if len(batch) == 0:
            zero = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
            return {"loss": zero}
        with torch.no_grad():
            feats = tok.features(batch.pixels)
        # Gumbel noise from torch's global generator: the loop checkpoints it, so a resumed run draws the same
        keep = select_tokens(tok.token_predictor(feats), mode, tau=self.lcfg.tau)
        merged, valid = tok.merged(feats, keep)
        zq, _, vq = self.quantize(merged, valid)
        recon = self.decoder(zq, valid)
        rec = reconstruction_loss(recon, feats)
        kl = keep_ratio_loss(keep, self.keep_ratio, self.keep_weight)
        loss = rec + kl + self.lcfg.vq_weight * vq
        return {
            "loss": loss,
            "recon": rec.detach(),
            "keep_loss": kl.detach(),
            "vq": vq.detach(),
            "kept": keep.detach().mean(),
            "tokens": valid.sum(-1).float().mean(),
        }


class LavitTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        lc = cfg.lavit
        try:
            lav_cfg = get_lavit_config(lc.preset)
        except ValueError as e:
            raise ConfigError(f"lavit.preset: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            tok = LavitTokenizer(lav_cfg)
            decoder = LavitFeatureDecoder(lav_cfg)
        if lc.vit_from:
            self.vit_report = _load_vit(tok, lc.vit_from)
        tok.encoder.requires_grad_(False).eval()
        tok.vit_proj.requires_grad_(False)  # the understanding head is trained with the LLM, not here
        self.tok = tok.to(device)
        self.module = LavitModule(self.tok, decoder.to(device), lc)
        self.image_size = lav_cfg.vision.image_size

    def keeps(self, key: str) -> bool:
        return not key.startswith(("tok.encoder.", "tok.vit_proj."))

    def _sync_codebook(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.tok.quantize.embedding.weight.data, src=0)

    def on_first_batch(self, batch) -> None:
        lc = self.cfg.lavit
        if lc.codebook_init not in ("kmeans", "random"):
            raise ConfigError(f"lavit.codebook_init must be 'kmeans' or 'random', got {lc.codebook_init!r}")
        if lc.codebook_init != "kmeans" or len(batch) == 0:
            return

        with torch.no_grad():
            self.module(batch)
            book = kmeans_init(
                self.module.last_z.float(), self.tok.config.codebook_size, seed=self.cfg.seed, metric="cosine"
            )
            self.tok.quantize.embedding.weight.copy_(F.normalize(book, dim=-1))
        self._sync_codebook()

    def on_step_end(self, step: int, batch, out: dict) -> None:
        every = self.cfg.lavit.restart_dead_every
        if not every or step % every or self.module.last_codes is None:
            return
        import torch.distributed as dist

        counts = codebook_usage(self.module.last_codes, self.tok.config.codebook_size)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        with torch.no_grad():
            restart_dead_codes(
                self.tok.quantize.embedding.weight, counts, self.module.last_z, seed=self.cfg.seed + step
            )
        self._sync_codebook()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        ds = make_source(self.cfg, "val")
        n = min(len(ds), self.cfg.data.val_n)
        collate = make_collate(self.image_size)
        stats = {"recon": 0.0, "kept": 0.0, "tokens": 0.0}
        seen = 0
        used = set()
        for i in range(0, n, 64):
            batch = collate([ds[j] for j in range(i, min(n, i + 64))])
            if len(batch) == 0:
                continue
            out = self.module(batch, mode="expected")
            k = len(batch)
            for key in stats:
                stats[key] += float(out[key]) * k
            seen += k
            codes = self.tok.encode(batch.pixels)
            used.update(int(c) for cs in codes for c in cs)
        if not seen:
            return {}
        res = {f"val_{k}": v / seen for k, v in stats.items()}
        res["val_codebook_usage"] = len(used) / self.tok.config.codebook_size
        return res

    def export(self, run: Path) -> None:
        from safetensors.torch import save_file

        out = run / "lavit"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tok.state_dict().items()}, str(out / "tokenizer.safetensors"))
        save_file(
            {k: v.contiguous() for k, v in self.module.decoder.state_dict().items()}, str(out / "decoder.safetensors")
        )
        (out / "config.json").write_text(json.dumps({"preset": self.cfg.lavit.preset}, indent=1))


def _load_vit(tok: LavitTokenizer, folder: str) -> dict:
    """The ViT of a SeedTokenizer folder into the LaVIT tokenizer's `encoder` (same EVA layout)."""

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"lavit.vit_from must be a SeedTokenizer folder, got {folder!r}")
    src = SeedTokenizer.from_pretrained(path)
    sd = src.vision.state_dict()
    own = tok.encoder.state_dict()
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in sd):
        raise ConfigError(
            f"lavit.vit_from: the ViT of {folder} ({src.config.name}: width {src.config.vision.width}, "
            f"depth {src.config.vision.depth}) does not fit preset {tok.config.name!r}"
        )
    tok.encoder.load_state_dict(sd)
    return {"loaded": len(sd), "from": str(path)}
