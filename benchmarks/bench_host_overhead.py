#!/usr/bin/env python
"""Host cost of one public op call at tiny sizes, beside the stock call it stands in for.

At tiny sizes a call's time is its host work (argument checks, dispatch, the Python around the
kernel): this is what a model pays per call when its batch is small. Each row times back-to-back
calls with perf_counter (best of several rounds of many calls; no sync) and gives the ratio to the
stock call measured in the same run:

  codebook_lookup (auto, N = 1, K = 16, D = 32)      vs  torch.cdist(z, c).argmin(-1)
  qformer_attention fwd + bwd (auto, B = 1, H = 1, 8 x 8, Dh = 8)  vs  SDPA fwd + bwd
  lora_linear fwd (auto, 1 token, 16 -> 16, r 4)     vs  peft's LoRA Linear

    python benchmarks/bench_host_overhead.py [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, write_results  # noqa: E402

from seed_fast.ops import codebook_lookup, lora_linear, qformer_attention  # noqa: E402


def host_us(fn, calls: int = 2000, rounds: int = 7) -> float:
    for _ in range(max(50, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return best * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    rows = []

    def add(op, ours, stock, stock_name, target):
        t_ours, t_stock = host_us(ours, args.calls), host_us(stock, args.calls)
        ratio = t_ours / t_stock
        rows.append(
            {
                "op": op,
                "seed_fast_us": f"{t_ours:.1f}",
                "stock": stock_name,
                "stock_us": f"{t_stock:.1f}",
                "ratio": f"{ratio:.2f}x",
                "target": f"<= {target}x",
                "met": "yes" if ratio <= target else "no",
            }
        )
        print(f"{op:40s} {t_ours:8.1f} us  {stock_name:32s} {t_stock:8.1f} us  {ratio:5.2f}x", flush=True)

    z, book = torch.randn(1, 32, device=dev), torch.randn(16, 32, device=dev)
    add(
        "codebook_lookup N=1",
        lambda: codebook_lookup(z, book),
        lambda: torch.cdist(z, book).argmin(-1),
        "torch.cdist + argmin",
        2.0,
    )

    q = torch.randn(1, 1, 8, 8, device=dev, requires_grad=True)

    def ours_attn():
        qformer_attention(q, q, q, causal=True).sum().backward()

    def sdpa_attn():
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    add("qformer_attention fwd+bwd B=1", ours_attn, sdpa_attn, "SDPA fwd+bwd", 1.5)

    try:
        import peft

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(16, 16)

            def forward(self, x):
                return self.proj(x)

        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
        layer = peft.get_peft_model(One(), cfg).to(dev).eval().base_model.model.proj
        w, b = layer.get_base_layer().weight, layer.get_base_layer().bias
        a, bb, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        x = torch.randn(1, 16, device=dev)
        with torch.no_grad():
            add(
                "lora_linear fwd 1 token",
                lambda: lora_linear(x, w, b, a, bb, s),
                lambda: layer(x),
                "peft LoRA Linear",
                1.0,
            )
    except ImportError:
        pass

    cols = [(k, k) for k in ("op", "seed_fast_us", "stock", "stock_us", "ratio", "target", "met")]
    md = (
        "Host time per call in microseconds (best of 7 rounds of back-to-back calls, no sync); ratio = "
        "seed_fast / the stock call in the same run.\n\n" + markdown_table(rows, cols)
    )
    folder = write_results("bench_host_overhead", dev, rows, md, args.out, {"calls": args.calls})
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
