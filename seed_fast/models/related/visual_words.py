"""VW-LMM's visual words (arXiv 2403.07720): image features supervised as distributions over the
text vocabulary, for any transformers causal LM (the one inside a SeedLLM included).

    vm_head = Linear(hidden, text vocabulary, bias=False)
    visual word of a patch      w_t = softmax(vm_head(projected patch t))              (B, P, V)
    training objective          text loss + KL(w_{t+1} || LM's prediction at image position t)
    PIF ("pseudo image features") the LM reads w_t @ E_text instead of the projected patch: each
                                 row a convex combination of text embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..hf_compat import output_cache, with_cache
from ..preprocess import InputError
from .connector import IGNORE, load_exact, media_features, open_connector_run


class VisualWordHead(nn.Module):
    """`vm_head`: projected patches (..., hidden) -> visual-word logits (..., vocab)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        if hidden < 1 or vocab < 2:
            raise InputError(f"VisualWordHead needs hidden >= 1 and vocab >= 2, got {hidden}, {vocab}")
        self.vm_head = nn.Linear(hidden, vocab, bias=False)

    @classmethod
    def for_lm(cls, model: nn.Module, vocab: int | None = None) -> "VisualWordHead":
        """A head sized for a transformers causal LM: its hidden size, and its text vocabulary
        (`vocab`, default the input embedding's rows; a SeedLLM passes vocab.base so the image
        tokens are not words)."""
        emb = model.get_input_embeddings().weight
        vocab = emb.shape[0] if vocab is None else vocab
        if not 2 <= vocab <= emb.shape[0]:
            raise InputError(f"vocab must lie in [2, {emb.shape[0]}] (the LM's embedding rows), got {vocab}")
        return cls(emb.shape[1], vocab).to(device=emb.device, dtype=emb.dtype)

    @property
    def vocab(self) -> int:
        return self.vm_head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vm_head(x)

    def words(self, x: torch.Tensor) -> torch.Tensor:
        """Visual words: distributions over the vocabulary (..., vocab), fp32."""
        return self(x).float().softmax(-1)

    def pseudo_image_features(self, x: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """PIF: softmax(vm_head(x)) @ E_text -> (..., hidden). text_embeddings: (vocab, hidden), the
        LM's input embedding rows of the same vocabulary."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[0] != self.vocab:
            raise InputError(
                f"text_embeddings must be ({self.vocab}, hidden) to match vm_head's vocabulary, "
                f"got {tuple(text_embeddings.shape)}"
            )
        return (self.words(x) @ text_embeddings.float()).to(text_embeddings.dtype)

    def top_words(self, x: torch.Tensor, tokenizer, k: int = 1) -> list[list[list[str]]]:
        """The k most likely words of every patch: [image][patch] -> k strings (a visualization)."""
        if x.dim() != 3:
            raise InputError(f"x must be (B, P, hidden), got shape {tuple(x.shape)}")
        idx = self(x).topk(k, dim=-1).indices.cpu()  # (B, P, k)
        return [[[tokenizer.decode([int(t)]).strip() for t in patch] for patch in img] for img in idx]


def visual_word_kl(lm_logits: torch.Tensor, target_words: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """KL(target || LM) averaged over image positions.

    lm_logits: (B, T, V_lm) the LM's logits; only the first V columns (the text vocabulary the
    visual words live in) are compared, renormalized. target_words: (B, T, V) the visual word that
    position t must predict (the NEXT patch's word, already shifted). image_mask: (B, T) bool, the
    positions where a next patch exists."""
    v = target_words.shape[-1]
    if lm_logits.shape[:2] != target_words.shape[:2] or image_mask.shape != lm_logits.shape[:2]:
        raise InputError(
            f"lm_logits {tuple(lm_logits.shape)}, target_words {tuple(target_words.shape)} and "
            f"image_mask {tuple(image_mask.shape)} must share (B, T)"
        )
    if lm_logits.shape[-1] < v:
        raise InputError(f"the LM has {lm_logits.shape[-1]} logits but the visual words span {v} words")
    sel = image_mask.to(torch.bool)
    if not bool(sel.any()):
        return lm_logits.sum() * 0.0  # no image position in the batch: zero, still in the graph
    logq = lm_logits[sel][:, :v].float().log_softmax(-1)
    p = target_words[sel].float()
    return F.kl_div(logq, p, reduction="batchmean")


def visual_word_kl_ref(lm_logits: torch.Tensor, target_words: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """The same loss written out: mean over image positions of sum_w p(w) (log p(w) - log q(w)), fp64."""
    v = target_words.shape[-1]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(lm_logits.shape[0]):
        for t in range(lm_logits.shape[1]):
            if not bool(image_mask[b, t]):
                continue
            q = torch.softmax(lm_logits[b, t, :v].double(), -1)
            p = target_words[b, t].double()
            nz = p > 0
            total = total + (p[nz] * (p[nz].log() - q[nz].log())).sum()
            count += 1
    return total / max(count, 1)


def next_patch_targets(
    words: torch.Tensor, image_positions: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the visual words of an image's patches as targets of the positions before them.

    words: (B, P, V) visual words of the P patches; image_positions: (B, P) int, where each patch
    sits in the LM sequence (consecutive). Returns target_words (B, T, V) and mask (B, T): position
    of patch t gets the word of patch t + 1 (the last patch predicts nothing)."""
    b, p, v = words.shape
    if image_positions.shape != (b, p):
        raise InputError(f"image_positions must be {(b, p)}, got {tuple(image_positions.shape)}")
    if int(image_positions.max()) >= seq_len or int(image_positions.min()) < 0:
        raise InputError(
            f"image_positions must lie in [0, {seq_len}), "
            f"got [{int(image_positions.min())}, {int(image_positions.max())}]"
        )
    targets = words.new_zeros(b, seq_len, v)
    mask = torch.zeros(b, seq_len, dtype=torch.bool, device=words.device)
    pos = image_positions[:, :-1]
    targets.scatter_(1, pos[..., None].expand(-1, -1, v), words[:, 1:])
    mask.scatter_(1, pos, True)
    return targets, mask


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
        emb = llm.model.get_input_embeddings().weight
        hidden = emb.shape[1]
        if projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(media_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        elif projector == "linear":
            self.projector = nn.Linear(media_dim, hidden)
        else:
            raise ValueError(f"vwlmm.projector must be 'linear' or 'mlp', got {projector!r}")
        if variant not in ("vw", "pif"):
            raise ValueError(f"vwlmm.variant must be 'vw' or 'pif', got {variant!r}")
        self.head = VisualWordHead(hidden, llm.vocab.base)  # text words only: the image tokens are not words
        self.variant = variant
        self._llm = (llm,)
        tt = llm.text_tokenizer
        if tt.eos_token_id is None:
            raise ValueError("the LM's text tokenizer has no eos token; caption sequences need one to end")
        self.eos = tt.eos_token_id
        self.pad = tt.pad_token_id if tt.pad_token_id is not None else self.eos
        turn = llm.template.chat.format(prompt=llm.template.caption if prompt is None else prompt)
        if turn.count("<image>") != 1:
            raise ValueError(f"the caption prompt needs exactly one <image> placeholder, got {turn!r}")
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


def build_visual_words_lm(llm, tok, meta: dict) -> VisualWordsLM:
    """The VisualWordsLM a vwlmm config (or a trained run's config.json) describes, around `llm`."""
    media_dim = tok.config.vision.width if meta["media"] == "vit" else tok.config.qformer.hidden
    return VisualWordsLM(
        llm, media_dim, projector=meta["projector"], variant=meta["variant"], prompt=meta.get("prompt")
    )


def load_vwlmm(folder: str | Path, *, device=None):
    """A `run/vwlmm` folder -> (VisualWordsLM, SeedTokenizer, meta)."""
    root, meta, llm, tok = open_connector_run(folder, "vwlmm", "weights.safetensors")
    vw = build_visual_words_lm(llm, tok, meta)
    load_exact(vw, root / "weights.safetensors", "visual-words")
    if device is not None:
        llm.model.to(device)
        tok.to(device)
        vw.to(device)
    return vw.eval(), tok, meta
