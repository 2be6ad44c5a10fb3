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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="results folder name (default: every folder)")
    args = p.parse_args(argv)
    folders = [RESULTS / args.device] if args.device else sorted(x for x in RESULTS.iterdir() if x.is_dir())
    for folder in folders:
        for path in sorted(folder.glob("bench_codebook_lookup_*.json")):
            print(codebook_table(path))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
