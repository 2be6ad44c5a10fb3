"""`seed-fast eval --lavit RUN`, `--flamingo RUN` and `--vwlmm RUN`: the related tokenizers on the
same held-out synthetic scenes as the SEED eval (`seed_fast.default_model.demo.test_scenes`).

LaVIT (a `seed-fast train lavit` run): how many tokens an image gets (mean / min / max, and the LLM
sequence length with [IMG] and [/IMG]), the kept share of patches, the feature reconstruction cosine
through the codes, codebook usage, whether the deterministic mode gives the same codes twice, and
tokenizer images/s on this machine.

Flamingo (a `seed-fast train flamingo` run): greedy captions from continuous features through
the frozen LM, judged by the scene grammar as the SEED eval judges its captions; next to it, with
`compare`, SEED's own captions from the 32 codes of the embedded (or given) model on the very same
scenes, so discrete and continuous are compared on one split.

VW-LMM (a `seed-fast train vwlmm` run): the same captions and comparison for the visual-words
connector, plus each patch's most likely visual word for the first scenes (`top_words`, laid out on
the patch grid for ViT features) and, over every patch, whether the words say anything: how many
distinct top words there are, the most common ones, their mean entropy, and the share of patches
whose top word is a token of their scene's own caption.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..models.preprocess import images_to_tensor
from ..models.related.flamingo import CaptionSequences, flamingo_captions, load_flamingo
from ..models.related.lavit import (
    LavitFeatureDecoder,
    LavitTokenizer,
    get_lavit_config,
    lavit_token_ids,
    pad_codes,
    reconstruction_loss,
)
from ..models.related.visual_words import load_vwlmm, patch_features
from ..synthetic import parse_caption
from .demo import _bar, _chunks, _objects_ok, test_scenes

__all__ = ["evaluate_flamingo", "evaluate_lavit", "evaluate_vwlmm", "load_lavit_run", "related_markdown"]


def load_lavit_run(folder: str | Path):
    """A `seed-fast train lavit` run folder (or its `lavit/`) -> (LavitTokenizer, LavitFeatureDecoder)."""
    from safetensors.torch import load_file

    root = Path(folder)
    if (root / "lavit").is_dir():
        root = root / "lavit"
    need = [f for f in ("tokenizer.safetensors", "decoder.safetensors", "config.json") if not (root / f).is_file()]
    if need:
        raise FileNotFoundError(f"{str(root)!r} is not a LaVIT stage output: missing {need}")
    cfg = get_lavit_config(json.loads((root / "config.json").read_text())["preset"])
    tok, dec = LavitTokenizer(cfg), LavitFeatureDecoder(cfg)
    tok.load_official(load_file(str(root / "tokenizer.safetensors")), strict=True)
    missing, unexpected = dec.load_state_dict(load_file(str(root / "decoder.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{root}: decoder weights do not fit preset {cfg.name!r} "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return tok.eval(), dec.eval()


@torch.no_grad()
def evaluate_lavit(run: str | Path, n: int = 256, *, batch: int = 32, progress: bool = True) -> dict:
    import torch.nn.functional as F

    tok, dec = load_lavit_run(run)
    images, _, _, _ = test_scenes(n, size=tok.config.vision.image_size)
    counts, cos, used = [], 0.0, set()
    same = True
    t_enc = 0.0
    for a, b in _bar(_chunks(n, batch), "lavit", progress):
        t0 = time.perf_counter()
        codes = tok.encode(images[a:b])
        t_enc += time.perf_counter() - t0
        again = tok.encode(images[a:b])
        same &= all(torch.equal(x, y) for x, y in zip(codes, again))
        counts += [len(c) for c in codes]
        used.update(int(c) for cs in codes for c in cs)
        feats = tok.features(images[a:b])
        padded, valid = pad_codes(codes)
        book = F.normalize(tok.quantize.embedding.weight.float(), dim=-1)
        vecs = book[padded.clamp(min=0)] * valid[..., None]
        cos += (1 - float(reconstruction_loss(dec(vecs, valid), feats))) * (b - a)
    ids = lavit_token_ids([torch.zeros(c, dtype=torch.long) for c in counts])
    c = torch.tensor(counts, dtype=torch.float32)
    return {
        "model": "lavit",
        "preset": tok.config.name,
        "n": n,
        "tokens_per_image_mean": float(c.mean()),
        "tokens_per_image_min": int(c.min()),
        "tokens_per_image_max": int(c.max()),
        "llm_tokens_per_image_mean": sum(len(i) for i in ids) / n,
        "kept_share": float(c.mean()) / tok.config.num_patches,
        "feature_reconstruction_cos": cos / n,
        "codebook_usage": len(used) / tok.config.codebook_size,
        "deterministic": bool(same),
        "tokenizer_images_per_s": n / t_enc,
    }


@torch.no_grad()
def evaluate_flamingo(run: str | Path, n: int = 256, *, batch: int = 32, compare=None, progress: bool = True) -> dict:
    """compare: a DefaultModel (seed_fast.default_model.load_default) whose SEED captions from codes
    are measured on the same scenes, or None."""

    conn, llm, tok, meta = load_flamingo(run)
    seqs = CaptionSequences(llm, meta.get("prompt"))
    images, caps, facts, _ = test_scenes(n, size=tok.config.vision.image_size)

    preds, t_cap = [], 0.0
    for a, b in _bar(_chunks(n, batch), "flamingo", progress):
        pixels = images_to_tensor(images[a:b], tok.config.vision.image_size)
        t0 = time.perf_counter()
        preds += flamingo_captions(
            conn, llm, tok, pixels, seqs, meta["media"], max_new_tokens=meta.get("max_new_tokens", 16)
        )
        t_cap += time.perf_counter() - t0
    out = {
        "model": "flamingo",
        "media": meta["media"],
        "n": n,
        "caption_objects_ok": sum(_objects_ok(parse_caption(p), f) for p, f in zip(preds, facts)) / n,
        "caption_exact": sum(p.strip().rstrip(".") == c for p, c in zip(preds, caps)) / n,
        "llm_tokens_per_image_mean": 0.0,  # the image enters through cross-attention, not as tokens
        "resampled_latents_per_image": int(meta["num_latents"]),
        "caption_images_per_s": n / t_cap,
    }
    if compare is not None:
        out.update(_seed_captions(compare, images, caps, facts, batch, progress))
    return out


def _seed_captions(m, images, caps, facts, batch: int, progress: bool) -> dict:
    """SEED's captions from 32 codes (a DefaultModel) on the same scenes."""
    n = len(images)
    preds, t_seed = [], 0.0
    for a, b in _bar(_chunks(n, batch), "seed", progress):
        t0 = time.perf_counter()
        codes = m.tokenizer.encode(images[a:b])
        preds += m.llm.caption(codes=codes)
        t_seed += time.perf_counter() - t0
    return {
        "seed_caption_objects_ok": sum(_objects_ok(parse_caption(p), f) for p, f in zip(preds, facts)) / n,
        "seed_caption_exact": sum(p.strip().rstrip(".") == c for p, c in zip(preds, caps)) / n,
        "seed_llm_tokens_per_image": 2 + m.tokenizer.num_codes,
        "seed_caption_images_per_s": n / t_seed,
    }


