#!/usr/bin/env python
"""Write seed_fast/ops/dispatch_table.json from benchmark result files.

    python benchmarks/dispatch_table.py benchmarks/results/nvidia-h200 [more folders] [--device-class sm_90]

Each folder holds one run's JSON results (bench_qformer_attention.json, bench_codebook_lookup_*.json,
bench_lora_linear_*.json). For every op, case and size, every backend `impl=` can name is compared,
vendor paths included (torch's SDPA backends, cuBLAS through the "torch" paths), and two choices are
stored: "eager" (smallest max(device time, host time per call), host noise aside) and "graph"
(smallest device time).
The device class of a folder comes from its results' metadata, or from --device-class for older
results. Device classes not named in these folders keep what the table already holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "seed_fast" / "ops" / "dispatch_table.json"

# benchmark provider name -> impl= value, per op
ATTENTION_IMPLS = {
    "seed_fast sdpa": "sdpa",
    "SDPA efficient": "sdpa_efficient",
    "SDPA cudnn": "sdpa_cudnn",
    "SDPA flash": "sdpa_flash",
    "seed_fast triton": "triton",
}
CODEBOOK_IMPLS = {
    "seed_fast cpu": "cpu",
    "seed_fast cuda": "cuda",
    "seed_fast cuda_tc": "cuda_tc",
    "seed_fast triton": "triton",
    "seed_fast torch": "torch",
}
LORA_IMPLS = {"seed_fast torch": "torch", "seed_fast lowrank": "lowrank", "seed_fast triton": "triton"}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _times(row: dict, key: str, scale: float) -> tuple[float, float] | None:
    """(device us, host us) of a result row, or None where it did not run."""
    dev = _num(row.get(key))
    if dev is None:
        return None
    host = _num(row.get("host_us"))
    return round(dev * scale, 2), round(host, 1) if host is not None else round(dev * scale, 2)


def _decide(times: dict[str, tuple[float, float]]) -> dict:
    """eager: smallest max(device, host), where host times within 1.5x of the smallest host time
    count as equal (host timings of a few tens of microseconds vary by that much between runs;
    a real difference in host work, as between a custom op and an ATen op, is larger), ties going
    to the smaller device time; graph: smallest device time."""
    floor = min(h for _, h in times.values())

    def eager_cost(i):
        d, h = times[i]
        return max(d, h if h > 1.5 * floor else floor)

    best = min(eager_cost(i) for i in times)
    eager = min((i for i in times if eager_cost(i) <= 1.02 * best), key=lambda i: (times[i][0], i))
    graph = min(times, key=lambda i: (times[i][0], i))
    return {
        "eager": eager,
        "graph": graph,
        "us": {i: {"device": d, "host": h} for i, (d, h) in sorted(times.items())},
    }


def attention_rows(data: dict) -> list[dict]:
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in data["rows"]:
        impl = ATTENTION_IMPLS.get(r.get("provider"))
        t = _times(r, "us", 1.0)
        if impl is None or t is None:
            continue
        kind = "self" if str(r["attention"]).startswith("self") else "cross"
        groups[(r["dtype"], kind, r["mode"], int(r["B"]))][impl] = t
    out = []
    for (dtype, kind, mode, b), times in sorted(groups.items()):
        out.append({"case": {"dtype": dtype, "attention": kind, "mode": mode}, "size": b, **_decide(times)})
    return out


def codebook_rows(data: dict, dtype: str) -> list[dict]:
    groups: dict[int, dict] = defaultdict(dict)
    for r in data["rows"]:
        impl = CODEBOOK_IMPLS.get(r.get("provider"))
        t = _times(r, "ms", 1e3)
        if impl is None or t is None or int(r["D"]) != 32 or int(r["K"]) != 8192:
            continue  # SEED's codebook: 8192 codes of 32 dims
        groups[int(r["N"])][impl] = t
    return [{"case": {"dtype": dtype}, "size": n, **_decide(times)} for n, times in sorted(groups.items()) if times]


def lora_rows(data: dict, dtype: str) -> list[dict]:
    # summed over the benchmark's layer shapes: one decision per (mode, tokens)
    sums: dict[tuple, dict] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0]))
    for r in data["rows"]:
        impl = LORA_IMPLS.get(r.get("provider"))
        t = _times(r, "ms", 1e3)
        if impl is None or t is None or str(r.get("shape", "")).startswith("decode"):
            continue
        acc = sums[(r["mode"], int(r["tokens"]))][impl]
        acc[0] += t[0]
        acc[1] += t[1]
        acc[2] += 1
    out = []
    for (mode, tokens), per in sorted(sums.items()):
        counts = {v[2] for v in per.values()}
        if len(counts) != 1:  # an impl missing on some shape: compare like with like only
            keep = max(counts)
            per = {i: v for i, v in per.items() if v[2] == keep}
        times = {i: (v[0], v[1]) for i, v in per.items()}
        out.append({"case": {"dtype": dtype, "mode": mode}, "size": tokens, **_decide(times)})
    return out


def build(folder: Path, device_class: str | None) -> tuple[str, dict, dict]:
    ops: dict[str, list] = {}
    meta_out: dict = {"folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)}
    dev = device_class
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        name = meta.get("benchmark", path.stem)
        dev = dev or meta.get("device_class")
        meta_out.setdefault("device", meta.get("device"))
        meta_out.setdefault("dates", []).append(f"{path.name}: {meta.get('date')}")
        if name == "bench_qformer_attention":
            ops["qformer_attention"] = attention_rows(data)
        elif name.startswith("bench_codebook_lookup_"):
            ops.setdefault("codebook_lookup", []).extend(codebook_rows(data, name.rsplit("_", 1)[1]))
        elif name.startswith("bench_lora_linear_"):
            ops["lora_linear"] = lora_rows(data, name.rsplit("_", 1)[1])
    if dev is None:
        raise SystemExit(f"{folder}: no device_class in the results' metadata; pass --device-class")
    return dev, ops, meta_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--device-class", default=None, help="e.g. sm_90, for results written without one")
    p.add_argument("--out", type=Path, default=TABLE)
    args = p.parse_args(argv)
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table.setdefault("format", 1)
    table["about"] = (
        "Backends impl='auto' runs, per device class, op, case and size, from benchmark runs; "
        "written by benchmarks/dispatch_table.py. eager: smallest max(device, host) time per call; "
        "graph: smallest device time. Times in microseconds."
    )
    devices = table.setdefault("devices", {})
    sources = table.setdefault("sources", {})
    for folder in args.folders:
        dev, ops, meta = build(folder.resolve(), args.device_class)
        devices[dev] = {**devices.get(dev, {}), **ops}
        sources[dev] = meta
        for op, rows in ops.items():
            picks = defaultdict(int)
            for r in rows:
                picks[r["eager"]] += 1
            print(f"{dev:6s} {op:18s} {len(rows):3d} cases, eager picks {dict(picks)}")
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
