"""The package, its compiled extension and `python -m seed_fast.info`."""

import os
import subprocess
import sys
from pathlib import Path

import seed_fast
from seed_fast import _ext

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_extension_is_built():
    mod = _ext.cpu_ext()
    assert mod is not None, f"C++ extension missing: {_ext.cpu_ext_error()}"
    info = dict(mod.build_info())
    assert info["threads"] >= 1 and isinstance(info["openmp"], bool)


def test_cuda_extension_absence_is_explained():
    if _ext.cuda_ext() is None:
        assert _ext.cuda_ext_error()  # a reason, never silence


def test_info_runs_and_lists_backends():
    out = subprocess.run([sys.executable, "-m", "seed_fast.info"], capture_output=True, text=True, check=True).stdout
    for word in ("torch", "transformers", "backends:", "ref", "cpu", "cuda", "triton"):
        assert word in out
    assert "cpu            built" in out


def test_source_folders_live_in_the_seed_fast_namespace():
    import seed_fast.export
    import seed_fast.kernels

    assert Path(seed_fast.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert Path(seed_fast.export.__file__).resolve().parent == ROOT / "export"
    # installed, no top-level `kernels` / `export` of ours shadows another distribution (Hugging Face
    # ships `kernels`); checked away from the checkout, whose root is on sys.path under pytest
    probe = (
        "import importlib.util, sys\n"
        "for n in ('kernels', 'export'):\n"
        "    s = importlib.util.find_spec(n)\n"
        "    print(n, s.origin if s else None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/", env=env)
    assert str(ROOT) not in out.stdout, out.stdout


def test_public_api():
    for name in ("SeedTokenizer", "TokenizerConfig", "CheckpointError", "InputError", "get_config"):
        assert hasattr(seed_fast, name)
    assert callable(seed_fast.SeedTokenizer.from_config) and callable(seed_fast.SeedTokenizer.from_official)