@torch.no_grad()
def evaluate_vwlmm(
    run: str | Path, n: int = 256, *, batch: int = 32, compare=None, progress: bool = True, show: int = 2
) -> dict:
    """Captions through the visual-words connector (and, with `compare`, SEED's from codes) on the
    held-out scenes; `show` scenes' per-patch top visual words go into "top_words"."""

    vw, tok, meta = load_vwlmm(run)
    images, caps, facts, _ = test_scenes(n, size=tok.config.vision.image_size)
    preds, t_cap, shown = [], 0.0, []
    tops, entropy, in_caption = [], 0.0, 0
    for a, b in _bar(_chunks(n, batch), "vwlmm", progress):
        pixels = images_to_tensor(images[a:b], tok.config.vision.image_size)
        t0 = time.perf_counter()
        feats = patch_features(tok, pixels, meta["media"])
        preds += vw.captions(feats, max_new_tokens=meta.get("max_new_tokens", 16))
        t_cap += time.perf_counter() - t0
        if len(shown) < show:
            shown += vw.top_words(feats[: show - len(shown)])
        with torch.no_grad():
            words = vw.image_inputs(feats)[1]  # (b, P, vocab) fp32
        top = words.argmax(-1).cpu()
        tops.append(top.flatten())
        entropy += float(-(words * words.clamp_min(1e-30).log()).sum(-1).sum())
        for row, cap in zip(top, caps[a:b]):  # patches whose top word is a token of the scene's own caption
            in_caption += int(torch.isin(row, torch.tensor(vw.llm._text_ids(cap), dtype=row.dtype)).sum())
    tops = torch.cat(tops)
    ids, counts = tops.unique(return_counts=True)
    order = counts.argsort(descending=True)[:5]
    decode = vw.llm.text_tokenizer.decode
    out = {
        "model": "vwlmm",
        "media": meta["media"],
        "variant": meta["variant"],
        "n": n,
        "caption_objects_ok": sum(_objects_ok(parse_caption(p), f) for p, f in zip(preds, facts)) / n,
        "caption_exact": sum(p.strip().rstrip(".") == c for p, c in zip(preds, caps)) / n,
        "llm_tokens_per_image_mean": float(feats.shape[1] + 2),  # the patches between <img> and </img>
        "caption_images_per_s": n / t_cap,
        "top_words": [{"caption": caps[i], "words": [w[0] for w in shown[i]]} for i in range(len(shown))],
        # do the visual words say anything? over every patch of the n scenes:
        "word_distinct": int(ids.numel()),  # distinct top words
        "word_most_common": [[decode([int(ids[j])]).strip(), float(counts[j]) / tops.numel()] for j in order],
        "word_most_common_share": float(counts.max()) / tops.numel(),
        "word_entropy_mean": entropy / tops.numel(),  # nats; a uniform word would have log(vocab)
        "word_entropy_uniform": math.log(vw.head.vocab),
        "word_in_caption_share": in_caption / tops.numel(),  # top word is a token of the scene's caption
    }
    if compare is not None:
        out.update(_seed_captions(compare, images, caps, facts, batch, progress))
    return out


