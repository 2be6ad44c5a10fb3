"""Build seed_fast's compiled parts: the C++ CPU extension always, the CUDA extension when SEED_FAST_BUILD_CUDA allows.

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
from setuptools.command.build_py import build_py

# Top-level source folders installed inside the seed_fast namespace. They have no __init__.py, so
# that Python run from the checkout's root never takes them for top-level packages (Hugging Face's
# `kernels` distribution would be shadowed); seed_fast/kernels/__init__.py and
# seed_fast/export/__init__.py are the packages, and a wheel gets the folders' modules beside them.
SOURCE_FOLDERS = {"seed_fast.kernels": "kernels", "seed_fast.export": "export"}


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        folder = SOURCE_FOLDERS.get(package)
        if folder:
            modules += [(package, Path(f).stem, f) for f in sorted(glob(f"{folder}/*.py"))]
        return modules


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
    elif torch.version.cuda is not None:
        # torch refuses to build an extension with an nvcc of another major version than its own
        ver = _nvcc_version()
        want = int(torch.version.cuda.split(".")[0])
        if ver is None:
            reasons.append(f"cannot read the version of {CUDA_HOME}/bin/nvcc")
        elif ver[0] != want:
            reasons.append(
                f"nvcc {ver[0]}.{ver[1]} ({CUDA_HOME}) does not match torch's CUDA {torch.version.cuda}; "
                f"point CUDA_HOME at a CUDA {want}.x toolkit"
            )
    if mode == "1" and reasons:
        sys.exit("seed_fast: SEED_FAST_BUILD_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
    if reasons:
        print("seed_fast: not building the CUDA extension: " + "; ".join(reasons))
        _record_build({"cuda": "not built at install: " + "; ".join(reasons)})
    else:
        _record_build({"cuda": None})
    return not reasons


# commands that compile the extensions; metadata and sdist commands (egg_info, sdist) build nothing
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}


def _record_build(info: dict) -> None:
    """Why an optional extension was skipped, for `python -m seed_fast.info` (not tracked by git);
    written only by a command that builds, so that making an sdist leaves the checkout's record alone."""
    import json

    if _BUILD_COMMANDS & set(sys.argv[1:]):
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

# Metadata, dependencies and packages are declared in pyproject.toml; this file adds the compiled parts.
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy},
)
