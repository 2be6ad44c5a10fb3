"""Build seed_fast: the C++ CPU extension always, the CUDA extension when SEED_FAST_BUILD_CUDA allows.

SEED_FAST_BUILD_CUDA=auto (default): build CUDA when torch is a CUDA build and CUDA_HOME exists
                      (never decided by torch.cuda.is_available(): build machines often have no GPU).
SEED_FAST_BUILD_CUDA=1: build CUDA or fail loudly.   SEED_FAST_BUILD_CUDA=0: never.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured. Default archs: 7.0;8.0;9.0 with CUDA < 13, and
8.0;9.0 with CUDA >= 13, which can no longer compile for sm_70 (use CUDA 12.x for V100).
"""

import os
import re
import subprocess
import sys
from glob import glob
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "seed_fast: torch must be installed before building (the C++ extension compiles against it). "
        "Install torch, then `pip install --no-build-isolation -e .`"
    )


def _nvcc_version():
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError, TypeError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda() -> bool:
    mode = os.environ.get("SEED_FAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"seed_fast: SEED_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _record_build({"cuda": "not built at install: SEED_FAST_BUILD_CUDA=0"})
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if not CUDA_HOME or not os.path.isdir(CUDA_HOME):
        reasons.append("CUDA_HOME not found (no nvcc)")
    if mode == "1" and reasons:
        sys.exit("seed_fast: SEED_FAST_BUILD_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
    if reasons:
        print("seed_fast: not building the CUDA extension: " + "; ".join(reasons))
        _record_build({"cuda": "not built at install: " + "; ".join(reasons)})
    else:
        _record_build({"cuda": None})
    return not reasons


def _record_build(info: dict) -> None:
    """Why an optional extension was skipped, for `python -m seed_fast.info` (not tracked by git)."""
    import json

    (ROOT / "seed_fast" / "_build_info.json").write_text(json.dumps(info))


cxx_flags = ["-O3"]  # the C++ standard is chosen by torch's BuildExtension (C++20 from torch 2.14)
link_flags = []
if sys.platform.startswith("linux"):
    cxx_flags += ["-fopenmp"]
    link_flags += ["-fopenmp"]

ext_modules = [
    CppExtension(
        "seed_fast._C",
        sources=sorted(["csrc/ext.cpp"] + [p for p in glob("csrc/*/*.cpp") if not p.startswith("csrc/cuda/")]),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
]

if _want_cuda():
    ver = _nvcc_version()
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        archs = "8.0;9.0" if ver and ver >= (13, 0) else "7.0;8.0;9.0"
        if ver and ver >= (13, 0):
            print(f"seed_fast: nvcc {ver[0]}.{ver[1]} cannot target sm_70; building for {archs} (V100 needs CUDA 12.x)")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    ext_modules.append(
        CUDAExtension(
            "seed_fast._C_cuda",
            sources=sorted(glob("csrc/cuda/*.cpp") + glob("csrc/*/*.cu")),
            include_dirs=[str(ROOT / "csrc")],
            define_macros=[("SEED_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": ["-O3", f'-DSEED_FAST_CUDA_ARCHS="{archs}"'],
                "nvcc": ["-O3", "-lineinfo", f'-DSEED_FAST_CUDA_ARCHS="{archs}"'],
            },
        )
    )

extras = {
    "test": ["pytest>=7", "triton>=3.0; platform_system == 'Linux'", "peft>=0.10", "diffusers>=0.30", "matplotlib",
             "onnx>=1.16", "onnxruntime>=1.18", "scikit-image"],
    "train": ["matplotlib"],
    "triton": ["triton>=3.0"],
    "llm": ["peft>=0.10"],
    "diffusion": ["diffusers>=0.27"],
    "export": ["onnx>=1.16", "onnxruntime>=1.18"],
    # seed_fast.runtime: no torch (install seed_fast with --no-deps, or copy runtime.py)
    "runtime": ["numpy", "onnxruntime>=1.18", "tokenizers", "pillow"],
    "gpu": ["onnxruntime-gpu>=1.18", "xformers", "triton>=3.0"],
    "bench": ["matplotlib", "triton>=3.0"],
}

setup(
    name="seed_fast",
    version=re.search(r'__version__ = "([^"]+)"', (ROOT / "seed_fast/__init__.py").read_text()).group(1),
    description="Fast, faithful SEED image tokenizer with Triton / CUDA / C++ kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["seed_fast", "seed_fast.models", "seed_fast.ops", "seed_fast.train", "seed_fast.recipes", "seed_fast.kernels", "seed_fast.export"],
    # kernels/ and export/ are plain source folders installed inside the seed_fast namespace, so that
    # no top-level `kernels` package shadows Hugging Face's.
    package_dir={"seed_fast": "seed_fast", "seed_fast.kernels": "kernels", "seed_fast.export": "export"},
    package_data={"seed_fast": ["assets/*", "assets/default_model/*", "assets/default_model/*/*", "assets/default_model/*/*/*", "_build_info.json"]},
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "pillow", "tqdm", "transformers>=4.40"],
    extras_require=extras,
    entry_points={"console_scripts": ["seed-fast=seed_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
