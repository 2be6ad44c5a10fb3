"""`python -m seed_fast.info`: versions, which backends are built, and why any is missing."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import sys

from . import __version__, _ext


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import torch

    info: dict = {
        "seed_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "packages": {
            d: _version(d)
            for d in (
                "transformers",
                "safetensors",
                "triton",
                "peft",
                "diffusers",
                "onnx",
                "onnxruntime",
                "onnxruntime-gpu",
                "tensorrt",
                "xformers",
            )
        },
    }
    backends = {"ref": "available (plain torch)"}
    cpu = _ext.cpu_ext()
    if cpu is not None:
        b = dict(cpu.build_info())
        backends["cpu"] = (
            f"built ({b.get('compiler', '?')}, OpenMP {'on' if b.get('openmp') else 'off'}, "
            f"{b.get('threads', '?')} threads, {cpu.codebook_argmin_isa()} micro-kernel)"
        )
    else:
        backends["cpu"] = f"MISSING: {_ext.cpu_ext_error()}"
    cuda = _ext.cuda_ext()
    if cuda is not None:
        b = dict(cuda.build_info())
        backends["cuda"] = f"built (CUDA {b.get('cuda_version', '?')}, archs {b.get('archs', '?')})"
    else:
        backends["cuda"] = f"not built: {_ext.cuda_ext_error()}"
    try:
        importlib.import_module("triton")
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if torch.cuda.is_available():
            backends["triton"] = "available (GPU)"
        elif interp:
            backends["triton"] = "available (TRITON_INTERPRET=1, CPU interpreter: correctness only)"
        else:
            backends["triton"] = "installed, no GPU (set TRITON_INTERPRET=1 to run kernels on CPU for testing)"
    except Exception as e:
        backends["triton"] = f"unavailable: {type(e).__name__}: {e}"
    info["backends"] = backends
    return info


def main() -> None:
    info = collect()
    width = 16
    for key in ("seed_fast", "python", "platform", "torch", "torch_cuda", "cuda_available", "devices"):
        print(f"{key:<{width}} {info[key]}")
    print("packages:")
    for k, v in info["packages"].items():
        print(f"  {k:<{width - 2}} {v}")
    print("backends:")
    for k, v in info["backends"].items():
        print(f"  {k:<{width - 2}} {v}")


if __name__ == "__main__":
    main()
