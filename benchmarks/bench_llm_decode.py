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

Two more tables:
  prefill   the prompt pass alone: transformers forward (dynamic cache, full logits, as generate's
            first step computes them) vs seed_fast's KVDecoder.prefill (static cache, last-position
            logits only); tokens/s = batch * prompt tokens / time. The decode rate is then
            batch * (new - 1) / (generate time - prefill time), a derived number, labeled so.
  lora      SEED-LLaMA's LoRA (r 16 on every attention and MLP projection, seed_lora_config) with
            random non-zero B (a zero B would be timing a no-op's output): peft's own LoRA layers vs
            seed_fast's fused lora_linear vs the adapter merged, prefill and greedy generate; each
            provider's tokens compared with peft's.

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
    "llama-7b": (
        "llama",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        32000,
    ),
    "opt-2.7b": (
        "opt",
        dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560),
        50265,
    ),
    "llama-small": (
        "llama",
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
        32000,
    ),
    "llama-tiny": (  # a CI-sized check of the scripts
        "llama",
        dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4),
        32000,
    ),
}


def build(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from seed_fast.models.llm.seed_llm import SeedLLM
    from seed_fast.models.llm.text_tokenizer import build_word_tokenizer

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
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
        prompts = _prompts(b, args.prompt)
        from seed_fast.models.llm.decoding import left_pad

        ids, mask = left_pad(prompts, pad)
        ids, mask = ids.to(device), mask.to(device)
        image_prompts = [p + [llm.vocab.boi] for p in prompts]

        def hf(static=False):
            kw = dict(cache_implementation="static") if static else {}
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
                **kw,
            )
            return out[:, ids.shape[1] :].tolist()

        providers = {
            "transformers generate": lambda: hf(False),
            "transformers generate (static)": lambda: hf(True),
            "seed_fast generate_ids": lambda: llm.generate_ids(
                prompts, max_new_tokens=n_new, suppress_image_tokens=False, stop_ids=()
            ),
        }
        if device == "cuda":

            def compiled():
                llm.compile_decode(True)
                try:
                    return llm.generate_ids(prompts, max_new_tokens=n_new, suppress_image_tokens=False, stop_ids=())
                finally:
                    llm._decoders.compile = False  # keep the compiled decoder cached, later providers run eager

            providers["seed_fast generate_ids compiled"] = compiled
        providers["seed_fast image codes (32)"] = lambda: llm.generate_codes_from_ids(image_prompts)

        want = hf(False)
        for pname, fn in providers.items():
            with torch.no_grad():
                got = fn()
                same = (
                    "-"
                    if pname.endswith("(32)")
                    else ("yes" if got == want else f"{sum(a == c for a, c in zip(got, want))}/{b} rows")
                )
                tm = time_fn(fn, device, warmup=1 if device == "cpu" else 2, repeats=repeats, max_seconds=30)
            toks = b * (32 if pname.endswith("(32)") else n_new)
            row = {
                "model": name,
                "batch": b,
                "provider": pname,
                "ms": f"{tm['median_ms']:.1f}",
                "iqr": f"{tm['q1_ms']:.1f}-{tm['q3_ms']:.1f}",
                "tok_s": f"{toks / tm['median_ms'] * 1e3:.1f}",
                "same": same,
            }
            rows.append(row)
            print(
                f"{name} B={b:<3d} {pname:34s} {row['ms']:>9s} ms  {row['tok_s']:>9s} tok/s  same tokens: {same}",
                flush=True,
            )

    pre_rows = prefill_rows(llm, name, batches, args, device, repeats)
    lora_rows = [] if args.no_lora else lora_table(llm, name, batches[:1], args, device, repeats)

    columns = [
        ("model", "model"),
        ("batch", "batch"),
        ("provider", "provider"),
        ("ms", "median ms / call"),
        ("iqr", "IQR ms"),
        ("tok_s", "tokens/s"),
        ("same", "same tokens as generate"),
    ]
    md = (
        f"dtype {str(dtype).replace('torch.', '')}; prompt {args.prompt} tokens "
        "(left-padded, lengths vary by up to 4), "
        f"{n_new} new tokens greedy, random weights. tokens/s = batch x new tokens / call time (prefill included).\n\n"
    )
    md += markdown_table(rows, columns)
    md += (
        "\n\nPrefill alone (the prompt pass), and the decode rate derived from it: decode tok/s = "
        "batch x (new - 1) / (generate ms - prefill ms).\n\n"
    )
    md += markdown_table(
        pre_rows,
        [
            ("model", "model"),
            ("batch", "batch"),
            ("provider", "provider"),
            ("ms", "median ms"),
            ("iqr", "IQR ms"),
            ("tok_s", "prefill tokens/s"),
            ("decode_tok_s", "decode tokens/s (derived)"),
        ],
    )
    if lora_rows:
        md += (
            "\n\nLoRA at LLM level: SEED-LLaMA's adapter (r 16, alpha 32, every attention and MLP projection), "
            "random non-zero weights, dropout off (eval).\n\n"
        )
        md += markdown_table(
            lora_rows,
            [
                ("model", "model"),
                ("batch", "batch"),
                ("provider", "LoRA path"),
                ("pre_ms", "prefill ms"),
                ("pre_tok_s", "prefill tokens/s"),
                ("gen_ms", "generate ms"),
                ("gen_tok_s", "generate tokens/s"),
                ("same", "same tokens as peft"),
            ],
        )
    every = rows + [dict(r, table="prefill") for r in pre_rows] + [dict(r, table="lora") for r in lora_rows]
    folder = write_results(f"bench_llm_decode_{name}", device, every, md, args.out, {"quick": args.quick})
    print(md)
    print(f"results in {folder}")
    return 0


