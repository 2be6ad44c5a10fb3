"""VW-LMM stage: a continuous image connector whose patches are supervised as visual words
(VW-LMM, arXiv 2403.07720), trained on the same image-caption data as SEED.

The image's features (the frozen ViT's patches, or SEED's 32 continuous Q-Former embeddings) go
through a projector (`vwlmm.projector`: "linear", or "mlp" = Linear-GELU-Linear) into the LM's
embedding space and take the place of the template's `<image>`, between the LM's `<img>` and
`</img>` tokens. With the embedded model's "seed-opt" template a training sequence is

    [bos] <img> p_1 ... p_P </img> a photo of <caption> eos

`vm_head` (`seed_fast.models.visual_words`) maps each projected patch to its visual word, a
distribution over the text vocabulary. The loss is the caption's cross-entropy plus `kl_weight` x
KL(visual word of patch t+1 || the LM's prediction at patch t). As upstream, the visual words are not
detached: vm_head and the projector learn from both terms. `variant: "pif"` feeds the LM the pseudo
image features softmax(vm_head(p)) @ E_text instead of the projected patches. The LM and the vision
encoder stay frozen; the projector and vm_head train.

Defaults read the embedded default model (its LLM and tokenizer), as the Flamingo stage does, so
`seed-fast eval --vwlmm RUN` compares SEED's captions from 32 codes with captions from continuous
features through a frozen copy of the very same LM.

    seed-fast train vwlmm --config run.json        -> run/vwlmm/{weights.safetensors,config.json}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.hf_compat import output_cache, with_cache
from .config import ConfigError, TrainConfig
from .data import make_collate, make_source
from .flamingo import IGNORE, caption_scores, frozen_lm_and_tokenizer, load_exact, media_features, open_connector_run
from .task import Task


def patch_features(tok, pixels: torch.Tensor, media: str) -> torch.Tensor:
    """pixels -> (B, P, D) float32: the ViT's patch features without its class token, or the 32
    causal Q-Former embeddings."""
    feats = media_features(tok, pixels, media)
    return feats[:, 1:] if media == "vit" else feats


class VisualWordsLM(nn.Module):
    """The trainable projector and vm_head around a frozen SeedLLM (held unregistered, so the state
    dict is the connector's alone)."""

    def __init__(self, llm, media_dim: int, *, projector: str = "mlp", variant: str = "vw", prompt: str | None = None):
        super().__init__()
        from ..models.visual_words import VisualWordHead

        emb = llm.model.get_input_embeddings().weight
        hidden = emb.shape[1]
        if projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(media_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        elif projector == "linear":
            self.projector = nn.Linear(media_dim, hidden)
        else:
            raise ConfigError(f"vwlmm.projector must be 'linear' or 'mlp', got {projector!r}")
        if variant not in ("vw", "pif"):
            raise ConfigError(f"vwlmm.variant must be 'vw' or 'pif', got {variant!r}")
        self.head = VisualWordHead(hidden, llm.vocab.base)  # text words only: the image tokens are not words
        self.variant = variant
        self._llm = (llm,)
        tt = llm.text_tokenizer
        if tt.eos_token_id is None:
            raise ConfigError("the LM's text tokenizer has no eos token; caption sequences need one to end")
        self.eos = tt.eos_token_id
        self.pad = tt.pad_token_id if tt.pad_token_id is not None else self.eos
        turn = llm.template.chat.format(prompt=llm.template.caption if prompt is None else prompt)
        if turn.count("<image>") != 1:
            raise ConfigError(f"the caption prompt needs exactly one <image> placeholder, got {turn!r}")
        before, after = turn.split("<image>")
        bos = [tt.bos_token_id] if llm.template.add_bos and tt.bos_token_id is not None else []
        self.prefix = bos + llm._text_ids(before) + [llm.vocab.boi]
        self.suffix = [llm.vocab.eoi] + llm._text_ids(after)

    @property
    def llm(self):
        return self._llm[0]

    def image_inputs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, P, media_dim) -> (what the LM reads at the image positions (B, P, hidden), the
        visual words (B, P, vocab) fp32)."""
        emb = self.llm.model.get_input_embeddings().weight
        proj = self.projector(feats.to(emb.dtype))
        words = self.head.words(proj)
        if self.variant == "pif":
            return (words @ emb[: self.head.vocab].float()).to(emb.dtype), words
        return proj, words

    def sequences(self, feats: torch.Tensor, captions: list[str] | None = None):
        """-> inputs_embeds (B, T, hidden), attention_mask (B, T), labels (B, T) (IGNORE but on the
        caption and eos), the patches' positions (B, P), visual words (B, P, vocab). Without captions the
        sequences end after the caption prompt, all of one length (what greedy captioning starts from)."""
        llm = self.llm
        b, p = feats.shape[:2]
        x, words = self.image_inputs(feats)
        dev = x.device
        answers = [llm._text_ids(c) + [self.eos] for c in captions] if captions is not None else [[]] * b
        n = len(self.suffix) + max(len(a) for a in answers)
        tail = torch.full((b, n), self.pad, dtype=torch.long)
        tail_mask = torch.zeros(b, n, dtype=torch.long)
        tail_labels = torch.full((b, n), IGNORE, dtype=torch.long)
        for i, a in enumerate(answers):
            k = len(self.suffix) + len(a)
            tail[i, :k] = torch.tensor(self.suffix + a)
            tail_mask[i, :k] = 1
            tail_labels[i, len(self.suffix) : k] = torch.tensor(a, dtype=torch.long)
        embed = self.llm.model.get_input_embeddings()
        pre = torch.tensor(self.prefix, device=dev)
        head_len = len(self.prefix) + p
        embeds = torch.cat([embed(pre)[None].expand(b, -1, -1), x, embed(tail.to(dev))], 1)
        mask = torch.cat([torch.ones(b, head_len, dtype=torch.long), tail_mask], 1).to(dev)
        labels = torch.cat([torch.full((b, head_len), IGNORE, dtype=torch.long), tail_labels], 1).to(dev)
        positions = torch.arange(len(self.prefix), head_len, device=dev).expand(b, -1)
        return embeds, mask, labels, positions, words

    def losses(self, feats: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(caption cross-entropy summed over tokens, caption tokens, visual-word KL averaged over
        image positions)."""
        from ..models.visual_words import next_patch_targets, visual_word_kl

        embeds, mask, labels, positions, words = self.sequences(feats, captions)
        logits = self.llm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        target = labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
        targets, at = next_patch_targets(words, positions, embeds.shape[1])
        return ce, (target != IGNORE).sum(), visual_word_kl(logits, targets, at)

    @torch.no_grad()
    def captions(self, feats: torch.Tensor, *, max_new_tokens: int = 16) -> list[str]:
        """Greedy captions through the LM's KV cache."""
        model = self.llm.model
        embeds, mask, _, _, _ = self.sequences(feats)
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        b = embeds.shape[0]
        rows: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for i in (~done).nonzero().flatten().tolist():
                rows[i].append(int(nxt[i]))
            done |= nxt == self.eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], 1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, **with_cache(output_cache(out)), use_cache=True)
        return self.llm._decode_text(rows)

    @torch.no_grad()
    def top_words(self, feats: torch.Tensor, k: int = 1) -> list[list[list[str]]]:
        """Each patch's k most likely visual words: [image][patch] -> k strings."""
        emb = self.llm.model.get_input_embeddings().weight
        return self.head.top_words(self.projector(feats.to(emb.dtype)), self.llm.text_tokenizer, k=k)


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


def _build(llm, tok, meta: dict) -> VisualWordsLM:
    media_dim = tok.config.vision.width if meta["media"] == "vit" else tok.config.qformer.hidden
    return VisualWordsLM(
        llm, media_dim, projector=meta["projector"], variant=meta["variant"], prompt=meta.get("prompt")
    )


class VwlmmTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        vc = cfg.vwlmm
        lm_dir, tok_dir, self.llm, self.tok = frozen_lm_and_tokenizer("vwlmm", vc.lm, vc.vit_from, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vw = _build(self.llm, self.tok, asdict(vc))
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


def load_vwlmm(folder: str | Path, *, device=None):
    """A `run/vwlmm` folder -> (VisualWordsLM, SeedTokenizer, meta)."""
    root, meta, llm, tok = open_connector_run(folder, "vwlmm", "weights.safetensors")
    vw = _build(llm, tok, meta)
    load_exact(vw, root / "weights.safetensors", "visual-words")
    if device is not None:
        llm.model.to(device)
        tok.to(device)
        vw.to(device)
    return vw.eval(), tok, meta
