"""Flamingo stage: train the continuous baseline connector on the same image-caption data as SEED.

The LM and the vision encoder are frozen; only the connector (Perceiver Resampler + tanh-gated
cross-attention blocks, `seed_fast.models.related.flamingo`) trains. A sequence is the caption prompt (the
LM's template caption turn without the image, e.g. "a photo of") followed by the caption and eos; the
loss is on the caption and eos only. The image reaches the LM only through cross-attention.

Media (`flamingo.media`):
  vit      the frozen ViT's patch features (B, 1 + N, width), what Flamingo resamples
  qformer  SEED's 32 causal Q-Former embeddings before quantization (B, 32, D): the same features
           SEED's codes are cut from, so codes vs continuous is compared on one representation

`flamingo.lm` and `flamingo.vit_from` name the frozen LM and tokenizer. Given the embedded default
model's (its `llm/` and `tokenizer/`), a run on the synthetic data compares discrete codes (the
shipped LLM's captions from codes) with continuous features through a frozen copy of the very same LM.

    seed-fast train flamingo --config run.json        -> run/flamingo/{connector.safetensors,config.json}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..models.related.connector import IGNORE
from ..models.related.flamingo import CaptionSequences, FlamingoConnector, FlamingoModule, flamingo_captions
from ..synthetic import caption_scores
from .config import TrainConfig
from .data import make_collate
from .sources import make_source
from .task import Task, frozen_lm_and_tokenizer


class FlamingoTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        fc = cfg.flamingo
        lm_dir, tok_dir, self.llm, self.tok = frozen_lm_and_tokenizer("flamingo", fc.lm, fc.vit_from, device)
        media_dim = self.tok.config.vision.width if fc.media == "vit" else self.tok.config.qformer.hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            conn = FlamingoConnector(
                self.llm.model,
                media_dim,
                every=fc.every,
                num_latents=fc.num_latents,
                resampler_depth=fc.resampler_depth,
            )
        self.seqs = CaptionSequences(self.llm, fc.prompt)
        self.module = FlamingoModule(conn.to(device), self.tok, self.seqs, fc.media)
        self.image_size = self.tok.config.vision.image_size
        self.sources = {"lm": str(lm_dir), "vit_from": str(tok_dir)}

    def keeps(self, key: str) -> bool:
        return key.startswith("connector.")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out caption loss, and greedy captions judged by the scene grammar (every object's
        color and shape right), as `seed-fast eval` judges the SEED LLM's captions."""
        ds = make_source(self.cfg, "val")
        n = min(len(ds), self.cfg.data.val_n, max(self.cfg.flamingo.eval_n, 0))
        if n == 0:
            return {}
        collate = make_collate(self.image_size)
        tot = cnt = 0.0
        preds, truth = [], []
        self.module.connector.eval()
        try:
            for i in range(0, n, 32):
                batch = collate([ds[j] for j in range(i, min(n, i + 32))])
                if len(batch) == 0:
                    continue
                ce, target = self.module.token_losses(batch.pixels, batch.captions)
                tot, cnt = tot + float(ce.sum()), cnt + float((target != IGNORE).sum())
                preds += flamingo_captions(
                    self.module.connector,
                    self.llm,
                    self.tok,
                    batch.pixels,
                    self.seqs,
                    self.cfg.flamingo.media,
                    max_new_tokens=self.cfg.flamingo.max_new_tokens,
                )
                truth += batch.captions
        finally:
            self.module.connector.train()
        return {"val_caption_loss": tot / max(cnt, 1), **caption_scores(preds, truth)}

    def export(self, run: Path) -> None:
        from safetensors.torch import save_file

        out = run / "flamingo"
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in self.module.connector.state_dict().items()}
        save_file(sd, str(out / "connector.safetensors"))
        meta = {
            "format": 1,
            **self.sources,
            **{k: v for k, v in asdict(self.cfg.flamingo).items() if k not in ("lm", "vit_from")},
            "media_dim": int(self.module.connector.resampler.media_proj.in_features),
        }
        (out / "config.json").write_text(json.dumps(meta, indent=1))
