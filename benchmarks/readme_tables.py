#!/usr/bin/env python
"""Print the README's benchmark tables from committed results JSON (so no figure is typed by hand).

python benchmarks/readme_tables.py [--device cpu-amd-epyc-2c]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CODEBOOK_PROVIDERS = [
    ("seed expanded (torch)", "SEED's formula (torch)"),
    ("torch.cdist + argmin", "torch.cdist + argmin"),
    ("faiss IndexFlatL2", "faiss IndexFlatL2"),
    ("seed_fast cpu", "seed_fast cpu"),
    ("seed_fast triton", "seed_fast triton"),
    ("seed_fast cuda", "seed_fast cuda"),
]


def _fmt(ms: float) -> str:
    return f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def codebook_table(path: Path, k: int = 8192) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], [r for r in data["rows"] if "ms" in r and r["K"] == k]
    present = [(p, h) for p, h in CODEBOOK_PROVIDERS if any(r["provider"] == p for r in rows)]
    shapes = sorted({(r["D"], r["N"]) for r in rows})
    lines = [
        f"`codebook_lookup`, {path.stem.rsplit('_', 1)[-1]}, K = {k} codes, median ms (lower is better), "
        f"{meta['device']}, torch {meta['versions'].get('torch')}, {meta['date']}, from "
        f"[{path.relative_to(RESULTS.parent.parent).with_suffix('.md')}]"
        f"({path.relative_to(RESULTS.parent.parent).with_suffix('.md')}):",
        "",
        "| N x D | " + " | ".join(h for _, h in present) + " |",
        "| --- | " + " | ".join("---" for _ in present) + " |",
    ]
    for d, n in shapes:
        cells = {r["provider"]: float(r["ms"]) for r in rows if (r["N"], r["D"]) == (n, d)}
        best = min((cells[p] for p, _ in present if p in cells), default=None)
        out = []
        for p, _ in present:
            if p not in cells:
                out.append("-")
            else:
                s = _fmt(cells[p])
                out.append(f"**{s}**" if cells[p] == best else s)
        label = f"{n} x {d}" + (" (one image)" if n == 32 else "")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def pivot_table(
    path: Path,
    title: str,
    row_keys: list[str],
    providers: list[str],
    filt=None,
    value="ms",
    unit="median ms",
    higher_is_better=False,
) -> str:
    """A (row keys) x provider table of `value` from a results JSON; the best per row in bold."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    rows = [r for r in data["rows"] if value in r and (filt is None or filt(r))]
    present = [p for p in providers if any(r["provider"] == p for r in rows)]
    keys = []
    for r in rows:
        k = tuple(r[c] for c in row_keys)
        if k not in keys:
            keys.append(k)
    rel = path.relative_to(RESULTS.parent.parent).with_suffix(".md")
    better = "higher" if higher_is_better else "lower"
    lines = [
        f"{title}, {unit} ({better} is better), {meta['device']}, torch {meta['versions'].get('torch')}, "
        f"{meta['date']}, from [{rel}]({rel}):",
        "",
        "| " + " | ".join(row_keys) + " | " + " | ".join(present) + " |",
        "| " + " | ".join("---" for _ in row_keys + present) + " |",
    ]
    for k in keys:
        cells = {r["provider"]: float(r[value]) for r in rows if tuple(r[c] for c in row_keys) == k}
        best = (max if higher_is_better else min)((cells[p] for p in present if p in cells), default=None)
        out = [
            ("-" if p not in cells else (f"**{_fmt(cells[p])}**" if cells[p] == best else _fmt(cells[p])))
            for p in present
        ]
        lines.append("| " + " | ".join(str(x) for x in k) + " | " + " | ".join(out) + " |")
    return "\n".join(lines)


