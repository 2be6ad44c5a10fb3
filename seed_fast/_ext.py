"""Loads the compiled extensions once and keeps the reason when one is missing.

`seed_fast._C` holds the C++ CPU kernels (always built by setup.py); `seed_fast._C_cuda` the CUDA
kernels (built when SEED_FAST_BUILD_CUDA allows). Importing them registers PyTorch operators under
`torch.ops.seed_fast`: `_codebook_lookup(z, codebook, error_flag=None, isa="auto")` (indices and
z_q) and `_codebook_lookup_indices(z, codebook, isa="auto")`, each with a CPU kernel, a CUDA kernel
from `_C_cuda` and a shape-only kernel for fake tensors, and the build reports below.
Nothing is compiled on import.
"""

from __future__ import annotations

import importlib
import traceback

import torch

_cache: dict[str, tuple[object | None, str | None]] = {}


class CpuLibrary:
    """seed_fast._C, loaded."""

    @staticmethod
    def build_info() -> dict:
        """The compiler, OpenMP and C++ ABI of this build."""
        compiler, openmp, threads, torch_abi = torch.ops.seed_fast._cpu_build_info()
        return {"compiler": compiler, "openmp": openmp, "threads": threads, "torch_abi": torch_abi}

    @staticmethod
    def codebook_argmin_isa() -> str:
        """The CPU micro-kernel `_codebook_lookup_indices(isa="auto")` runs here: "avx512" or "generic"."""
        return torch.ops.seed_fast._codebook_lookup_cpu_isa()


class CudaLibrary:
    """seed_fast._C_cuda, loaded."""

    @staticmethod
    def build_info() -> dict:
        """The CUDA version and the GPU architectures of this build."""
        cuda_version, archs = torch.ops.seed_fast._cuda_build_info()
        return {"cuda_version": cuda_version, "archs": archs}


_LIBRARIES = {"_C": CpuLibrary, "_C_cuda": CudaLibrary}


def _load(name: str):
    if name not in _cache:
        # the CUDA library adds kernels to operators that the CPU library defines
        needs = _load("_C")[1] if name == "_C_cuda" else None
        if needs is not None:
            _cache[name] = (None, f"it needs seed_fast._C, which is missing: {needs}")
            return _cache[name]
        try:
            importlib.import_module(f"seed_fast.{name}")
            _cache[name] = (_LIBRARIES[name](), None)
        except Exception as e:  # kept and reported by `python -m seed_fast.info`, never swallowed silently
            first = traceback.format_exception_only(type(e), e)[-1].strip()
            _cache[name] = (None, first)
    return _cache[name]


def cpu_ext() -> CpuLibrary | None:
    """The loaded C++ extension, or None (see `cpu_ext_error()`)."""
    return _load("_C")[0]


def cpu_ext_error() -> str | None:
    return _load("_C")[1]


def cuda_ext() -> CudaLibrary | None:
    """The loaded CUDA extension, or None (see `cuda_ext_error()`)."""
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


def require_cpu_ext() -> CpuLibrary:
    mod, err = _load("_C")
    if mod is None:
        raise RuntimeError(
            f"seed_fast's C++ extension is not available ({err}); reinstall with "
            "`pip install --no-build-isolation -e .` and see `python -m seed_fast.info`"
        )
    return mod


def require_cuda_ext() -> CudaLibrary:
    mod, err = _load("_C_cuda")
    if mod is None:
        raise RuntimeError(
            f"seed_fast's CUDA extension is not available ({err}); build it with SEED_FAST_BUILD_CUDA=1 "
            "on a machine with nvcc and a CUDA build of torch, and see `python -m seed_fast.info`"
        )
    return mod
