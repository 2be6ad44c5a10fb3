#!/usr/bin/env python
"""The README's and docs/benchmarks.md's benchmark tables, made from the committed results JSON (so no
figure is typed by hand).

    python benchmarks/readme_tables.py [--device cpu-amd-epyc-2c]   # print the full tables
    python benchmarks/readme_tables.py --summary                      # print the per-device summaries
    python benchmarks/readme_tables.py --write                        # rewrite both files' tables
    python benchmarks/readme_tables.py --check                        # exit 1 if either file is stale

The README holds one summary table per device (between the `summary` markers); docs/benchmarks.md
holds every full table (between the `full` markers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# links in the generated tables are relative to the file they land in: "" for the README, "../" for docs/
LINK_PREFIX = {"README.md": "", "docs/benchmarks.md": "../"}
_link = ""  # the prefix of the file being generated


def _rel(path: Path) -> tuple[str, str]:
    """(link text, link target) of a results file or folder."""
    rel = path.relative_to(ROOT).as_posix()
    return rel, _link + rel


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
        "[{}]({}):".format(*_rel(path.with_suffix(".md"))),
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
        k = tuple(r.get(c, "-") for c in row_keys)
        if k not in keys:
            keys.append(k)
    text, target = _rel(path.with_suffix(".md"))
    better = "higher" if higher_is_better else "lower"
    lines = [
        f"{title}, {unit} ({better} is better), {meta['device']}, torch {meta['versions'].get('torch')}, "
        f"{meta['date']}, from [{text}]({target}):",
        "",
        "| " + " | ".join(row_keys) + " | " + " | ".join(present) + " |",
        "| " + " | ".join("---" for _ in row_keys + present) + " |",
    ]
    for k in keys:
        cells = {r["provider"]: float(r[value]) for r in rows if tuple(r.get(c, "-") for c in row_keys) == k}
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
    text, target = _rel(path.with_suffix(".md"))
    cols = [
        ("codes_per_image", "codes / image"),
        ("llm_tokens_per_image", "LLM tokens / image"),
        ("tok_img_s", "tokenizer images/s"),
        ("pre_img_s", "LLM prefill images/s"),
    ]
    lines = [
        f"What an image costs an LLM, batch {rows[0]['batch']}, {meta['device']}, "
        f"torch {meta['versions'].get('torch')}, "
        f"{meta['date']}, from [{text}]({target}):",
        "",
        "| model | " + " | ".join(h for _, h in cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(str(r[k]) for k, _ in cols) + " |")
    return "\n".join(lines)


def full_tables(folder: Path) -> list[str]:
    """Every table of one results folder, in a fixed order."""
    out: list[str] = []
    for path in sorted(folder.glob("bench_codebook_lookup_*.json")):
        out.append(codebook_table(path))
    path = folder / "bench_qformer_attention.json"
    if path.exists():
        provs = [
            "seed_fast ref (eager)",
            "torch.compile(ref)",
            "SDPA (torch default)",
            "SDPA flash",
            "SDPA efficient",
            "SDPA cudnn",
            "SDPA math",
            "xformers mem-efficient",
            "flash-attn 2",
            "seed_fast sdpa",
            "seed_fast triton",
        ]
        out.append(
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
    for path in sorted(folder.glob("bench_tokenizer_*.json")):
        provs = [
            "transformers Blip2QFormerModel",
            "seed_fast reference",
            "seed_fast to_fast()",
            "torch.compile(to_fast())",
            "to_fast() + CUDA graph",
            "seed_fast reference (eager)",
            "eager + SDPA attention",
            "to_fast(cuda_graph=False)",
            "to_fast(cuda_graph=True)",
        ]
        out.append(pivot_table(path, f"Q-Former and tokenizer ({path.stem.rsplit('_', 1)[-1]})", ["part", "B"], provs))
    for path in sorted(folder.glob("bench_lora_linear_*.json")):
        provs = [
            "base matmul alone",
            "peft LoRA Linear",
            "merged weights",
            "seed_fast torch",
            "seed_fast triton",
            "seed_fast auto",
            "peft mixed batch",
            "seed_fast lora_linear_multi",
        ]
        keys = ["shape", "tokens", "r", "mode"]
        if any("dropout" in r for r in json.loads(path.read_text())["rows"]):
            keys.append("dropout")
        out.append(
            pivot_table(
                path,
                f"LoRA linear ({path.stem.rsplit('_', 1)[-1]})",
                keys,
                provs,
                filt=lambda r: r["tokens"] != 1 or "decode" in r["shape"],
            )
        )
    for path in sorted(folder.glob("bench_llm_decode_*.json")):
        provs = [
            "transformers generate",
            "transformers generate (static)",
            "seed_fast generate_ids",
            "seed_fast generate_ids compiled",
            "seed_fast image codes (32)",
        ]
        model = path.stem.split("_", 3)[-1]
        out.append(
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
        rows = json.loads(path.read_text())["rows"]
        if any(r.get("table") == "prefill" for r in rows):
            out.append(
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
        if any(r.get("table") == "lora" for r in rows):
            lora = ["peft LoRA (unmerged)", "seed_fast fused lora_linear", "merged into the base weights"]
            for value, what in (
                ("pre_tok_s", "prefill, prompt tokens/s"),
                ("gen_tok_s", "greedy generate, tokens/s"),
            ):
                out.append(
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
    path = folder / "bench_related.json"
    if path.exists():
        out.append(related_table(path))
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
        out.append(
            pivot_table(
                path,
                "Embedded model, torch vs the exported ONNX in seed_fast.runtime",
                ["part", "workload"],
                provs,
                value="median_ms",
            )
        )
    return out


# ------------------------------------------------------------------------------------------ summary
# What the README's summary shows per device: on the cases a user meets first, the fastest seed_fast
# backend beside the fastest alternative measured in the same run (another library, torch's own
# path, or torch.compile of the reference). The references are the specification, not a backend.
# A backend named `sdpa` or `torch` is seed_fast's op calling torch's own kernel.
REFERENCES = {"seed_fast ref", "seed_fast ref (eager)", "seed_fast reference", "seed_fast reference (eager)"}
NOT_ALTERNATIVES = {"(all)", "base matmul alone", "seed_fast image codes (32)", "eager + SDPA attention"}
SHOWN_AS = {"seed expanded (torch)": "SEED's formula (torch)", "torch.compile(ref)": "torch.compile(reference)"}


def _ours(provider: str) -> bool:
    return provider.startswith("seed_fast ") and provider not in REFERENCES


def _qformer_ours(provider: str) -> bool:  # the model's whole fast path, or its reference
    return provider.startswith("seed_fast ") or "to_fast(" in provider


def _largest(rows, key):
    top = max((r[key] for r in rows), default=None)
    return [r for r in rows if r[key] == top]


def _codebook(n):
    def pick(rows):
        return [r for r in rows if r["N"] == n and r["K"] == 8192 and r["D"] == 32]

    label = f"fp32, {n} x 32 against 8192 codes" + (" (one image)" if n == 32 else "")
    return "`codebook_lookup`", label, pick, _ours


def _attention(mode):
    def pick(rows):
        dtype = "float16" if any(r["dtype"] == "float16" for r in rows) else "float32"
        return [
            r for r in rows if r["dtype"] == dtype and r["B"] == 256 and r["attention"] == "cross" and r["mode"] == mode
        ]

    return "`qformer_attention`", f"{{dtype}}, batch 256, cross 32 x 257, {mode}", pick, _ours


def _lora_training(rows):
    rows = [r for r in rows if r["shape"].startswith("LLaMA-7B attn") and r["mode"] == "fwd+bwd"]
    rows = _largest(rows, "tokens")
    if any("dropout" in r for r in rows):
        top = max(float(r.get("dropout") or 0) for r in rows)
        rows = [r for r in rows if float(r.get("dropout") or 0) == top]
    return rows


def _lora_decode(rows):
    return [r for r in rows if r["shape"].startswith("decode") and r["shape"].endswith(", 32 adapters")]


# (file glob, op, case, row picker, which providers are seed_fast's, value, unit, higher is better)
SUMMARY = [
    ("bench_codebook_lookup_float32.json", *_codebook(32), "ms", "ms", False),
    ("bench_codebook_lookup_float32.json", *_codebook(8192), "ms", "ms", False),
    ("bench_qformer_attention.json", *_attention("fwd"), "us", "us", False),
    ("bench_qformer_attention.json", *_attention("fwd+bwd"), "us", "us", False),
    (
        "bench_lora_linear_*.json",
        "`lora_linear`",
        "{dtype}, 4096 x 4096, r 16, {tokens} tokens, fwd+bwd{dropout}",
        _lora_training,
        _ours,
        "ms",
        "ms",
        False,
    ),
    (
        "bench_lora_linear_*.json",
        "`lora_linear_multi`",
        "{dtype}, decode, 32 rows over 32 adapters",
        _lora_decode,
        _ours,
        "ms",
        "ms",
        False,
    ),
    (
        "bench_tokenizer_float32.json",
        "Q-Former",
        "fp32, one image",
        lambda rows: [r for r in rows if r["part"] == "Q-Former" and r["B"] == 1],
        _qformer_ours,
        "ms",
        "ms",
        False,
    ),
    (
        "bench_llm_decode_*.json",
        "LLM prefill",
        "fp32, {model}, 8 prompts of 64 tokens",
        lambda rows: [r for r in rows if r.get("table") == "prefill" and r["batch"] == 8],
        _ours,
        "tok_s",
        "tokens/s",
        True,
    ),
]


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def summary_rows(folder: Path) -> tuple[list[str], list[dict]]:
    """The summary table's lines for one results folder, and the metadata of the files it read."""
    lines, metas = [], []
    for pattern, op, case, pick, is_ours, value, unit, higher in SUMMARY:
        for path in sorted(folder.glob(pattern)):
            data = json.loads(path.read_text())
            rows = [r for r in pick(data["rows"]) if r.get(value) not in (None, "", "-")]
            ours = [r for r in rows if is_ours(r["provider"])]
            theirs = [
                r for r in rows if not is_ours(r["provider"]) and r["provider"] not in REFERENCES | NOT_ALTERNATIVES
            ]
            if not ours or not theirs:
                continue
            best = max if higher else min
            a = best(ours, key=lambda r: float(r[value]))
            b = best(theirs, key=lambda r: float(r[value]))
            va, vb = float(a[value]), float(b[value])
            speedup = va / vb if higher else vb / va
            dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
                a.get("dtype") or path.stem.rsplit("_", 1)[-1], a.get("dtype", "")
            )
            drop = float(a.get("dropout") or 0)
            label = case.format(
                dtype=dtype, tokens=a.get("tokens"), model=a.get("model"), dropout=f", dropout {drop:g}" if drop else ""
            )
            name = a["provider"].removeprefix("seed_fast ")
            other = SHOWN_AS.get(b["provider"], b["provider"])
            shown = unit
            if unit == "us" and min(va, vb) >= 10000:
                va, vb, shown = va / 1000, vb / 1000, "ms"
            text, target = _rel(path.with_suffix(".md"))
            lines.append(
                f"| {op} | {label} | {_num(va)} {shown} ({name}) | {_num(vb)} {shown} ({other}) | "
                f"[{speedup:.2f}x]({target}) |"
            )
            metas.append(data["meta"])
    return lines, metas