def related_table(path: Path) -> str:
    """SEED vs LaVIT vs Flamingo-style: one row per model (bench_related)."""
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    rel = path.relative_to(RESULTS.parent.parent).with_suffix(".md")
    cols = [
        ("codes_per_image", "codes / image"),
        ("llm_tokens_per_image", "LLM tokens / image"),
        ("tok_img_s", "tokenizer images/s"),
        ("pre_img_s", "LLM prefill images/s"),
    ]
    lines = [
        f"What an image costs an LLM, batch {rows[0]['batch']}, {meta['device']}, "
        f"torch {meta['versions'].get('torch')}, "
        f"{meta['date']}, from [{rel}]({rel}):",
        "",
        "| model | " + " | ".join(h for _, h in cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(str(r[k]) for k, _ in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="results folder name (default: every folder)")
    args = p.parse_args(argv)
    folders = [RESULTS / args.device] if args.device else sorted(x for x in RESULTS.iterdir() if x.is_dir())
    for folder in folders:
        for path in sorted(folder.glob("bench_codebook_lookup_*.json")):
            print(codebook_table(path))
            print()
        path = folder / "bench_qformer_attention.json"
        if path.exists():
            provs = [
                "seed_fast ref (eager)",
                "torch.compile(ref)",
                "SDPA (torch default)",
                "SDPA flash",
                "SDPA efficient",
                "SDPA cudnn",
                "xformers mem-efficient",
                "flash-attn 2",
                "seed_fast sdpa",
                "seed_fast triton",
            ]
            print(
                pivot_table(
                    path,
                    "`qformer_attention`, 12 heads x 64, 32 queries",
                    ["dtype", "B", "attention", "mode"],
                    provs,
                    filt=lambda r: r["B"] != 1,
                    value="us",
                    unit="median us",
                )
            )
            print()
        for path in sorted(folder.glob("bench_tokenizer_*.json")):
            provs = [
                "transformers Blip2QFormerModel",
                "seed_fast reference",
                "seed_fast to_fast()",
                "torch.compile(to_fast())",
                "to_fast() + CUDA graph",
                "seed_fast reference (eager)",
                "eager + SDPA attention",
                "to_fast(cuda_graph=True)",
            ]
            print(pivot_table(path, f"Q-Former and tokenizer ({path.stem.rsplit('_', 1)[-1]})", ["part", "B"], provs))
            print()
        for path in sorted(folder.glob("bench_lora_linear_*.json")):
            provs = [
                "base matmul alone",
                "peft LoRA Linear",
                "merged weights",
                "seed_fast torch",
                "seed_fast triton",
                "peft mixed batch",
                "seed_fast lora_linear_multi",
            ]
            print(
                pivot_table(
                    path,
                    f"LoRA linear ({path.stem.rsplit('_', 1)[-1]})",
                    ["shape", "tokens", "r", "mode"],
                    provs,
                    filt=lambda r: r["tokens"] != 1 or "decode" in r["shape"],
                )
            )
            print()
        for path in sorted(folder.glob("bench_llm_decode_*.json")):
            provs = [
                "transformers generate",
                "transformers generate (static)",
                "seed_fast generate_ids",
                "seed_fast generate_ids compiled",
                "seed_fast image codes (32)",
            ]
            model = path.stem.split("_", 3)[-1]
            print(
                pivot_table(
                    path,
                    f"LLM greedy decoding ({model}), 32 new tokens",
                    ["batch"],
                    provs,
                    value="tok_s",
                    unit="tokens/s",
                    higher_is_better=True,
                    filt=lambda r: "table" not in r,
                )
            )
            print()
            rows = json.loads(path.read_text())["rows"]
            if any(r.get("table") == "prefill" for r in rows):
                print(
                    pivot_table(
                        path,
                        f"LLM prefill alone ({model}), 64-token prompts",
                        ["batch"],
                        ["transformers forward (dynamic cache)", "seed_fast KVDecoder.prefill"],
                        value="tok_s",
                        unit="prompt tokens/s",
                        higher_is_better=True,
                        filt=lambda r: r.get("table") == "prefill",
                    )
                )
                print()
            if any(r.get("table") == "lora" for r in rows):
                lora = ["peft LoRA (unmerged)", "seed_fast fused lora_linear", "merged into the base weights"]
                for value, what in (
                    ("pre_tok_s", "prefill, prompt tokens/s"),
                    ("gen_tok_s", "greedy generate, tokens/s"),
                ):
                    print(
                        pivot_table(
                            path,
                            f"LLM with SEED-LLaMA's LoRA (r 16) ({model}), {what.split(',')[0]}",
                            ["batch"],
                            lora,
                            value=value,
                            unit=what.split(", ")[1],
                            higher_is_better=True,
                            filt=lambda r: r.get("table") == "lora",
                        )
                    )
                    print()
        path = folder / "bench_related.json"
        if path.exists():
            print(related_table(path))
            print()
        path = folder / "bench_export.json"
        if path.exists():
            provs = [
                "torch eager",
                "torch to_fast",
                "torch (static KV cache)",
                "onnxruntime CPU",
                "onnxruntime CUDA",
                "onnxruntime Tensorrt",
            ]
            print(
                pivot_table(
                    path,
                    "Embedded model, torch vs the exported ONNX in seed_fast.runtime",
                    ["part", "workload"],
                    provs,
                    value="median_ms",
                )
            )
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
