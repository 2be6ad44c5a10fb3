#!/usr/bin/env python
"""Nearest-code search, side by side: what users would pick instead, and each seed_fast backend.

Providers: SEED's expanded formula in torch (|z|^2 + |e|^2 - 2 z e^T, then argmin), torch.cdist +
argmin, torch.compile of our reference, faiss-cpu IndexFlatL2 (CPU, fp32), vector-quantize-pytorch
(when installed), and seed_fast's ref / cpu / triton / cuda backends (those that can run here).
Shapes: N in {32, 1024, 8192, 65536} x K in {8192, 16384} x D in {32, 768}.

Units (formulas used below):
  GFLOP/s = 2 * N * K * D / time          (the multiply-adds of all N x K dot products)
  GB/s    = (N * D + K * D) * itemsize + 8 * N) / time   (inputs read once, int64 indices written)
  peak MB = memory the call adds at its peak (see benchmarks/common.py), outputs included
On CPU, shapes above --max-gflop of work are skipped (2 cores cannot sweep 1.6 TFLOP per call), and
providers that materialize N x K distances are skipped above --max-nk-gb.
Every provider's indices are compared with seed_fast's before timing ("agree" column).

    python benchmarks/bench_codebook_lookup.py [--quick] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, peak_extra_bytes, time_fn, write_results  # noqa: E402

from seed_fast.ops import codebook_lookup, codebook_lookup_ref  # noqa: E402
from seed_fast.ops.codebook_lookup import not_supported_reasons  # noqa: E402

cl_mod = sys.modules["seed_fast.ops.codebook_lookup"]


def seed_expanded(z, cb):
    """SEED's VectorQuantizer distance: z^2 + e^2 - 2 z e^T in the input dtype, then argmin."""
    d = z.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1) - 2 * z @ cb.t()
    return d.argmin(1)


def make_providers(device: str, dtype: torch.dtype, k: int, d: int, cb: torch.Tensor) -> dict:
    """name -> (fn(z) -> indices, materializes N x K)."""
    prov = {
        "seed expanded (torch)": (lambda z: seed_expanded(z, cb), True),  # (N, K) distances
        "torch.cdist + argmin": (lambda z: torch.cdist(z, cb).argmin(1), True),
    }
    compiled = torch.compile(lambda z, c: codebook_lookup_ref(z, c)[0], dynamic=True)  # one compile for all N
    prov["torch.compile(ref)"] = (lambda z: compiled(z, cb), False)
    if device == "cpu" and dtype == torch.float32:
        try:
            import faiss

            index = faiss.IndexFlatL2(d)
            index.add(cb.numpy())
            prov["faiss IndexFlatL2"] = (lambda z: torch.from_numpy(index.search(z.numpy(), 1)[1][:, 0]), False)
        except ImportError:
            pass
    try:
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=d, codebook_size=k, kmeans_init=False).to(device).eval()
        with torch.no_grad():
            vq._codebook.embed.copy_(cb.float()[None])
        prov["vector-quantize-pytorch"] = (lambda z: vq(z.float()[None])[1][0], True)  # builds N x K distances
    except Exception:  # not installed, or an API change: then it is simply not in the table
        pass
    for impl in ("ref", "torch", "cpu", "triton", "cuda", "cuda_tc", "auto"):
        if impl == "triton" and device == "cpu":
            continue  # the interpreter checks correctness; its speed means nothing
        if impl == "auto" or not not_supported_reasons(impl, cb[:1], cb):
            prov[f"seed_fast {impl}"] = (lambda z, impl=impl: codebook_lookup(z, cb, impl=impl)[0], False)
    return prov