def summary_table(folder: Path) -> str | None:
    """One device's summary: a caption with the conditions, then the table; None without results."""
    rows, metas = summary_rows(folder)
    if not rows:
        return None
    device = metas[0]["device"]
    torches = sorted({m["versions"].get("torch") for m in metas})
    days = sorted({m["date"].split()[0] for m in metas})
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    text, target = _rel(folder)
    return "\n".join(
        [
            f"{device}, torch {', '.join(torches)}, {when}, from [{text}/]({target}/):",
            "",
            "| op | case | seed_fast (fastest backend) | fastest alternative | speed-up |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )


def _folders(device: str | None = None) -> list[Path]:
    return [RESULTS / device] if device else sorted(x for x in RESULTS.iterdir() if x.is_dir())


def generated(target: str) -> str:
    """The generated block of README.md ("README.md": every device's summary) or of docs/benchmarks.md
    (every full table, one section per device)."""
    global _link
    _link = LINK_PREFIX[target]
    try:
        if target == "README.md":
            return "\n\n".join(t for t in (summary_table(f) for f in _folders()) if t)
        parts = []
        for folder in _folders():
            tables = full_tables(folder)
            if tables:
                parts.append(f"### {folder.name}\n\n" + "\n\n".join(tables))
        return "\n\n".join(parts)
    finally:
        _link = ""


def _markers(target: str) -> tuple[str, str]:
    kind = "summary" if target == "README.md" else "full"
    return (
        f"<!-- begin {kind} tables: written by `python benchmarks/readme_tables.py --write` -->",
        f"<!-- end {kind} tables -->",
    )


def stale(target: str) -> str | None:
    """Why `target`'s generated block differs from what the results give; None when it is current."""
    begin, end = _markers(target)
    text = (ROOT / target).read_text()
    if text.count(begin) != 1 or text.count(end) != 1:
        return f"{target}: expected one {begin!r} and one {end!r}"
    current = text.split(begin, 1)[1].split(end, 1)[0]
    if current.strip("\n") != generated(target):
        return f"{target}: its tables differ from the results files (run python benchmarks/readme_tables.py --write)"
    return None


def write(target: str) -> None:
    begin, end = _markers(target)
    path = ROOT / target
    text = path.read_text()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{generated(target)}\n{end}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="results folder name (default: every folder)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--summary", action="store_true", help="print the README's per-device summary tables")
    what.add_argument("--write", action="store_true", help="rewrite the tables of README.md and docs/benchmarks.md")
    what.add_argument("--check", action="store_true", help="exit 1 when README.md or docs/benchmarks.md is stale")
    args = p.parse_args(argv)
    targets = list(LINK_PREFIX)
    if args.write:
        for t in targets:
            write(t)
        return 0
    if args.check:
        problems = [m for m in map(stale, targets) if m]
        for m in problems:
            print(m, file=sys.stderr)
        return 1 if problems else 0
    for folder in _folders(args.device):
        tables = [summary_table(folder)] if args.summary else full_tables(folder)
        for t in tables:
            if t:
                print(t)
                print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
