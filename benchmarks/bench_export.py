#!/usr/bin/env python
"""The exported stack in onnxruntime against the same model in torch, part by part.

Model: the embedded default model (seed_fast/default_model/assets), exported to ONNX fp32 once
into a temporary folder. Providers: torch eager (reference path), torch with the tokenizer's fast
path (to_fast), onnxruntime through seed_fast.runtime (CPUExecutionProvider, or CUDA when --device
cuda and onnxruntime-gpu is installed). Outputs are compared before timing: codes, captions and
generated codes identical, embeddings and images within 1e-4.

Workloads (units):
  tokenizer    images -> codes at batch 1 and 32                      images/s = B / t
  detokenizer  codes -> embeddings at batch 32                         images/s
  caption      32 images' codes -> greedy captions (prefill + decode)  new tokens/s = tokens / t
  gen codes    8 prompts -> 32 image codes each                        image tokens/s = 8 * 32 / t
  decoder      one UNet call with guidance (batch 2 x 8)               images/s = 8 / t

    python benchmarks/bench_export.py [--quick] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = p.parse_args(argv)
    from seed_fast.default_model import load_default
    from seed_fast.default_model.demo import test_scenes
    from seed_fast.export import export_onnx
    from seed_fast.runtime import SeedRuntime, default_providers

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    providers = default_providers()
    if dev == "cpu" or "CUDAExecutionProvider" not in providers:
        providers = ["CPUExecutionProvider"]
    reps = {
        "repeats": 3 if args.quick else 10,
        "warmup": 1 if args.quick else 2,
        "max_seconds": 10.0 if args.quick else 30.0,
    }

    m = load_default()
    tmp = tempfile.TemporaryDirectory()
    export_onnx(["all"], tmp.name, checkpoint=m.folder, progress=False)
    rt = SeedRuntime(tmp.name, providers=providers)
    ort_name = f"onnxruntime {providers[0].replace('ExecutionProvider', '')}"
    tok, llm, dec = m.tokenizer.to(dev), m.llm, m.decoder.to(dev)
    llm.model.to(dev)

    images, caps, _, _ = test_scenes(32)
    s = tok.config.vision.image_size
    pix = np.stack([np.asarray(im.resize((s, s))).transpose(2, 0, 1) for im in images]).astype(np.uint8)
    pix_t = torch.from_numpy(pix).to(dev)
    rows: list[dict] = []

    def add(part, workload, provider, units, n, fn):
        t = time_fn(fn, dev, **reps)
        rows.append(
            {
                "part": part,
                "workload": workload,
                "provider": provider,
                "median_ms": round(t["median_ms"], 3),
                "q1_ms": round(t["q1_ms"], 3),
                "q3_ms": round(t["q3_ms"], 3),
                "throughput": f"{n / t['median_ms'] * 1e3:.1f} {units}",
            }
        )
        print(
            f"{part:12s} {workload:28s} {provider:26s} {t['median_ms']:9.2f} ms  "
            f"{n / t['median_ms'] * 1e3:9.1f} {units}",
            flush=True,
        )

    # ---- tokenizer
    codes_ref = tok.encode(pix_t).cpu().numpy()
    assert np.array_equal(rt.encode(pix), codes_ref), "onnxruntime codes differ from torch"
    for b in (1, 32):
        tok.to_reference()
        add("tokenizer", f"batch {b}", "torch eager", "images/s", b, lambda b=b: tok.encode(pix_t[:b]))
        tok.to_fast()
        add("tokenizer", f"batch {b}", "torch to_fast", "images/s", b, lambda b=b: tok.encode(pix_t[:b]))
        add("tokenizer", f"batch {b}", ort_name, "images/s", b, lambda b=b: rt.encode(pix[:b]))
    tok.to_reference()
    # ---- detokenizer
    codes_t = torch.from_numpy(codes_ref).to(dev)
    assert (
        np.abs(rt.decode(codes_ref) - tok.decode(codes_t).cpu().numpy()).max()
        <= 1e-4 * np.abs(rt.decode(codes_ref)).max()
    )
    add("detokenizer", "batch 32", "torch eager", "images/s", 32, lambda: tok.decode(codes_t))
    add("detokenizer", "batch 32", ort_name, "images/s", 32, lambda: rt.decode(codes_ref))
    # ---- LLM: captions (greedy, KV cache)
    cap_rows = [llm.encode_turn(llm.template.caption, codes_ref[i : i + 1]) for i in range(32)]
    new_ids = llm.generate_ids(cap_rows)
    assert rt.generate_ids(cap_rows) == new_ids, "onnxruntime captions differ from torch"
    n_new = sum(len(r) for r in new_ids)
    add(
        "llm",
        f"caption 32 ({n_new} new tokens)",
        "torch (static KV cache)",
        "tokens/s",
        n_new,
        lambda: llm.generate_ids(cap_rows),
    )
    add("llm", f"caption 32 ({n_new} new tokens)", ort_name, "tokens/s", n_new, lambda: rt.generate_ids(cap_rows))
    prompts = caps[:8]
    assert np.array_equal(rt.generate_image_codes(prompts), llm.generate_image_codes(prompts).numpy())
    add(
        "llm",
        "8 prompts -> 32 codes each",
        "torch (static KV cache)",
        "tokens/s",
        8 * 32,
        lambda: llm.generate_image_codes(prompts),
    )
    add("llm", "8 prompts -> 32 codes each", ort_name, "tokens/s", 8 * 32, lambda: rt.generate_image_codes(prompts))
    # ---- decoder UNet (one guided step)
    emb = rt.decode(codes_ref[:8])
    c, sz = dec.sample_channels, dec.sample_size  # latents for a latent decoder
    x = np.random.default_rng(0).standard_normal((16, c, sz, sz)).astype(np.float32)
    t = np.full(16, 500, np.int64)
    e2 = np.concatenate([np.zeros_like(emb), emb])
    sess = rt.session("decoder")
    xt, tt, et = (torch.from_numpy(a).to(dev) for a in (x, t, e2))
    with torch.no_grad():
        ref = dec._denoise(xt, tt, et).float().cpu().numpy()
    got = sess.run(None, {"sample": x, "timestep": t, "embedding": e2})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())

    def torch_unet():
        with torch.no_grad():
            return dec._denoise(xt, tt, et)

    add("decoder", "UNet step, 8 images guided", "torch eager", "images/s", 8, torch_unet)
    add(
        "decoder",
        "UNet step, 8 images guided",
        ort_name,
        "images/s",
        8,
        lambda: sess.run(None, {"sample": x, "timestep": t, "embedding": e2}),
    )
    # ratios
    base = {
        (r["part"], r["workload"]): r["median_ms"]
        for r in rows
        if r["provider"].startswith("torch eager") or r["provider"].startswith("torch (")
    }
    for r in rows:
        ref_ms = base.get((r["part"], r["workload"]))
        r["vs_torch_eager"] = f"{ref_ms / r['median_ms']:.2f}x" if ref_ms else ""
    cols = [
        ("part", "part"),
        ("workload", "workload"),
        ("provider", "provider"),
        ("median_ms", "median ms"),
        ("q1_ms", "q1"),
        ("q3_ms", "q3"),
        ("throughput", "throughput"),
        ("vs_torch_eager", "speed vs torch"),
    ]
    md = (
        "Embedded default model; onnxruntime runs the exported fp32 graphs through seed_fast.runtime "
        "(numpy + onnxruntime). Outputs checked equal before timing.\n\n" + markdown_table(rows, cols)
    )
    import onnxruntime

    folder = write_results(
        "bench_export", dev, rows, md, args.out, extra={"onnxruntime": onnxruntime.__version__, "providers": providers}
    )
    print(md)
    print(f"results in {folder}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