def top_words_markdown(metrics: dict) -> str:
    """Each shown scene's top visual words, on the patch grid when the patches form a square."""
    lines = []
    for item in metrics.get("top_words", []):
        words = [w.replace("|", "\\|") or "·" for w in item["words"]]  # a table cell: no bare pipe, never empty
        side = int(round(len(words) ** 0.5))
        lines += ["", f'top visual word of each patch, scene "{item["caption"]}":', ""]
        if side * side == len(words) and metrics.get("media") == "vit":
            lines += ["| " + " | ".join(words[:side]) + " |", "|" + "---|" * side]
            lines += ["| " + " | ".join(words[r * side : (r + 1) * side]) + " |" for r in range(1, side)]
        else:
            lines.append(" ".join(words))
    return "\n".join(lines)


ROWS = {
    "lavit": (
        ("tokens_per_image_mean", "codes per image (mean)"),
        ("tokens_per_image_min", "codes per image (min)"),
        ("tokens_per_image_max", "codes per image (max)"),
        ("llm_tokens_per_image_mean", "LLM tokens per image with [IMG] [/IMG]"),
        ("kept_share", "share of patches kept"),
        ("feature_reconstruction_cos", "ViT feature reconstruction cosine (through codes)"),
        ("codebook_usage", "codebook usage on these images"),
        ("deterministic", "same codes run to run"),
        ("tokenizer_images_per_s", "tokenizer images/s (this machine)"),
    ),
    "flamingo": (
        ("caption_objects_ok", "captions: every object's color and shape right (Flamingo, continuous)"),
        ("seed_caption_objects_ok", "captions: every object's color and shape right (SEED, 32 codes)"),
        ("caption_exact", "captions exact (Flamingo)"),
        ("seed_caption_exact", "captions exact (SEED)"),
        ("llm_tokens_per_image_mean", "LLM tokens per image (Flamingo: cross-attention only)"),
        ("seed_llm_tokens_per_image", "LLM tokens per image (SEED)"),
        ("resampled_latents_per_image", "resampled latents per image (Flamingo)"),
        ("caption_images_per_s", "captioned images/s (Flamingo, this machine)"),
        ("seed_caption_images_per_s", "captioned images/s (SEED: tokenize + caption)"),
    ),
    "vwlmm": (
        ("caption_objects_ok", "captions: every object's color and shape right (VW-LMM, continuous)"),
        ("seed_caption_objects_ok", "captions: every object's color and shape right (SEED, 32 codes)"),
        ("caption_exact", "captions exact (VW-LMM)"),
        ("seed_caption_exact", "captions exact (SEED)"),
        ("llm_tokens_per_image_mean", "LLM tokens per image (VW-LMM: patches + <img> </img>)"),
        ("seed_llm_tokens_per_image", "LLM tokens per image (SEED)"),
        ("caption_images_per_s", "captioned images/s (VW-LMM: features + caption, this machine)"),
        ("seed_caption_images_per_s", "captioned images/s (SEED: tokenize + caption)"),
        ("word_distinct", "distinct top visual words over all patches"),
        ("word_most_common_share", "patches whose top word is the most common one"),
        ("word_in_caption_share", "patches whose top word is a token of their scene's caption"),
        ("word_entropy_mean", "visual word entropy, mean (nats)"),
        ("word_entropy_uniform", "entropy of a uniform word (nats)"),
    ),
}


def related_markdown(metrics: dict) -> str:
    lines = [f"{metrics['model']} on {metrics['n']} held-out scenes", "", "| metric | value |", "|---|---|"]
    for key, label in ROWS[metrics["model"]]:
        if key not in metrics:
            continue
        v = metrics[key]
        if isinstance(v, bool):
            s = "yes" if v else "no"
        elif isinstance(v, float) and key.endswith(("ok", "exact", "share", "usage")):
            s = f"{100 * v:.1f}%"
        elif isinstance(v, float):
            s = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        else:
            s = str(v)
        lines.append(f"| {label} | {s} |")
    if metrics["model"] == "vwlmm":
        if metrics.get("word_most_common"):
            common = ", ".join(f"`{w or '·'}` {100 * share:.1f}%" for w, share in metrics["word_most_common"])
            lines += ["", f"most common top visual words: {common}"]
        lines.append(top_words_markdown(metrics))
    return "\n".join(lines)
