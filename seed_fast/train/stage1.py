"""Stage I: the causal Q-Former learns image-text alignment (contrastive loss only).

Image feature: the LAST causal query's output -> `vision_proj` (hidden -> 256) -> l2 norm. Text
feature: the Q-Former's own text branch (BLIP-2: word + position embeddings, the same self-attention
weights as the queries, a separate text FFN, no cross-attention), [CLS] output -> `text_proj` -> l2
norm. Loss: symmetric InfoNCE with a learned temperature (init 0.07) and label smoothing 0.1;
negatives are gathered from every rank (`torch.distributed.nn.all_gather` carries the gradients).
The ViT stays frozen (SEED starts from EVA-CLIP) unless `stage1.train_vit` is set: a stack with no
pretrained ViT (the embedded `mini` one) then learns it here too, CLIP-style.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.checkpoint import load_state_dict_file
from ..models.llm.text_tokenizer import build_word_tokenizer
from ..models.seed.itc import Stage1Module, blip2_text_branch, retrieval_at_k
from ..synthetic import COLORS, COUNTS, SHAPES
from .config import ConfigError, TrainConfig
from .data import make_collate
from .sources import make_source
from .task import Task, load_tokenizer


class Stage1Task(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        tok = load_tokenizer(cfg)
        if not tok.config.qformer.is_causal:
            raise ConfigError("stage 1 trains the causal Q-Former; this tokenizer config is not causal")
        s1 = cfg.stage1
        if s1.text_tokenizer:
            from transformers import AutoTokenizer

            text_tok = AutoTokenizer.from_pretrained(s1.text_tokenizer, local_files_only=True)
        else:
            words = (
                list(COLORS)
                + list(SHAPES)
                + [s + "s" for s in SHAPES]
                + list(COUNTS.values())
                + ["left", "of", "a", "an"]
            )
            text_tok = build_word_tokenizer([" ".join(words)], extra_words=(".", ","))
        heads = {}
        if s1.init:
            init = Path(s1.init)
            files = sorted(init.glob("*.safetensors")) if init.is_dir() else [init]
            if not files:
                raise ConfigError(f"stage1.init: no *.safetensors files in the folder {init}")
            sd = {k: v for f in files for k, v in load_state_dict_file(f).items()}
            tok.load_blip2_qformer(sd, strict=False)
            heads = blip2_text_branch(sd)
            words = heads.get("text.word_embeddings.weight")
            if words is not None and words.shape[0] < len(text_tok):
                raise ConfigError(
                    f"stage1.init has {words.shape[0]} word embeddings but the text tokenizer has {len(text_tok)} "
                    "tokens: give BLIP-2's tokenizer as stage1.text_tokenizer"
                )
        pos = heads.get("text.position_embeddings.weight")
        tok = tok.to(device).requires_grad_(False)
        tok.qformer.requires_grad_(True)
        if s1.train_vit:
            tok.vision.requires_grad_(True)
            tok.ln_vision.requires_grad_(True)
        self.tok = tok
        module = Stage1Module(tok, text_tok, max_len=pos.shape[0] if pos is not None else 64)
        module.train_vit = s1.train_vit
        if heads:
            words = heads.get("text.word_embeddings.weight")
            if words is not None and words.shape[0] != module.text.word_embeddings.weight.shape[0]:
                module.text.word_embeddings = nn.Embedding.from_pretrained(words.clone(), freeze=False)
            missing, unexpected = module.load_state_dict(heads, strict=False)
            unexpected = [k for k in unexpected if not k.startswith("tok.")]
            if unexpected:
                raise ConfigError(f"stage1.init: text-branch keys that do not fit: {unexpected[:5]}")
            self.init_report = {
                "loaded": sorted(heads),
                "kept_random": sorted(k for k in missing if not k.startswith("tok.")),
            }
        self.module = module.to(device)
        self.image_size = tok.config.vision.image_size

    def keeps(self, key: str) -> bool:
        trained = ("tok.qformer.",) + (("tok.vision.", "tok.ln_vision.") if self.cfg.stage1.train_vit else ())
        return not key.startswith("tok.") or key.startswith(trained)

    def evaluate(self) -> dict[str, float]:
        d = self.cfg.data
        ds = make_source(self.cfg, "val")
        n = min(len(ds), d.val_n)
        collate = make_collate(self.image_size)
        imgs, txts, caps = [], [], []
        for i in range(0, n, 32):
            batch = collate([ds[j] for j in range(i, min(n, i + 32))])
            if len(batch):
                imgs.append(self.module.encode_image(batch.pixels))
                txts.append(self.module.encode_text(batch.captions))
                caps += batch.captions
        if not caps:
            return {}
        return {"val_" + k: v for k, v in retrieval_at_k(torch.cat(imgs), torch.cat(txts), caps).items()}

    def export(self, run: Path) -> None:
        from safetensors.torch import save_file

        self.tok.save_pretrained(run / "tokenizer")
        heads = {k: v.contiguous() for k, v in self.module.state_dict().items() if not k.startswith("tok.")}
        save_file(heads, str(run / "itc_heads.safetensors"))
        self.module.text_tokenizer.save_pretrained(run / "text_tokenizer")
