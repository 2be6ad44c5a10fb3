#!/usr/bin/env python
"""LLM decoding for SEED: seed_fast's static-KV-cache decoder vs transformers' `generate`.

Same model, same prompts (random text ids, left-padded to `--prompt` tokens), greedy, exactly
`--new` new tokens (no EOS stop: equal work for every provider). Providers:
  transformers generate            dynamic cache (transformers' default)
  transformers generate (static)   cache_implementation="static"
  seed_fast generate_ids           our StaticCache loop, eager step
  seed_fast generate_ids compiled  the step under torch.compile "reduce-overhead" (CUDA graphs; GPU)
  seed_fast image codes            the real text -> image task: 32 steps restricted to image tokens
Tokens per second = batch * new tokens / wall time of the whole call (prefill included); every
provider's tokens are compared with transformers generate's first (column "same tokens").

Models (random weights, real shapes): llama-7b (SEED-LLaMA 8B's LM: 4096 x 32 layers, vocab
40194), opt-2.7b (SEED v1), llama-small (768 x 12 layers, vocab 40194; the CPU default).

    python benchmarks/bench_llm_decode.py [--model llama-small] [--device cpu|cuda] [--batch 1,8] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402

MODELS = {
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32), 32000),
    "opt-2.7b": ("opt", dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560), 50265),
    "llama-small": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12), 32000),
}


def build(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from seed_fast.models.llm import SeedLLM
    from seed_fast.models.text_tokenizer import build_word_tokenizer

    kind, kw, text_vocab = MODELS[name]
    vocab = text_vocab + 8192 + 2
    common = dict(vocab_size=vocab, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlamaConfig(**kw, **common) if kind == "llama" else OPTConfig(**kw, **common)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = (LlamaForCausalLM if kind == "llama" else OPTForCausalLM)(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    text_tok = build_word_tokenizer(["a photo of"], vocab_size=text_vocab)
    return SeedLLM(model, text_tok, None, num_codes=8192)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = args.device
    name = args.model or ("llama-7b" if device == "cuda" else "llama-small")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    batches = [int(b) for b in args.batch.split(",")]
    if args.quick:
        batches = batches[:1]
    repeats = 3 if args.quick else 7

    llm = build(name, device, dtype)
    model, n_new, pad = llm.model, args.new, llm.text_tokenizer.pad_token_id
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        prompts = [torch.randint(4, 32000, (args.prompt - (i % 5),), generator=g).tolist() for i in range(b)]
        from seed_fast.models.decoding import left_pad

        ids, mask = left_pad(prompts, pad)
        ids, mask = ids.to(device), mask.to(device)
        image_prompts = [p + [llm.vocab.boi] for p in prompts]

        def hf(static=False):
            kw = dict(cache_implementation="static") if static else {}
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 eos_token_id=None, pad_token_id=pad, **kw)
            return out[:, ids.shape[1]:].tolist()

        providers = {
            "transformers generate": lambda: hf(False),
            "transformers generate (static)": lambda: hf(True),
            "seed_fast generate_ids": lambda: llm.generate_ids(prompts, max_new_tokens=n_new, suppress_image_tokens=False, stop_ids=()),
        }
        if device == "cuda":
            def compiled():
                llm.compile_decode(True)
                try:
                    return llm.generate_ids(prompts, max_new_tokens=n_new, suppress_image_tokens=False, stop_ids=())
                finally:
                    llm._compile = False  # keep the compiled decoder cached, later providers run eager
            providers["seed_fast generate_ids compiled"] = compiled
        providers["seed_fast image codes (32)"] = lambda: llm.generate_codes_from_ids(image_prompts)

        want = hf(False)
        for pname, fn in providers.items():
            with torch.no_grad():
                got = fn()
                same = "-" if pname.endswith("(32)") else ("yes" if got == want else f"{sum(a == c for a, c in zip(got, want))}/{b} rows")
                tm = time_fn(fn, device, warmup=1 if device == "cpu" else 2, repeats=repeats, max_seconds=30)
            toks = b * (32 if pname.endswith("(32)") else n_new)
            row = {"model": name, "batch": b, "provider": pname, "ms": f"{tm['median_ms']:.1f}",
                   "iqr": f"{tm['q1_ms']:.1f}-{tm['q3_ms']:.1f}", "tok_s": f"{toks / tm['median_ms'] * 1e3:.1f}", "same": same}
            rows.append(row)
            print(f"{name} B={b:<3d} {pname:34s} {row['ms']:>9s} ms  {row['tok_s']:>9s} tok/s  same tokens: {same}", flush=True)

    columns = [("model", "model"), ("batch", "batch"), ("provider", "provider"), ("ms", "median ms / call"),
               ("iqr", "IQR ms"), ("tok_s", "tokens/s"), ("same", "same tokens as generate")]
    md = (f"dtype {str(dtype).replace('torch.', '')}; prompt {args.prompt} tokens (left-padded, lengths vary by up to 4), "
          f"{n_new} new tokens greedy, random weights. tokens/s = batch x new tokens / call time (prefill included).\n\n")
    md += markdown_table(rows, columns)
    folder = write_results(f"bench_llm_decode_{name}", device, rows, md, args.out, {"quick": args.quick})
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
