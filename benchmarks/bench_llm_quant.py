#!/usr/bin/env python
"""Fitting SEED-LLaMA in memory: the LM loaded in bf16, int8 and int4 weight-only (torchao) through
`SeedLLM.from_pretrained(folder, quantization_config=TorchAoConfig(...))`, the way SEED's own demo
loads the 8B model in 8-bit to fit a 16 GB GPU.

Per variant: the weights' memory on the GPU after loading, the peak during generation (batch 1,
`--prompt` tokens then `--new` greedy tokens), tokens/s of that generation, and whether its tokens
equal the bf16 model's. The embeddings and the LM head stay unquantized (the image-token rows stay
exact), so an 8B model's int8 weights are about 7 GB rather than 6.7.

Models: llama-7b (SEED-LLaMA 8B's LM, random weights; the GPU default) or llama-tiny (the CPU
default, int8 only: torchao's int4 kernels need a GPU). The model is written once to a temporary
folder (safetensors), then loaded per variant.

    python benchmarks/bench_llm_quant.py [--model llama-7b] [--variants bf16,int8,int4] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm_decode import MODELS, build  # noqa: E402
from common import markdown_table, time_fn, write_results  # noqa: E402

from seed_fast.models.llm.seed_llm import SeedLLM  # noqa: E402


def quant_config(variant: str):
    """The transformers quantization config of a variant (None: the unquantized dtype)."""
    if variant in ("bf16", "fp32"):
        return None
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if variant == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if variant == "int4":
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=128))
    raise ValueError(f"unknown variant {variant!r}; choose bf16, fp32, int8 or int4")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, choices=sorted(MODELS))
    p.add_argument("--variants", default=None, help="default bf16,int8,int4 (CUDA) or fp32,int8 (CPU)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    cuda = device == "cuda"
    name = args.model or ("llama-7b" if cuda else "llama-tiny")
    variants = (args.variants or ("bf16,int8,int4" if cuda else "fp32,int8")).split(",")
    for v in variants:
        quant_config(v)  # an unknown name fails before any work
    dtype = torch.bfloat16 if cuda else torch.float32

    print(f"building {name} ({dtype}) and writing it once ...", flush=True)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = build(name, device, dtype)
        with torch.no_grad():  # real LMs' logits are far from flat: random ones would tie everywhere
            src.model.get_output_embeddings().weight.mul_(40)
        src.save_pretrained(tmp)
        vocab = src.model.config.vocab_size
        del src
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        prompt = [torch.randint(4, vocab - 8194, (args.prompt,), generator=g).tolist()]
        rows, want = [], None
        for v in variants:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            try:
                llm = SeedLLM.from_pretrained(tmp, quantization_config=quant_config(v), device=device, dtype=dtype)
            except Exception as e:  # e.g. int4 without its kernels: reported, the run goes on
                rows.append({"variant": v, "note": f"failed: {str(e)[:100]}"})
                continue
            weights = (torch.cuda.memory_allocated() - base) / 2**30 if cuda else None

            def gen(llm=llm):
                return llm.generate_ids(prompt, max_new_tokens=args.new, suppress_image_tokens=False, stop_ids=())

            out = gen()
            want = out if want is None else want
            tm = time_fn(gen, device, warmup=1, repeats=args.repeats, max_seconds=60, graph=False, host=False)
            row = {
                "model": name,
                "variant": v,
                "quantized": "yes" if llm.is_quantized else "no",
                "weights_gb": f"{weights:.2f}" if weights is not None else "n/a",
                "peak_gb": f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f}" if cuda else "n/a",
                "ms": f"{tm['median_ms']:.1f}",
                "tok_s": f"{args.new / (tm['median_ms'] / 1e3):.1f}",
                "same": "yes" if out == want else f"{sum(a == b for a, b in zip(out[0], want[0]))}/{len(want[0])}",
                "method": tm["method"],
            }
            rows.append(row)
            print(
                f"{v:5s} weights {row['weights_gb']} GB  peak {row['peak_gb']} GB  {row['tok_s']} tokens/s  "
                f"same tokens as {variants[0]}: {row['same']}",
                flush=True,
            )
            del llm
            gc.collect()

    columns = [
        ("variant", "weights"),
        ("quantized", "quantized"),
        ("weights_gb", "GPU GB after loading"),
        ("peak_gb", "peak GB while generating"),
        ("ms", "generate ms"),
        ("tok_s", "new tokens/s (batch 1)"),
        ("same", f"same tokens as {variants[0]}"),
        ("note", "note"),
    ]
    md = (
        f"{name} (random weights), loaded by SeedLLM.from_pretrained with torchao weight-only configs "
        f"(embeddings and LM head unquantized); batch 1, {args.prompt} prompt tokens, {args.new} greedy tokens.\n\n"
    )
    md += markdown_table(rows, columns)
    folder = write_results(f"bench_llm_quant_{name}", device, rows, md, args.out, {"model": name})
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
