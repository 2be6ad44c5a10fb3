"""VW-LMM stage: a continuous image connector whose patches are supervised as visual words
(VW-LMM, arXiv 2403.07720), trained on the same image-caption data as SEED.

The image's features (the frozen ViT's patches, or SEED's 32 continuous Q-Former embeddings) go
through a projector (`vwlmm.projector`: "linear", or "mlp" = Linear-GELU-Linear) into the LM's
embedding space and take the place of the template's `<image>`, between the LM's `<img>` and
`</img>` tokens. With the embedded model's "seed-opt" template a training sequence is

    [bos] <img> p_1 ... p_P </img> a photo of <caption> eos

`vm_head` (`seed_fast.models.related.visual_words`) maps each projected patch to its visual word, a
distribution over the text vocabulary. The loss is the caption's cross-entropy plus `kl_weight` x
KL(visual word of patch t+1 || the LM's prediction at patch t). As upstream, the visual words are not
detached: vm_head and the projector learn from both terms. `variant: "pif"` feeds the LM the pseudo
image features softmax(vm_head(p)) @ E_text instead of the projected patches. The LM and the vision
encoder stay frozen; the projector and vm_head train.

`vwlmm.lm` and `vwlmm.vit_from` name the frozen LM and tokenizer, as in the Flamingo stage. Given the
embedded default model's, `seed-fast eval --vwlmm RUN` compares SEED's captions from 32 codes with
captions from continuous features through a frozen copy of the very same LM.

    seed-fast train vwlmm --config run.json        -> run/vwlmm/{weights.safetensors,config.json}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..models.related.visual_words import VisualWordsLM, build_visual_words_lm, patch_features
from ..synthetic import caption_scores
from .config import TrainConfig
from .data import make_collate
from .sources import make_source
from .task import Task, frozen_lm_and_tokenizer


class VwlmmModule(nn.Module):
    def __init__(self, vw: VisualWordsLM, tok, media: str, kl_weight: float):
        super().__init__()
        self.vw = vw
        self._frozen = (tok,)
        self.media, self.kl_weight = media, float(kl_weight)

    def forward(self, batch) -> dict:
        if len(batch) == 0:
            zero = sum(p.sum() * 0 for p in self.vw.parameters())
            return {"loss": zero}
        with torch.no_grad():
            feats = patch_features(self._frozen[0], batch.pixels, self.media)
        ce, n, kl = self.vw.losses(feats, batch.captions)
        caption = ce / n.clamp_min(1)
        return {"loss": caption + self.kl_weight * kl, "caption_loss": caption.detach(), "kl": kl.detach()}


class VwlmmTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        vc = cfg.vwlmm
        lm_dir, tok_dir, self.llm, self.tok = frozen_lm_and_tokenizer("vwlmm", vc.lm, vc.vit_from, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vw = build_visual_words_lm(self.llm, self.tok, asdict(vc))
        self.module = VwlmmModule(vw.to(device), self.tok, vc.media, vc.kl_weight)
        self.image_size = self.tok.config.vision.image_size
        self.sources = {"lm": str(lm_dir), "vit_from": str(tok_dir)}

    def keeps(self, key: str) -> bool:
        return key.startswith("vw.")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out caption loss and visual-word KL, and greedy captions judged by the scene grammar."""
        ds = make_source(self.cfg, "val")
        n = min(len(ds), self.cfg.data.val_n, max(self.cfg.vwlmm.eval_n, 0))
        if n == 0:
            return {}
        collate = make_collate(self.image_size)
        vw = self.module.vw
        ce = tokens = kl = 0.0
        preds, truth = [], []
        vw.eval()
        try:
            for i in range(0, n, 32):
                batch = collate([ds[j] for j in range(i, min(n, i + 32))])
                if len(batch) == 0:
                    continue
                feats = patch_features(self.tok, batch.pixels, self.cfg.vwlmm.media)
                c, t, k = vw.losses(feats, batch.captions)
                ce, tokens, kl = ce + float(c), tokens + float(t), kl + float(k) * len(batch)
                preds += vw.captions(feats, max_new_tokens=self.cfg.vwlmm.max_new_tokens)
                truth += batch.captions
        finally:
            vw.train()
        return {
            "val_caption_loss": ce / max(tokens, 1),
            "val_kl": kl / max(len(truth), 1),
            **caption_scores(preds, truth),
        }

    def export(self, run: Path) -> None:
        from safetensors.torch import save_file

        out = run / "vwlmm"
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in self.module.vw.state_dict().items()}
        save_file(sd, str(out / "weights.safetensors"))
        meta = {
            "format": 1,
            **self.sources,
            **{k: v for k, v in asdict(self.cfg.vwlmm).items() if k not in ("lm", "vit_from")},
        }
        (out / "config.json").write_text(json.dumps(meta, indent=1))