def _prompts(b: int, length: int):
    g = torch.Generator().manual_seed(b)
    return [torch.randint(4, 32000, (length - (i % 5),), generator=g).tolist() for i in range(b)]


def prefill_rows(llm, name, batches, args, device, repeats) -> list[dict]:
    """The prompt pass alone: transformers' forward vs our static-cache prefill."""
    from transformers import DynamicCache

    from seed_fast.models.hf_compat import with_cache
    from seed_fast.models.llm.decoding import left_pad

    model, rows = llm.model, []
    for b in batches:
        prompts = _prompts(b, args.prompt)
        ids, mask = left_pad(prompts, llm.text_tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        toks = int(mask.sum())

        def hf():
            return model(
                input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(DynamicCache()), use_cache=True
            ).logits[:, -1]

        def ours():
            with llm._decoders.take(llm.model, b, ids.shape[1] + args.new) as dec:
                return dec.prefill(ids, mask)

        def full():
            return llm.generate_ids(prompts, max_new_tokens=args.new, suppress_image_tokens=False, stop_ids=())

        with torch.no_grad():
            a, c = hf().float(), ours()
            err = (a - c).abs().max().item()
            t_hf = time_fn(hf, device, warmup=1, repeats=repeats, max_seconds=20)
            t_ours = time_fn(ours, device, warmup=1, repeats=repeats, max_seconds=20)
            t_full = time_fn(full, device, warmup=1, repeats=max(3, repeats // 2), max_seconds=30)
        for pname, tm in (("transformers forward (dynamic cache)", t_hf), ("seed_fast KVDecoder.prefill", t_ours)):
            row = {
                "model": name,
                "batch": b,
                "provider": pname,
                "ms": f"{tm['median_ms']:.1f}",
                "iqr": f"{tm['q1_ms']:.1f}-{tm['q3_ms']:.1f}",
                "tok_s": f"{toks / tm['median_ms'] * 1e3:.0f}",
                "prompt_tokens": toks,
                "max_abs_logit_diff": err,
                "decode_tok_s": "-",
            }
            if pname.startswith("seed_fast"):
                dec_ms = t_full["median_ms"] - tm["median_ms"]
                row["decode_tok_s"] = f"{b * (args.new - 1) / dec_ms * 1e3:.1f}" if dec_ms > 0 else "-"
            rows.append(row)
            print(
                f"{name} B={b:<3d} prefill {pname:38s} {row['ms']:>9s} ms  {row['tok_s']:>9s} tok/s  "
                f"decode {row['decode_tok_s']} tok/s  (max |logit diff| {err:.2e})",
                flush=True,
            )
    return rows


def lora_table(llm, name, batches, args, device, repeats) -> list[dict]:
    """peft LoRA vs fused LoRA vs merged, on the same adapter weights."""
    import copy

    from seed_fast.models.llm.decoding import left_pad

    rows = []
    base = llm
    for b in batches:
        prompts = _prompts(b, args.prompt)
        ids, mask = left_pad(prompts, llm.text_tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        toks = int(mask.sum())
        variants = {}
        peft_llm = copy.deepcopy(base).add_lora(True, fused=False)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in peft_llm.model.named_parameters():
                if "lora_B" in pname:  # peft starts B at zero: the adapter would add exactly nothing
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
        peft_llm.model.eval()
        variants["peft LoRA (unmerged)"] = peft_llm
        fused = copy.deepcopy(peft_llm)
        from seed_fast.lora import apply_fused_lora

        apply_fused_lora(fused.model)
        variants["seed_fast fused lora_linear"] = fused
        variants["merged into the base weights"] = copy.deepcopy(peft_llm).merge_lora()
        want = None
        for pname, v in variants.items():

            def pre(v=v):
                with v._decoders.take(v.model, b, ids.shape[1] + args.new) as dec:
                    return dec.prefill(ids, mask)

            def gen(v=v):
                return v.generate_ids(prompts, max_new_tokens=args.new, suppress_image_tokens=False, stop_ids=())

            with torch.no_grad():
                got = gen()
                want = got if want is None else want
                same = "yes" if got == want else f"{sum(x == y for x, y in zip(got, want))}/{b} rows"
                tp = time_fn(pre, device, warmup=1, repeats=repeats, max_seconds=20)
                tg = time_fn(gen, device, warmup=1, repeats=max(3, repeats // 2), max_seconds=30)
            row = {
                "model": name,
                "batch": b,
                "provider": pname,
                "pre_ms": f"{tp['median_ms']:.1f}",
                "pre_tok_s": f"{toks / tp['median_ms'] * 1e3:.0f}",
                "gen_ms": f"{tg['median_ms']:.1f}",
                "gen_tok_s": f"{b * args.new / tg['median_ms'] * 1e3:.1f}",
                "same": same,
            }
            rows.append(row)
            print(
                f"{name} B={b:<3d} LoRA {pname:32s} prefill {row['pre_ms']:>8s} ms  generate {row['gen_ms']:>8s} ms "
                f"{row['gen_tok_s']:>8s} tok/s  same tokens: {same}",
                flush=True,
            )
        del variants, peft_llm, fused
    return rows


if __name__ == "__main__":
    sys.exit(main())
