#!/usr/bin/env python
"""SEED vs LaVIT vs VW-LMM vs a Flamingo-style connector: what an image costs a multimodal LLM.

Per model, at batch B:
  tokens per image     SEED: 32 codes (+ [IMG] [/IMG] = 34 LLM tokens); LaVIT: a variable count (the
                       trained run's mean with --lavit-run, else top-k at LaVIT's target keep ratio of
                       1/3, which fixes the count); VW-LMM: every ViT patch, projected (continuous);
                       Flamingo: none (latents enter by cross-attention)
  tokenizer images/s   images -> what the LLM receives (SEED: codes; LaVIT: codes; VW-LMM: the ViT's
                       patches through its MLP projector; Flamingo: the ViT features, resampled inside
                       the connector)
  LLM prefill          one forward of the LLM over [image tokens] + a 4-token prompt for B images
                       (Flamingo: the prompt alone plus its gated cross-attention); images/s and the
                       LLM tokens processed per second
Shapes: on CPU the embedded model's sizes (`mini` tokenizer, `mini-lavit`, the shipped 4-layer LLM);
on CUDA the released sizes (seed-tokenizer-2 and `lavit`: EVA ViT-g at 224 px; a LLaMA-7B-shaped LM
with random weights). Weights do not change the timing; LaVIT's token count depends on its selector,
hence --lavit-run.

    python benchmarks/bench_related.py [--quick] [--device cpu|cuda] [--batch 8] [--lavit-run RUN] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402


def _lm(device: str, dtype, big: bool):
    """(transformers causal LM, how it was made)."""
    if not big:
        from seed_fast.default_model import load_default

        m = load_default()
        return m.llm.model.to(device, dtype).eval(), "embedded LLM (mini-llama, 4 x 256)"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000 + 8192 + 2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), "LLaMA-7B shape (32 x 4096), random weights"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--lavit-run", default=None, help="a `seed-fast train lavit` run: its tokenizer gives the token counts"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, b = args.device, args.batch
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    big = device == "cuda"
    repeats = 3 if args.quick else 7

    from seed_fast import SeedTokenizer
    from seed_fast.default_model.demo import test_scenes
    from seed_fast.models.related.flamingo import FlamingoConnector
    from seed_fast.models.related.lavit import LavitTokenizer

    if big:
        seed_tok = SeedTokenizer.from_config("seed-tokenizer-2", seed=0).to(device, dtype).eval().to_fast()
        lav = LavitTokenizer.from_config("lavit", seed=0).to(device, dtype).eval()
    else:
        from seed_fast.default_model import load_default

        seed_tok = load_default().tokenizer.to(device, dtype).eval().to_fast()
        lav = LavitTokenizer.from_config("mini-lavit", seed=0).to(device, dtype).eval()
    n_patches = lav.config.num_patches
    topk = max(1, round(n_patches * lav.config.keep_ratio))
    if args.lavit_run:
        from seed_fast.default_model.related_eval import load_lavit_run

        lav, _ = load_lavit_run(args.lavit_run)
        lav = lav.to(device, dtype).eval()
    images, _, _, _ = test_scenes(b, size=seed_tok.config.vision.image_size)
    lav_images = (
        images
        if lav.config.vision.image_size == seed_tok.config.vision.image_size
        else test_scenes(b, size=lav.config.vision.image_size)[0]
    )
    lm, lm_desc = _lm(device, dtype, big)
    media_dim = seed_tok.config.vision.width
    conn = (
        FlamingoConnector(lm, media_dim, every=4 if big else 1, num_latents=64 if big else 32).to(device, dtype).eval()
    )
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if name.endswith("_gate"):
                p.fill_(
                    0.5
                )  # open gates: at 0 the blocks' outputs are multiplied away (the timing is the same, the check is not)

    def lavit_encode():
        if args.lavit_run:
            return lav.encode(lav_images)
        return lav.encode(lav_images, mode="topk", k=topk)

    with torch.no_grad():
        seed_codes = seed_tok.encode(images)
        lav_codes = lavit_encode()
        feats = seed_tok.image_features(seed_tok.preprocess(images))
    if tuple(seed_codes.shape) != (b, 32) or len(lav_codes) != b:
        raise RuntimeError(
            f"unexpected tokenizer outputs: SEED {tuple(seed_codes.shape)}, LaVIT {len(lav_codes)} images"
        )
    lav_tokens = sum(len(c) for c in lav_codes) / b
    prompt = torch.randint(10, 200, (b, 4), device=device)

    def prefill(n_img: int):
        vocab = lm.get_input_embeddings().weight.shape[0]  # image ids sit at the top of the vocabulary
        ids = torch.cat([torch.randint(vocab // 2, vocab, (b, n_img), device=device), prompt], 1) if n_img else prompt
        mask = torch.ones_like(ids)

        def run():
            return lm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

        return run, ids.shape[1]

    hidden = lm.get_input_embeddings().weight.shape[1]
    projector = (
        torch.nn.Sequential(torch.nn.Linear(media_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        .to(device, dtype)
        .eval()
    )  # VW-LMM's "mlp"

    def vw_features():
        return projector(seed_tok.image_features(seed_tok.preprocess(images))[:, 1:])

    with torch.no_grad():
        vw_patches = vw_features()
    vw_seq = vw_patches.shape[1] + 2 + prompt.shape[1]

    def vw_prefill():
        embed = lm.get_input_embeddings()
        ends = embed(torch.randint(10, 200, (b, 2), device=device))  # stand-ins for <img> and </img>
        x = torch.cat([ends[:, :1], vw_patches, ends[:, 1:], embed(prompt)], 1)
        return lm(
            inputs_embeds=x,
            attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=device),
            use_cache=True,
            logits_to_keep=1,
        ).logits

    def flamingo_prefill():
        mask = torch.ones_like(prompt)
        return conn(prompt, mask, media=feats, use_cache=True, logits_to_keep=1).logits

    seq_lav = round(lav_tokens) + 2
    rows = []
    specs = [
        ("SEED (32 causal codes)", 32.0, 34, lambda: seed_tok.encode(images), *prefill(34)),
        ("LaVIT (dynamic codes)", lav_tokens, lav_tokens + 2, lavit_encode, *prefill(seq_lav)),
        ("VW-LMM (continuous patches, visual words)", 0.0, vw_patches.shape[1] + 2, vw_features, vw_prefill, vw_seq),
        (
            "Flamingo-style (continuous, cross-attention)",
            0.0,
            0,
            lambda: seed_tok.image_features(seed_tok.preprocess(images)),
            flamingo_prefill,
            prompt.shape[1],
        ),
    ]
    for name, codes, llm_tokens, tok_fn, pre_fn, seq in specs:
        with torch.no_grad():
            t_tok = time_fn(tok_fn, device, warmup=1, repeats=repeats, max_seconds=20)
            t_pre = time_fn(pre_fn, device, warmup=1, repeats=repeats, max_seconds=20)
        row = {
            "model": name,
            "batch": b,
            "codes_per_image": f"{codes:.1f}",
            "llm_tokens_per_image": f"{llm_tokens:.1f}",
            "tok_ms": f"{t_tok['median_ms']:.1f}",
            "tok_img_s": f"{b / t_tok['median_ms'] * 1e3:.1f}",
            "pre_ms": f"{t_pre['median_ms']:.1f}",
            "pre_img_s": f"{b / t_pre['median_ms'] * 1e3:.1f}",
            "pre_tok_s": f"{b * seq / t_pre['median_ms'] * 1e3:.0f}",
            "seq": seq,
        }
        rows.append(row)
        print(
            f"{name:46s} codes/img {row['codes_per_image']:>6s}  tokenizer {row['tok_img_s']:>8s} img/s  "
            f"LLM prefill {row['pre_ms']:>8s} ms ({row['pre_img_s']} img/s, {row['pre_tok_s']} tok/s)",
            flush=True,
        )
    sizes = "seed-tokenizer-2 / lavit (EVA ViT-g, 224 px)" if big else "embedded `mini` / `mini-lavit` (64 px)"
    count = (
        f"LaVIT count from {args.lavit_run}"
        if args.lavit_run
        else f"LaVIT top-{topk} of {n_patches} patches (its 1/3 target)"
    )
    md = (
        f"Tokenizers: {sizes}; LLM: {lm_desc}; dtype {str(dtype).replace('torch.', '')}; batch {b}; {count}. "
        f"LLM prefill = one forward over the image tokens + a 4-token prompt (Flamingo: the prompt + cross-attention "
        f"to {conn.resampler.latents.shape[0]} latents every {4 if big else 1} layer(s)).\n\n"
    )
    md += markdown_table(
        rows,
        [
            ("model", "model"),
            ("codes_per_image", "codes / image"),
            ("llm_tokens_per_image", "LLM tokens / image"),
            ("tok_ms", "tokenizer ms / batch"),
            ("tok_img_s", "tokenizer images/s"),
            ("pre_ms", "LLM prefill ms / batch"),
            ("pre_img_s", "LLM prefill images/s"),
            ("pre_tok_s", "LLM prefill tokens/s"),
        ],
    )
    folder = write_results(
        "bench_related", device, rows, md, args.out, {"quick": args.quick, "lavit_run": args.lavit_run}
    )
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
