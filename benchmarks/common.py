"""Shared benchmark plumbing: timing with spread, peak memory, device naming, result files.

Timing (`time_fn`): on CUDA, device time per call from CUDA-graph replay of back-to-back calls after
the clocks are raised and >= 25 ms of warm-up (events around back-to-back calls where a graph cannot
hold the call), and host time per call measured separately without syncs; on CPU, wall time per call.
We report the median and the interquartile range.
Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call; on
Linux CPU, the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS
before the call. Both count only what the call itself adds (workspace + outputs).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch


def device_name(device: str) -> str:
    """A folder-safe name for the machine, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-2c'."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu {name} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_clocks_up = False


def _raise_clocks() -> None:
    """Keep the GPU busy ~200 ms once per process so its clocks leave idle (345 MHz on an H200)."""
    global _clocks_up
    if _clocks_up:
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    _clocks_up = True


def _spread(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "n": len(times)}


def host_time_us(fn, *, calls: int = 200, max_seconds: float = 0.5) -> float:
    """Host time of one fn() call in microseconds: perf_counter over back-to-back calls, no sync
    (on a GPU the launches queue; this is the CPU cost a caller pays per call)."""
    times = []
    start = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 10:
            break
    return statistics.median(times) * 1e6


def time_fn(
    fn,
    device: str,
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 20.0,
    graph: bool = True,
    host: bool = True,
) -> dict:
    """Median and spread of one fn() in milliseconds, plus its host time per call.

    CPU: perf_counter around each call ("method": "wall").
    CUDA: after the clocks are raised and >= 25 ms of warm-up calls, device time per call from
    replays of a CUDA graph holding several back-to-back calls ("graph"); where fn cannot be captured
    (a host sync inside, say) from CUDA events around the same back-to-back calls ("events"), which
    counts launch gaps when the host is slower than the GPU. Inputs are reused, so shapes that fit
    the 50-60 MB L2 are timed cache-warm, as they run inside a model.
    "host_us": median host time per call without synchronizing (perf_counter), reported separately.
    """
    if device != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        start = time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start > max_seconds and len(times) >= 3:
                break
        out = _spread(times)
        out.update(method="wall", host_us=out["median_ms"] * 1e3)
        return out

    _raise_clocks()
    # warm-up: at least `warmup` calls and 25 ms, synchronized (compilation, autotuning, caches)
    t0 = time.perf_counter()
    calls = 0
    while calls < max(warmup, 1) or time.perf_counter() - t0 < 0.025:
        fn()
        calls += 1
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / calls
    inner = int(min(50, max(1, 0.002 / max(per_call, 1e-6))))  # ~2 ms of calls per sample

    host_us = None
    if host:
        host_us = host_time_us(fn, calls=200, max_seconds=min(0.5, max_seconds / 4))
        torch.cuda.synchronize()

    method = "events"
    run = None
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            g.replay()
            torch.cuda.synchronize()
            run, method = g.replay, "graph"
        except Exception:  # not capturable: a host sync, a CPU tensor, dynamic allocation
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            run = None
    if run is None:

        def run():
            for _ in range(inner):
                fn()

    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    out = _spread(times)
    out.update(method=method, host_us=host_us, calls_per_sample=inner)
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, device: str) -> int | None:
    """Peak memory fn() adds above what was in use before it; None where it cannot be measured."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        out = fn()
        peak = (_rss_kib("VmHWM") - before) * 1024
        del out
        return max(peak, 0)
    except (OSError, RuntimeError):
        return None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("seed_fast", "triton", "faiss-cpu", "vector-quantize-pytorch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


# Spec-sheet peaks (dense): FP32 without tensor cores, fp16/bf16 tensor cores (TFLOP/s), memory (TB/s).
# Matched by substring of torch.cuda.get_device_name(); first match wins.
GPU_PEAKS = (
    ("H200", {"fp32": 67.0, "tensor16": 989.0, "tb_s": 4.8}),
    ("H100 PCIe", {"fp32": 51.0, "tensor16": 756.0, "tb_s": 2.0}),
    ("H100", {"fp32": 67.0, "tensor16": 989.0, "tb_s": 3.35}),
    ("A100-SXM4-80GB", {"fp32": 19.5, "tensor16": 312.0, "tb_s": 2.04}),
    ("A100", {"fp32": 19.5, "tensor16": 312.0, "tb_s": 1.555}),
    ("V100", {"fp32": 15.7, "tensor16": 125.0, "tb_s": 0.9}),
)


def gpu_peaks(gpu_name: str) -> dict | None:
    for key, peaks in GPU_PEAKS:
        if key.lower() in gpu_name.lower():
            return peaks
    return None


def roofline_fraction(tflops: float | None, tb_s: float | None, peaks: dict, math: str) -> float | None:
    """Achieved / roofline bound at this arithmetic intensity = max(F / F_peak, B / B_peak), where
    F and B are the achieved FLOP/s and bytes/s. math: "fp32" (CUDA cores) or "tensor16"."""
    parts = []
    if tflops is not None:
        parts.append(tflops / peaks[math])
    if tb_s is not None:
        parts.append(tb_s / peaks["tb_s"])
    return max(parts) if parts else None


def _row_roofline(row: dict, peaks: dict, default_math: str) -> float | None:
    def num(key, scale):
        try:
            return float(row[key]) * scale
        except (KeyError, TypeError, ValueError):
            return None

    tflops = num("tflops", 1.0)
    if tflops is None:
        tflops = num("gflops", 1e-3)
    tb_s = num("gbs", 1e-3)
    math = "tensor16" if str(row.get("dtype", "")) in ("float16", "bfloat16") else default_math
    return roofline_fraction(tflops, tb_s, peaks, math)


def write_results(
    name: str,
    device: str,
    rows: list[dict],
    markdown: str,
    out_dir: str | None,
    extra: dict | None = None,
    roofline_math: str | None = None,
):
    """benchmarks/results/<device>/<name>.{md,json} (+ the caller's PNG). Returns the folder."""
    folder = Path(out_dir) if out_dir else Path(__file__).parent / "results" / device_name(device)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        meta["device_class"] = f"sm_{major}{minor}"
    else:
        meta["device_class"] = "cpu"
    meta.update(extra or {})
    if device == "cuda" and roofline_math is not None:
        peaks = gpu_peaks(meta["device"])
        if peaks is not None:
            lines = []
            for r in rows:
                frac = _row_roofline(r, peaks, roofline_math)
                if frac is not None:
                    r["roofline"] = f"{100 * frac:.1f}%"
                    lines.append(r)
            meta["roofline_peaks"] = peaks
            if lines:
                keys = [k for k in lines[0] if k not in ("roofline", "iqr", "err", "agree", "peak_mb", "note", "check")]
                markdown += (
                    "\n\nRoofline fraction = max(achieved FLOP/s / peak, achieved bytes/s / peak bandwidth), "
                    "spec peaks "
                    f"{peaks} (TFLOP/s, TB/s; `{roofline_math}` unless the row is fp16 / bf16 on tensor cores):\n\n"
                    + markdown_table(lines, [(k, k) for k in keys] + [("roofline", "roofline")])
                )
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = f"# {name}\n\ndevice: {meta['device']}; date: {meta['date']}; torch threads: {meta['threads']}\n\n"
    header += "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n\n"
    (folder / f"{name}.md").write_text(header + markdown)
    return folder


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"
