#!/usr/bin/env python
"""Every benchmark in one run, then one summary: markdown tables, a PNG, a JSON with every number.

    python benchmarks/run_all.py [--quick] [--only codebook attention ...] [--device cpu|cuda] [--out DIR]
    seed-fast bench ...                      (the same)

Each benchmark script runs in its own process (one crash or time-out does not stop the rest) with a
time limit, writes its tables into the output folder (default benchmarks/results/<device>/) and its
log into logs/. Then summary.md (every table, with device, versions, date and the status of each
script), summary.json (meta + every script's rows) and summary.png (the headline comparison of
each benchmark) are written there.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> script, full-run arguments on CPU and on CUDA (None: not run there), --quick arguments,
# time limits in seconds (full, quick). The CUDA arguments are SEED's shapes, sized so that the CUDA
# build and the whole suite fit in about 10 minutes.
BENCHES = {
    "codebook": dict(script="bench_codebook_lookup.py", cpu=[], cuda=["--quick"], quick=["--quick"], limits=(240, 120)),
    "codebook-fp16": dict(
        script="bench_codebook_lookup.py",
        cpu=None,
        cuda=["--quick", "--dtype", "float16"],
        quick=["--quick", "--dtype", "float16", "--max-gflop", "2"],
        limits=(90, 100),
    ),
    "attention": dict(
        script="bench_qformer_attention.py",
        cpu=[],
        cuda=["--quick", "--batches", "1,32,256"],
        quick=["--quick"],
        limits=(240, 120),
    ),
    "lora": dict(
        script="bench_lora_linear.py",
        cpu=[],
        cuda=[
            "--dtype",
            "bfloat16",
            "--tokens",
            "1,4096,16384",
            "--ranks",
            "16",
            "--shapes",
            "OPT-2.7B qkv/out,LLaMA-7B attn",
        ],
        quick=["--quick"],
        limits=(240, 120),
    ),
    "tokenizer": dict(
        script="bench_tokenizer.py",
        cpu=[],
        cuda=["--qformer-batches", "1,256", "--tokenizer-batches", "1,256"],
        quick=["--quick"],
        limits=(240, 210),
    ),
    "tokenizer-embedded": dict(
        script="bench_tokenizer.py",
        cpu=["--config", "seed_fast/default_model/assets/tokenizer"],
        cuda=["--config", "seed_fast/default_model/assets/tokenizer", "--dtype", "float32"],
        quick=["--config", "seed_fast/default_model/assets/tokenizer", "--quick"],
        limits=(120, 60),
    ),
    "llm": dict(script="bench_llm_decode.py", cpu=[], cuda=["--quick"], quick=["--quick"], limits=(240, 180)),
    "export": dict(script="bench_export.py", cpu=[], cuda=[], quick=["--quick"], limits=(180, 120)),
    "related": dict(
        script="bench_related.py", cpu=[], cuda=["--quick"], quick=["--quick", "--batch", "4"], limits=(120, 90)
    ),
}
ORDER = list(BENCHES)


def run(
    names: list[str], *, quick: bool, device: str, out: Path, time_scale: float = 1.0, progress: bool = True
) -> dict:
    from common import device_name, versions

    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    status = {}
    t_all = time.perf_counter()
    for i, name in enumerate(names):
        b = BENCHES[name]
        args = b["quick"] if quick else b[device]
        if args is None:
            status[name] = {"status": f"skipped (not run on {device})", "seconds": 0.0}
            continue
        script = b["script"]
        limit = int(b["limits"][1 if quick else 0] * time_scale)
        cmd = [sys.executable, str(HERE / script), *args, "--device", device, "--out", str(out)]
        if progress:
            print(f"[{i + 1}/{len(names)}] {name}: {' '.join(cmd[1:])} (limit {limit} s)", flush=True)
        t0 = time.perf_counter()
        with open(out / "logs" / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(
                    cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=HERE.parent
                ).returncode
                state = "ok" if rc == 0 else f"failed (exit {rc}, see logs/{name}.log)"
            except subprocess.TimeoutExpired:
                state = f"timed out after {limit} s"
        status[name] = {"status": state, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[1:])}
        if progress:
            print(f"    {state} in {status[name]['seconds']:.0f} s", flush=True)
    meta = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "quick": quick,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "scripts": status,
    }
    if device == "cuda":
        import torch

        meta["gpu"] = torch.cuda.get_device_name()
    summarize(out, meta)
    return meta


def _results(out: Path) -> dict[str, dict]:
    res = {}
    for f in sorted(out.glob("*.json")):
        if f.name.startswith("summary"):
            continue
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "rows" in data:
            res[f.stem] = data
    return res


def summarize(out: Path, meta: dict) -> None:
    results = _results(out)
    lines = [
        f"# Benchmarks on {meta.get('gpu', meta['device'])}",
        "",
        f"date {meta['date']}; {'quick' if meta['quick'] else 'full'} run; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "| benchmark | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in meta["scripts"].items()]
    lines.append("")
    for stem in results:
        md = out / f"{stem}.md"
        if md.is_file():
            lines += [f"## {stem}", "", md.read_text().split("\n", 2)[-1].strip(), ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    try:
        plot(results, out / "summary.png", meta)
    except ImportError:
        print("matplotlib is not installed: no summary.png", file=sys.stderr)


_TIME_KEYS = (("ms", 1.0), ("median_ms", 1.0), ("us", 1e-3))
_NOT_GROUP = {
    "provider",
    "iqr",
    "agree",
    "gflops",
    "gbs",
    "peak_mb",
    "tflops",
    "overhead",
    "err",
    "img_s",
    "tok_s",
    "same",
    "check",
    "q1_ms",
    "q3_ms",
    "throughput",
    "vs_torch_eager",
    "note",
    "n",
}


def _ms(row: dict) -> float | None:
    for key, scale in _TIME_KEYS:
        if key in row:
            try:
                return float(row[key]) * scale
            except (TypeError, ValueError):
                return None
    return None


def headline(rows: list[dict]) -> tuple[str, list[tuple[str, float]]] | None:
    """The comparison a reader looks at first: the group (same shape, dtype, mode...) with the most
    providers, the largest such group last in the file (the biggest shape)."""
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for r in rows:
        ms = _ms(r)
        if ms is None or "provider" not in r:
            continue
        key = tuple((k, str(v)) for k, v in r.items() if k not in _NOT_GROUP and not any(k == t for t, _ in _TIME_KEYS))
        groups.setdefault(key, []).append((str(r["provider"]), ms))
    if not groups:
        return None
    best = max(groups.items(), key=lambda kv: (len(kv[1]), list(groups).index(kv[0])))
    return ", ".join(f"{k} {v}" for k, v in best[0]), best[1]


def plot(results: dict[str, dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [(stem, h) for stem, data in results.items() if (h := headline(data["rows"]))]
    if not heads:
        return
    fig, axes = plt.subplots(
        len(heads), 1, figsize=(9, 1.2 + 0.45 * sum(len(h[1]) for _, h in heads) + 0.6 * len(heads))
    )
    axes = [axes] if len(heads) == 1 else list(axes)
    for ax, (stem, (title, bars)) in zip(axes, heads):
        names, ms = [b[0] for b in bars], [b[1] for b in bars]
        ax.barh(
            range(len(ms)),
            ms,
            color=["tab:orange" if n.startswith(("seed_fast", "onnxruntime")) else "tab:gray" for n in names],
        )
        ax.set_yticks(range(len(ms)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms (lower is better)", fontsize=8)
        ax.set_title(f"{stem}: {title}", fontsize=9)
        for y, v in enumerate(ms):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle(f"{meta.get('gpu', meta['device'])}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="seed-fast bench", description="run every benchmark and write the summary tables")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (2 CPU cores: under 10 minutes)")
    p.add_argument("--only", nargs="+", choices=ORDER, metavar="NAME", help=f"a subset of {ORDER}")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every script's time limit")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run: scales the time limits to fit"
    )
    args = p.parse_args(argv)
    import torch
    from common import device_name

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    out = Path(args.out) if args.out else HERE / "results" / device_name(device)
    names = args.only or ORDER
    scale = args.time_scale
    if args.budget:
        total = sum(BENCHES[n]["limits"][1 if args.quick else 0] for n in names)
        scale = min(scale, args.budget / total)
    meta = run(names, quick=args.quick, device=device, out=out, time_scale=scale)
    print((out / "summary.md").read_text())
    print(f"results: {out} (summary.md, summary.json, summary.png); {meta['total_seconds']:.0f} s in all")
    return 0 if all(v["status"] == "ok" or v["status"].startswith("skipped") for v in meta["scripts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