def flip_rates(device: str, n: int = 2048, k: int = 8192, d: int = 32) -> list[dict]:
    """How often fp16 inputs give a different code than float64 on the same (fp16) values."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for offset in (0.0, 4.0):
        z = (torch.randn(n, d, generator=g) + offset).half()
        cb = (torch.randn(k, d, generator=g) + offset).half()
        truth = torch.cdist(z.double(), cb.double()).argmin(1)
        zd, cbd = z.to(device), cb.to(device)
        seed = seed_expanded(zd, cbd).cpu()
        ours = codebook_lookup(zd, cbd)[0].cpu()
        rows.append(
            {
                "inputs": f"N(0,1) + {offset:g}, fp16, N={n} K={k} D={d}",
                "seed fp16 formula flips": f"{(seed != truth).double().mean() * 100:.2f}%",
                "seed_fast flips": f"{(ours != truth).double().mean() * 100:.2f}%",
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--max-gflop", type=float, default=None, help="skip shapes above this work (default: 150 on CPU)")
    p.add_argument("--max-nk-gb", type=float, default=2.0, help="skip N x K materializing providers above this")
    p.add_argument("--ns", default=None, help="comma list of N (rows to look up)")
    p.add_argument("--dims", default=None, help="comma list of code dims D (default 32,768)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    repeats = args.repeats or (5 if args.quick else 10)
    # --quick on CPU leaves out the 103-GFLOP shape (8192 x 8192 x 768) and times the reference, which is the
    # spec and slow by design, on the smallest shape only: the quick suite must fit 10 minutes on a slow VM
    max_gflop = (
        args.max_gflop
        if args.max_gflop is not None
        else ((20.0 if args.quick else 150.0) if device == "cpu" else math.inf)
    )
    ref_max_gflop = 0.1 if args.quick else 2.0
    ns = (32, 1024, 8192) if args.quick else (32, 1024, 8192, 65536)
    ks = (8192,) if args.quick else (8192, 16384)
    ds = (32, 768)
    if args.ns:
        ns = tuple(int(v) for v in args.ns.split(","))
    if args.dims:
        ds = tuple(int(v) for v in args.dims.split(","))

    rows = []
    g = torch.Generator().manual_seed(0)
    for k in ks:
        for d in ds:
            cb = torch.randn(k, d, generator=g).to(device, dtype)
            providers = make_providers(device, dtype, k, d, cb)
            for n in ns:
                gflop = 2 * n * k * d / 1e9
                z = torch.randn(n, d, generator=g).to(device, dtype)
                if gflop > max_gflop:
                    rows.append(
                        {
                            "N": n,
                            "K": k,
                            "D": d,
                            "provider": "(all)",
                            "note": f"skipped: {gflop:.0f} GFLOP > --max-gflop",
                        }
                    )
                    continue
                ours = codebook_lookup(z, cb)[0].cpu()
                for name, (fn, materializes) in providers.items():
                    row = {"N": n, "K": k, "D": d, "provider": name}
                    ref_chunks = n / max(1, cl_mod._REF_CHUNK_ELEMS // (k * d))
                    if name == "torch.compile(ref)" and ref_chunks > 64:
                        row["note"] = f"skipped: Dynamo would unroll the reference's {ref_chunks:.0f}-chunk loop"
                        rows.append(row)
                        continue
                    if name == "seed_fast ref" and gflop > ref_max_gflop:
                        row["note"] = (
                            f"skipped: the reference is the spec, slow by design, above {ref_max_gflop:g} GFLOP"
                        )
                        rows.append(row)
                        continue
                    if materializes and n * k * 4 / 1e9 > args.max_nk_gb:
                        row["note"] = f"skipped: N x K = {n * k * 4 / 1e9:.1f} GB"
                        rows.append(row)
                        continue
                    with torch.no_grad():
                        idx = fn(z).cpu()
                        row["agree"] = f"{(idx == ours).double().mean() * 100:.1f}%"
                        t = time_fn(
                            lambda: fn(z), device, warmup=1 if device == "cpu" else 3, repeats=repeats, max_seconds=8.0
                        )
                        peak = peak_extra_bytes(lambda: fn(z), device)
                    sec = t["median_ms"] / 1e3
                    bytes_moved = (n * d + k * d) * z.element_size() + 8 * n
                    row.update(
                        ms=f"{t['median_ms']:.3f}",
                        iqr=f"{t['q1_ms']:.3f}-{t['q3_ms']:.3f}",
                        gflops=f"{gflop / sec:.1f}",
                        gbs=f"{bytes_moved / sec / 1e9:.2f}",
                        peak_mb=f"{peak / 2**20:.1f}" if peak is not None else "n/a",
                        host_us=f"{t['host_us']:.1f}",
                        method=t["method"],
                    )
                    rows.append(row)
                    print(
                        f"N={n:6d} K={k:5d} D={d:4d} {name:26s} {row['ms']:>10s} ms  {row['gflops']:>8s} GFLOP/s  "
                        f"peak {row['peak_mb']:>8s} MB  agree {row['agree']}",
                        flush=True,
                    )

    columns = [
        ("N", "N"),
        ("K", "K"),
        ("D", "D"),
        ("provider", "provider"),
        ("ms", "median ms"),
        ("iqr", "IQR ms"),
        ("gflops", "GFLOP/s"),
        ("gbs", "GB/s"),
        ("peak_mb", "peak extra MB"),
        ("agree", "agree"),
        ("host_us", "host us/call"),
        ("method", "timing"),
        ("note", "note"),
    ]
    md = f"dtype {args.dtype}; {repeats} timed repeats; GFLOP/s = 2NKD/t; GB/s = ((N+K)D*itemsize + 8N)/t\n\n"
    md += markdown_table(rows, columns)
    flips = flip_rates(device)
    md += "\n## Code flips with fp16 inputs (against float64 on the same fp16 values)\n\n"
    md += markdown_table(flips, [(k, k) for k in flips[0]])
    folder = write_results(
        f"bench_codebook_lookup_{args.dtype}", device, rows, md, args.out, {"quick": args.quick}, roofline_math="fp32"
    )
    _plot(rows, folder / f"bench_codebook_lookup_{args.dtype}.png", device)
    print(md)
    print(f"results in {folder}")
    return 0


def _plot(rows, path, device) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    timed = [r for r in rows if "ms" in r]
    panels = sorted({(r["K"], r["D"]) for r in timed})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (k, d) in zip(axes[0], panels):
        for name in sorted({r["provider"] for r in timed}):
            pts = [(r["N"], float(r["ms"])) for r in timed if (r["K"], r["D"], r["provider"]) == (k, d, name)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="N (vectors)", ylabel="median ms", title=f"K={k}, D={d} ({device})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
