"""SEED's stage-I image-text contrastive heads on the causal Q-Former, and retrieval with them.

Image feature: the LAST causal query's output -> `vision_proj` (hidden -> 256) -> l2 norm. Text
feature: the Q-Former's own text branch (BLIP-2: word + position embeddings, the same self-attention
weights as the queries, a separate text FFN, no cross-attention), [CLS] output -> `text_proj` -> l2
norm. `Stage1Module.forward` is the contrastive loss (symmetric InfoNCE, learned temperature, label
smoothing 0.1; negatives gathered from every rank); `seed_fast.train.stage1` trains it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from ...ops import qformer_attention
from ..checkpoint import CheckpointError
from ..preprocess import normalize
from .qformer import AddNorm, Intermediate


class QFormerTextBranch(nn.Module):
    """Text through the Q-Former's layers (self-attention shared with the queries, own FFN)."""

    def __init__(self, qformer, vocab_size: int, max_len: int = 64):
        super().__init__()
        layer0 = qformer.layers[0]
        hidden = layer0.attention.self.query.in_features
        eps = qformer.norm.eps
        ffn = layer0.intermediate_query.dense.out_features
        self.qformer = [qformer]  # not a submodule: its weights belong to the tokenizer
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.intermediate = nn.ModuleList(Intermediate(hidden, ffn) for _ in qformer.layers)
        self.output = nn.ModuleList(AddNorm(ffn, hidden, eps) for _ in qformer.layers)
        self.max_len = max_len
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> (B, L, hidden)."""
        qf = self.qformer[0]
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = qf.norm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])
        keep = mask.to(torch.bool)
        for i, layer in enumerate(qf.layers):
            att = layer.attention.self
            q, k, v = att._split(att.query(x)), att._split(att.key(x)), att._split(att.value(x))
            a = qformer_attention(q, k, v, key_padding_mask=keep, impl=att.attn_impl).transpose(1, 2).flatten(2)
            x = layer.attention.output(a, x)
            x = self.output[i](self.intermediate[i](x), x)
        return x


class Stage1Module(nn.Module):
    def __init__(self, tok, text_tokenizer, embed_dim: int = 256, max_len: int = 64):
        super().__init__()
        hidden = tok.config.qformer.hidden
        self.tok = tok
        self.text_tokenizer = text_tokenizer
        self.text = QFormerTextBranch(tok.qformer, len(text_tokenizer), max_len=max_len)
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.train_vit = False

    def text_ids(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (ids, mask) (B, L): [CLS] text [SEP] with a BERT-style tokenizer (BLIP-2's),
        else bos + text."""
        tt, n_max = self.text_tokenizer, self.text.max_len
        if getattr(tt, "cls_token_id", None) is not None:
            rows = [tt(c, truncation=True, max_length=n_max).input_ids for c in captions]
        else:
            rows = [[tt.bos_token_id] + tt(c, add_special_tokens=False).input_ids[: n_max - 1] for c in captions]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), tt.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dev = self.vision_proj.weight.device
        out = self.text(ids.to(dev), mask.to(dev))
        return F.normalize(self.text_proj(out[:, 0]).float(), dim=-1)  # [CLS] (B, 256)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.encode_ids(*self.text_ids(captions))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        tok = self.tok
        x = normalize(pixels.to(tok.device), tok.config.image_mean, tok.config.image_std).to(tok.dtype)
        with torch.set_grad_enabled(self.train_vit and torch.is_grad_enabled()):
            feats = tok.image_features(x)  # frozen unless stage1.train_vit
        causal = tok.qformer(feats)  # (B, 32, hidden)
        return F.normalize(self.vision_proj(causal[:, -1]).float(), dim=-1)  # the last query

    def forward(self, batch) -> dict:
        if len(batch) == 0:
            zero = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
            return {"loss": zero, "itc": zero.detach(), "temp": self.temp.detach()}
        img, txt = self.encode_image(batch.pixels), self.encode_text(batch.captions)
        all_img, all_txt, offset = gather_pairs(img, txt)
        temp = self.temp.clamp(0.001, 0.5)
        labels = torch.arange(img.shape[0], device=img.device) + offset
        i2t = img @ all_txt.t() / temp
        t2i = txt @ all_img.t() / temp
        loss = (
            F.cross_entropy(i2t, labels, label_smoothing=0.1) + F.cross_entropy(t2i, labels, label_smoothing=0.1)
        ) / 2
        return {"loss": loss, "itc": loss.detach(), "temp": temp.detach()}


