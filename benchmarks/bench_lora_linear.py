#!/usr/bin/env python
"""LoRA linear layers, side by side: base matmul alone, peft's LoRA Linear, merged weights, seed_fast.

Shapes: OPT-2.7B (2560x2560, 2560x10240, 10240x2560) and LLaMA-7B (4096x4096, 4096x11008,
11008x4096) as in x out; tokens {1, 16, 4096, 16384}; rank {8, 16, 64}; forward and forward+backward
(base weight frozen: gradients for x, A, B). A second table sums one LLaMA-7B layer's seven LoRA
projections (q, k, v, o: 4096x4096; gate, up: 4096x11008; down: 11008x4096) per provider, against
peft and against the base matmuls alone. Multi-adapter decode: 32 rows over {1, 4, 32} adapters
against peft's mixed-batch path (`adapter_names=`).

Units:
  FLOP fwd     = 2 T in out + 2 T r (in + out)
  FLOP fwd+bwd = fwd + 2 T in out (dx) + 4 T r (in + out) (dx's LoRA part, dA, dB)
  overhead     = time / time of the base matmul alone (same mode) - 1
On CPU the default grid is trimmed (--tokens 1,16,512 --ranks 16); every provider's output is
compared with peft's before timing.

    python benchmarks/bench_lora_linear.py [--quick] [--device cpu|cuda] [--dtype bfloat16] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402

from seed_fast.ops.lora_linear import lora_linear, lora_linear_multi, not_supported_reasons  # noqa: E402

SHAPES = {
    "OPT-2.7B qkv/out": (2560, 2560),
    "OPT-2.7B fc1": (2560, 10240),
    "OPT-2.7B fc2": (10240, 2560),
    "LLaMA-7B attn": (4096, 4096),
    "LLaMA-7B mlp up": (4096, 11008),
    "LLaMA-7B mlp down": (11008, 4096),
}
# one LLaMA-7B decoder layer's LoRA targets: q, k, v, o; gate, up; down
LAYER = {"LLaMA-7B attn": 4, "LLaMA-7B mlp up": 2, "LLaMA-7B mlp down": 1}


def layer_summary(rows: list[dict]) -> list[dict]:
    """Per (tokens, r, mode, provider): the summed time of one LLaMA-7B layer's seven projections,
    where every one of them was measured; with the ratio to peft and the overhead over the base
    matmuls alone."""
    total: dict[tuple, float] = {}
    seen: dict[tuple, set] = {}
    for row in rows:
        name = next((n for n in LAYER if row["shape"].startswith(n + " ")), None)
        if name is None or "ms" not in row:
            continue
        key = (row["tokens"], row["r"], row["mode"], row["provider"])
        total[key] = total.get(key, 0.0) + LAYER[name] * float(row["ms"])
        seen.setdefault(key, set()).add(name)
    out = []
    for (t, r, mode, prov), ms in total.items():
        if seen[(t, r, mode, prov)] != set(LAYER):
            continue
        peft = total.get((t, r, mode, "peft LoRA Linear"))
        base = total.get((t, r, mode, "base matmul alone"))
        out.append(
            {
                "tokens": t,
                "r": r,
                "mode": mode,
                "provider": prov,
                "ms": f"{ms:.3f}",
                "vs_peft": f"{peft / ms:.2f}x" if peft else "",
                "vs_base": f"{(ms / base - 1) * 100:+.0f}%" if base else "",
            }
        )
    return out


class _One(torch.nn.Module):
    def __init__(self, in_f, out_f):
        super().__init__()
        self.proj = torch.nn.Linear(in_f, out_f)

    def forward(self, x, **kw):
        return self.proj(x, **kw)


def _peft_layer(in_f, out_f, r, adapters, device, dtype, seed=0, dropout=0.0):
    """A peft LoRA Linear with `adapters` adapters (random A and B), frozen base."""
    import peft

    torch.manual_seed(seed)
    model = _One(in_f, out_f)
    names = [f"ad{i}" for i in range(adapters)]
    cfg = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(**cfg))
    pm = pm.to(device, dtype).eval()  # peft refuses adapter_names= in training mode
    return pm, pm.base_model.model.proj, names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", default=None)
    p.add_argument("--ranks", default=None)
    p.add_argument("--shapes", default=None, help="comma list of names in SHAPES (default all)")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--dropout", type=float, default=0.0, help="LoRA dropout in the fwd+bwd rows (SEED trains with 0.05)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    cuda = device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = [int(t) for t in (args.tokens or ("1,16,4096,16384" if cuda else "1,16,512")).split(",")]
    ranks = [int(r) for r in (args.ranks or ("8,16,64" if cuda else "16")).split(",")]
    shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    if args.quick:
        tokens, ranks, shapes = tokens[:2] + tokens[-1:], ranks[:1], shapes[:2]
    repeats = 10 if not cuda else 30
    ours = ["torch", "lowrank", "triton"] if cuda else ["torch"]
    drop = args.dropout
    rows = []
    g = torch.Generator().manual_seed(0)

    for shape in shapes:
        in_f, out_f = SHAPES[shape]
        for r in ranks:
            pm, layer, names = _peft_layer(in_f, out_f, r, 1, device, dtype, dropout=drop)
            base = layer.get_base_layer()
            w, b = base.weight, base.bias
            a, bb, s = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight, layer.scaling[names[0]]
            merged = (w.float() + s * bb.float() @ a.float()).to(dtype)
            for t in tokens:
                x0 = torch.randn(t, in_f, generator=g).to(device, dtype)
                gy = torch.randn(t, out_f, generator=g).to(device, dtype)
                with torch.no_grad():
                    want = layer(x0)
                fwd_flop = 2 * t * in_f * out_f + 2 * t * r * (in_f + out_f)
                bwd_flop = fwd_flop + 2 * t * in_f * out_f + 4 * t * r * (in_f + out_f)
                # fn(x, train): train=True applies the LoRA dropout (peft's nn.Dropout in train mode)
                provs = {
                    "base matmul alone": lambda x, train=False: F.linear(x, w, b),
                    "peft LoRA Linear": lambda x, train=False: layer.train(train)(x),
                    "merged weights": lambda x, train=False: F.linear(x, merged, b),
                }
                for impl in ours + ["auto"]:
                    if impl == "auto" or not not_supported_reasons(impl, x0, w, a):
                        provs[f"seed_fast {impl}"] = lambda x, train=False, _i=impl: lora_linear(
                            x, w, b, a, bb, s, impl=_i, dropout_p=drop if train else 0.0, seed=1234
                        )
                base_ms = {}
                for mode in ("fwd", "fwd+bwd"):
                    for name, fn in provs.items():
                        row = {"shape": f"{shape} {in_f}x{out_f}", "tokens": t, "r": r, "mode": mode, "provider": name}
                        with torch.no_grad():
                            err = ((fn(x0).float() - want.float()).abs().max() / want.float().abs().max()).item()
                        if mode == "fwd":
                            with torch.no_grad():
                                tm = time_fn(lambda fn=fn: fn(x0), device, repeats=repeats, max_seconds=10)
                            flop = fwd_flop
                        else:
                            if name == "merged weights":
                                continue  # merged weights cannot train the adapter
                            x = x0.clone().requires_grad_()
                            a.requires_grad_(True)
                            bb.requires_grad_(True)

                            def step(fn=fn, x=x):
                                x.grad = a.grad = bb.grad = None
                                fn(x, True).backward(gy)

                            # not captured in a CUDA graph: peft's dropout draws from torch's generator,
                            # which a failed capture leaves unusable; back-to-back events for every provider
                            tm = time_fn(step, device, repeats=repeats, max_seconds=10, graph=False)
                            flop = bwd_flop if name != "base matmul alone" else 2 * (2 * t * in_f * out_f)
                        ms = tm["median_ms"]
                        if name == "base matmul alone":
                            base_ms[mode] = ms
                        row.update(
                            ms=f"{ms:.3f}",
                            iqr=f"{tm['q1_ms']:.3f}-{tm['q3_ms']:.3f}",
                            tflops=f"{flop / (ms / 1e3) / 1e12:.3f}",
                            overhead=f"{(ms / base_ms[mode] - 1) * 100:+.0f}%" if mode in base_ms else "",
                            err=f"{err:.1e}",
                            host_us=f"{tm['host_us']:.1f}",
                            method=tm["method"],
                            dropout=drop if mode == "fwd+bwd" and name != "base matmul alone" else 0.0,
                        )
                        rows.append(row)
                        print(
                            f"{row['shape']:28s} T={t:6d} r={r:3d} {mode:7s} {name:20s} {row['ms']:>10s} ms "
                            f"{row['tflops']:>8s} TFLOP/s  overhead {row['overhead']:>6s}  err {row['err']}",
                            flush=True,
                        )

    # multi-adapter decode: 32 rows, each its own sequence of one token
    in_f, out_f = SHAPES[shapes[0]]
    for n_ad in (1, 4, 32):
        pm, layer, names = _peft_layer(in_f, out_f, ranks[0], n_ad, device, dtype, seed=1)
        base = layer.get_base_layer()
        x = torch.randn(32, 1, in_f, generator=g).to(device, dtype)
        adapter_names = [names[i % n_ad] for i in range(32)]
        ids = torch.tensor([i % n_ad for i in range(32)], device=device)
        a_s = torch.stack([layer.lora_A[n].weight for n in names])
        b_s = torch.stack([layer.lora_B[n].weight for n in names])
        scal = [layer.scaling[n] for n in names]
        with torch.no_grad():
            want = pm(x, adapter_names=adapter_names)
            provs = {
                "peft mixed batch": lambda: pm(x, adapter_names=adapter_names),
                "seed_fast lora_linear_multi": lambda: lora_linear_multi(
                    x, base.weight, base.bias, a_s, b_s, ids, scal
                ),
            }
            if cuda:
                provs["seed_fast lora_linear_multi triton"] = lambda: lora_linear_multi(
                    x, base.weight, base.bias, a_s, b_s, ids, scal, impl="triton", check_ids=False
                )
            for name, fn in provs.items():
                err = ((fn().float() - want.float()).abs().max() / want.float().abs().max()).item()
                tm = time_fn(fn, device, repeats=repeats, max_seconds=10)
                row = {
                    "shape": f"decode {in_f}x{out_f}, {n_ad} adapters",
                    "tokens": 32,
                    "r": ranks[0],
                    "mode": "fwd",
                    "provider": name,
                    "ms": f"{tm['median_ms']:.3f}",
                    "iqr": f"{tm['q1_ms']:.3f}-{tm['q3_ms']:.3f}",
                    "err": f"{err:.1e}",
                    "host_us": f"{tm['host_us']:.1f}",
                    "method": tm["method"],
                }
                rows.append(row)
                print(f"{row['shape']:28s} {name:28s} {row['ms']:>10s} ms  err {row['err']}", flush=True)

    columns = [
        ("shape", "shape (in x out)"),
        ("tokens", "tokens"),
        ("r", "r"),
        ("mode", "mode"),
        ("provider", "provider"),
        ("ms", "median ms"),
        ("iqr", "IQR ms"),
        ("tflops", "TFLOP/s"),
        ("overhead", "vs base matmul"),
        ("err", "rel err vs peft"),
        ("dropout", "dropout"),
        ("host_us", "host us/call"),
        ("method", "timing"),
    ]
    md = (
        f"dtype {str(dtype).replace('torch.', '')}; FLOP fwd = 2 T in out + 2 T r (in + out); fwd+bwd adds "
        "2 T in out + 4 T r (in + out) (base weight frozen).\n\n"
    )
    md += markdown_table(rows, columns)
    layer = layer_summary(rows)
    if layer:
        md += (
            "\n\nOne LLaMA-7B layer: the seven LoRA projections summed (4 x 4096x4096, 2 x 4096x11008, "
            "1 x 11008x4096); `vs peft` is peft's time over this provider's (above 1: faster than peft).\n\n"
        )
        md += markdown_table(
            layer,
            [
                ("tokens", "tokens"),
                ("r", "r"),
                ("mode", "mode"),
                ("provider", "provider"),
                ("ms", "summed ms"),
                ("vs_peft", "vs peft"),
                ("vs_base", "vs base matmuls"),
            ],
        )
    folder = write_results(
        f"bench_lora_linear_{str(dtype).replace('torch.', '')}",
        device,
        rows,
        md,
        args.out,
        {"quick": args.quick, "llama_layer": layer},
        roofline_math="tensor16" if dtype in (torch.float16, torch.bfloat16) else "fp32",
    )
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
