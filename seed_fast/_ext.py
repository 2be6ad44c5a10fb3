"""Loads the compiled extensions once and keeps the reason when one is missing.

`seed_fast._C` holds the C++ CPU kernels (always built by setup.py); `seed_fast._C_cuda` the CUDA
kernels (built when SEED_FAST_BUILD_CUDA allows). Nothing is compiled on import.
"""

from __future__ import annotations

import importlib
import traceback

_cache: dict[str, tuple[object | None, str | None]] = {}


def _load(name: str):
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"seed_fast.{name}"), None)
        except Exception as e:  # kept and reported by `python -m seed_fast.info`, never swallowed silently
            first = traceback.format_exception_only(type(e), e)[-1].strip()
            _cache[name] = (None, first)
    return _cache[name]


def cpu_ext():
    """The C++ extension module, or None (see `cpu_ext_error()`)."""
    return _load("_C")[0]


def cpu_ext_error() -> str | None:
    return _load("_C")[1]


def cuda_ext():
    return _load("_C_cuda")[0]


def cuda_ext_error() -> str | None:
    err = _load("_C_cuda")[1]
    if err is None:
        return None
    reason = _build_record().get("cuda")
    return f"{reason} ({err})" if reason else err


def _build_record() -> dict:
    import json
    from pathlib import Path

    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def require_cpu_ext():
    mod, err = _load("_C")
    if mod is None:
        raise RuntimeError(
            f"seed_fast's C++ extension is not available ({err}); reinstall with "
            "`pip install --no-build-isolation -e .` and see `python -m seed_fast.info`"
        )
    return mod


def require_cuda_ext():
    mod, err = _load("_C_cuda")
    if mod is None:
        raise RuntimeError(
            f"seed_fast's CUDA extension is not available ({err}); build it with SEED_FAST_BUILD_CUDA=1 "
            "on a machine with nvcc and a CUDA build of torch, and see `python -m seed_fast.info`"
        )
    return mod
