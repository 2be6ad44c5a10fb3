"""Flamingo stage: train the continuous baseline connector on the same image-caption data as SEED.

The LM and the vision encoder are frozen; only the connector (Perceiver Resampler + tanh-gated
cross-attention blocks, `seed_fast.models.flamingo`) trains. A sequence is the caption prompt (the
LM's template caption turn without the image, e.g. "a photo of") followed by the caption and eos; the
loss is on the caption and eos only. The image reaches the LM only through cross-attention.

Media (`flamingo.media`):
  vit      the frozen ViT's patch features (B, 1 + N, width), what Flamingo resamples
  qformer  SEED's 32 causal Q-Former embeddings before quantization (B, 32, D): the same features
           SEED's codes are cut from, so codes vs continuous is compared on one representation

Defaults read the embedded default model (its LLM and tokenizer), so `seed-fast train flamingo` on the
synthetic data compares discrete codes (the shipped LLM's captions from codes) with continuous
features through a frozen copy of the very same LM.

    seed-fast train flamingo --config run.json        -> run/flamingo/{connector.safetensors,config.json}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, TrainConfig
from .data import make_collate, make_source
from .task import Task

IGNORE = -100


def _default(part: str) -> str:
    from ..default_model import DEFAULT_DIR

    return str(DEFAULT_DIR / part)


def load_frozen_lm(folder: str, *, dtype=torch.float32):
    """A SeedLLM (or transformers causal-LM) folder -> the SeedLLM with any LoRA merged, frozen, eval."""
    from ..models.llm import SeedLLM

    llm = SeedLLM.from_pretrained(folder, dtype=dtype)
    llm.tokenizer = llm.diffusion = None
    llm.merge_lora()
    llm.model.requires_grad_(False).eval()
    return llm


def media_features(tok, pixels: torch.Tensor, media: str) -> torch.Tensor:
    """pixels (B, 3, S, S) in [0, 1] -> the frozen media features the connector reads, float32."""
    from ..models.preprocess import normalize

    x = normalize(pixels.to(tok.device), tok.config.image_mean, tok.config.image_std).to(tok.dtype)
    if media == "vit":
        return tok.image_features(x).float()
    if media == "qformer":
        return tok.causal_embeddings(x).float()
    raise ConfigError(f"flamingo.media must be 'vit' or 'qformer', got {media!r}")


class CaptionSequences:
    """Captions -> (ids, mask, labels) right-padded: [bos] prompt caption eos, loss on caption + eos."""

    def __init__(self, llm, prompt: str | None):
        tt = llm.text_tokenizer
        if tt.eos_token_id is None:
            raise ConfigError("the LM's text tokenizer has no eos token; caption sequences need one to end")
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


class FlamingoTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        from ..models.flamingo import FlamingoConnector

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


def caption_scores(preds: list[str], truth: list[str]) -> dict[str, float]:
    """Exact match, and the share where every object's color and shape are right (scene grammar)."""
    from ..synthetic import parse_caption

    def norm(t: str) -> str:
        return " ".join(t.lower().replace(".", " ").split())

    def objects_ok(p: str, t: str) -> bool:
        a, b = parse_caption(p), parse_caption(t)
        keys = ("left_color", "left_shape", "right_color", "right_shape")
        return a is not None and b is not None and all(a[k] == b[k] for k in keys)

    n = max(len(truth), 1)
    return {
        "val_caption_exact": sum(norm(p) == norm(t) for p, t in zip(preds, truth)) / n,
        "val_caption_objects_ok": sum(objects_ok(p, t) for p, t in zip(preds, truth)) / n,
    }


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


def frozen_lm_and_tokenizer(section: str, lm: str | None, vit_from: str | None, device):
    """A connector stage's frozen parts: (LM folder, tokenizer folder, SeedLLM, SeedTokenizer), the
    embedded model's where the config names none; a missing folder is named by its config key."""
    from ..models import SeedTokenizer

    lm_dir = lm or _default("llm")
    tok_dir = vit_from or _default("tokenizer")
    for what, path in ((f"{section}.lm", lm_dir), (f"{section}.vit_from", tok_dir)):
        if not Path(path).is_dir():
            raise ConfigError(f"{what}: no such folder {path!r}")
    llm = load_frozen_lm(lm_dir)
    llm.model.to(device)
    tok = SeedTokenizer.from_pretrained(tok_dir).float().to(device).eval().requires_grad_(False)
    return lm_dir, tok_dir, llm, tok


def open_connector_run(folder: str | Path, stage: str, weights: str):
    """A frozen-LM connector stage's export (`run/<stage>` or the run folder itself) -> (its folder,
    meta, the frozen SeedLLM, the frozen SeedTokenizer it read its media from). Names what is missing."""
    from ..models import SeedTokenizer

    root = Path(folder)
    if (root / stage).is_dir():
        root = root / stage
    need = [f for f in (weights, "config.json") if not (root / f).is_file()]
    if need:
        raise FileNotFoundError(f"{str(root)!r} is not a {stage} stage output: missing {need}")
    meta = json.loads((root / "config.json").read_text())
    llm = load_frozen_lm(meta["lm"])
    tok = SeedTokenizer.from_pretrained(meta["vit_from"]).float().eval().requires_grad_(False)
    return root, meta, llm, tok


def load_exact(module: nn.Module, path: Path, what: str) -> None:
    """Load a safetensors file into `module`, refusing any missing or unexpected key."""
    from safetensors.torch import load_file

    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path.parent}: {what} weights do not fit its config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )


def load_flamingo(folder: str | Path, *, device=None):
    """A `run/flamingo` folder -> (connector, llm, tokenizer, meta), ready for `flamingo_captions`."""
    from ..models.flamingo import FlamingoConnector

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
