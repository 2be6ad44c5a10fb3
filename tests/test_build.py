"""The package, its compiled extension and `python -m seed_fast.info`."""

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
    import seed_fast.export.to_onnx
    import seed_fast.kernels.codebook_lookup

    assert Path(seed_fast.kernels.codebook_lookup.__file__).resolve().parent == ROOT / "kernels"
    assert Path(seed_fast.export.to_onnx.__file__).resolve().parent == ROOT / "export"
    for folder in ("kernels", "export"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ must not be a top-level package"


def test_public_api():
    for name in ("SeedTokenizer", "TokenizerConfig", "CheckpointError", "InputError", "get_config"):
        assert hasattr(seed_fast, name)
    assert callable(seed_fast.SeedTokenizer.from_config) and callable(seed_fast.SeedTokenizer.from_official)