def gather_pairs(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's image and text features, in rank order and differentiable (negatives for the
    contrastive loss), and the offset of this rank's rows in them (equal local batches)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather  # only under torch.distributed

        return torch.cat(all_gather(img)), torch.cat(all_gather(txt)), dist.get_rank() * img.shape[0]
    return img, txt, 0


def retrieval_at_k(img: torch.Tensor, txt: torch.Tensor, captions: list[str], ks=(1, 5, 10)) -> dict[str, float]:
    """Image -> text and text -> image recall@k over N pairs. A hit is any item whose caption equals
    the query's (synthetic captions repeat), so chance R@1 is about (copies of the caption) / N."""
    sim = img @ txt.t()  # (N, N)
    same = torch.tensor([[a == b for b in captions] for a in captions], device=sim.device)
    out = {}
    for k in ks:
        k_ = min(k, sim.shape[1])
        i2t = same.gather(1, sim.topk(k_, dim=1).indices).any(1).float().mean()
        t2i = same.t().gather(1, sim.t().topk(k_, dim=1).indices).any(1).float().mean()
        out[f"i2t_r{k}"], out[f"t2i_r{k}"] = float(i2t), float(t2i)
    out["chance_r1"] = float(same.float().sum(1).div(len(captions)).mean())
    return out


def blip2_text_branch(sd: dict) -> dict:
    """The text branch, projections and temperature of a BLIP-2 state dict under Stage1Module's
    names. LAVIS: `Qformer.bert.embeddings.{word,position}_embeddings`, `Qformer.bert.encoder.layer.N.
    {intermediate,output}`, `vision_proj`, `text_proj`, `temp`. transformers
    (Blip2ForImageTextRetrieval): `embeddings.*`, `qformer.encoder.layer.N.{intermediate,output}`,
    `vision_projection`, `text_projection`. Other keys are not returned."""
    out = {}
    for key, value in sd.items():
        k = key
        for prefix in ("Qformer.bert.", "qformer."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(intermediate|output)\.(.+)", k)
        if m:
            out[f"text.{m.group(2)}.{m.group(1)}.{m.group(3)}"] = value
        elif k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
            out["text." + k.split(".", 1)[1]] = value
        elif key.startswith(("vision_proj.", "text_proj.")) or key == "temp":
            out[key] = value
        elif key.startswith(("vision_projection.", "text_projection.")):
            out[key.replace("_projection.", "_proj.", 1)] = value
    return out


def load_itc_heads(tok, run: str | Path) -> "Stage1Module":
    """A stage-I run's text branch, projections and temperature (`itc_heads.safetensors` and
    `text_tokenizer/`) around the tokenizer `tok`; missing or unexpected keys raise."""
    run = Path(run)
    heads = load_file(str(run / "itc_heads.safetensors"))
    text_tok = AutoTokenizer.from_pretrained(run / "text_tokenizer", local_files_only=True)
    module = Stage1Module(tok, text_tok, max_len=heads["text.position_embeddings.weight"].shape[0])
    own = {k for k in module.state_dict() if not k.startswith("tok.")}
    missing, unexpected = sorted(own - set(heads)), sorted(set(heads) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"{run}/itc_heads.safetensors does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.load_state_dict(heads, strict=False)
    return module.to(tok.device).eval()
