"""What `impl="auto"` runs: the backend a benchmark run measured fastest on this class of device.

`dispatch_table.json` (beside this file) is written by `benchmarks/dispatch_table.py` from the
benchmarks' result files: for each device class ("cpu", "sm_90", ...), op, case (dtype, forward only
or forward + backward, ...) and measured size (batch, rows, tokens), every backend's device time and
host time per call, and two choices:

  "eager"  the fastest by max(device time, host time): what a stream of eager calls runs at, since a
           call whose host work outlasts its kernels leaves the GPU waiting;
  "graph"  the fastest by device time alone: what matters while a CUDA graph is being captured
           (replays do no host work).

Vendor paths (torch's SDPA backends, cuBLAS) are in every comparison; a seed_fast kernel is chosen
only where it won. A case the table does not hold (a device class never measured, a dtype or mode
left out) gets the op's vendor default, never one of our kernels unmeasured. Between measured sizes
the nearest one (on a log scale) decides. Decisions are cached, so a call pays one dictionary lookup.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")

_table: dict | None = None
_generation = 0  # bumped by set_table: callers that cache decisions key them by it


def table() -> dict:
    """The decision table ({} when the file is missing or unreadable)."""
    global _table
    if _table is None:
        try:
            _table = json.loads(TABLE_PATH.read_text())
        except (OSError, ValueError):
            _table = {}
    return _table


def set_table(new: dict | None) -> None:
    """Replace the table in this process (None reloads the file); clears cached decisions."""
    global _table, _generation
    _table = new
    _generation += 1
    _decide.cache_clear()


def generation() -> int:
    """Changes whenever the table is replaced (for callers caching decisions)."""
    return _generation


@lru_cache(maxsize=64)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_class(device: torch.device) -> str:
    """ "cpu", or "sm_<major><minor>" for a CUDA device (e.g. "sm_90" for an H100 / H200)."""
    if device.type == "cuda":
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        return f"sm_{major}{minor}"
    return device.type


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of a dtype: "float32", "float16", "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")


def choose(op: str, device: torch.device, case: tuple, size: int, default: str) -> str:
    """The table's backend for `op` on `device` in `case` ((key, value) pairs) at `size`, or
    `default` where the table has no measurement for it."""
    graph = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return _decide(op, device_class(device), case, int(size), graph, default)


@torch.compiler.assume_constant_result  # torch.compile takes the decision as a constant, untraced
@lru_cache(maxsize=4096)
def _decide(op: str, dev: str, case: tuple, size: int, graph: bool, default: str) -> str:
    rows = table().get("devices", {}).get(dev, {}).get(op, [])
    want = dict(case)
    best, best_gap = None, math.inf
    for row in rows:
        if any(row["case"].get(k) != v for k, v in want.items()):
            continue
        gap = abs(math.log(max(size, 1)) - math.log(max(row["size"], 1)))
        if gap < best_gap:
            best, best_gap = row, gap
    if best is None:
        return default
    return best["graph" if graph else "eager"]


def cases(op: str, dev: str) -> list[dict]:
    """The table's rows for `op` on device class `dev` (for tests and reports)."""
    return list(table().get("devices", {}).get(dev, {}).get(op, []))


table()  # read now, not inside the first torch.compile trace (which cannot trace file reads)
