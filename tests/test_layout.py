"""The checkout works where users run it: from the repository root, beside the newest dependencies.

A top-level folder with an `__init__.py` would be imported instead of an installed distribution of
the same name whenever Python runs from the root (transformers >= 5.25 imports Hugging Face's
`kernels`). These tests run fresh interpreters with the root as their working directory.
"""

import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed in {ROOT}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _seed_fast_modules():
    import seed_fast
    import seed_fast.export
    import seed_fast.kernels

    names = ["seed_fast"]
    for pkg in (seed_fast, seed_fast.kernels, seed_fast.export):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return sorted(set(names))


def test_every_module_is_found():
    names = _seed_fast_modules()
    for expected in (
        "seed_fast.kernels.codebook_lookup",
        "seed_fast.export.to_onnx",
        "seed_fast.models.llm.seed_llm",
        "seed_fast.cli",
    ):
        assert expected in names
    assert not any(n.startswith(("kernels", "export")) for n in names)


def test_dependencies_and_every_module_import_from_the_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` distribution is not installed; the test extra installs it")
    names = _seed_fast_modules()
    probe = (
        "import importlib, kernels, transformers, peft, diffusers, onnx\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "assert hasattr(kernels, 'get_kernel'), kernels.__file__\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('kernels from', kernels.__file__)\n"
    )
    out = _run_from_root(["-c", probe])
    assert str(ROOT / "kernels") not in out, out


def test_pytest_collects_everything_from_the_root():
    out = _run_from_root(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"])
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ tests collected in [\d.]+s", last), out[-3000:]


def test_sdist_and_wheel_hold_the_source_folders(tmp_path):
    _run_from_root(
        ["setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir", str(tmp_path / "dist")]
    )
    (sdist,) = (tmp_path / "dist").glob("seed_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for folder, pattern in (("kernels", "*.py"), ("export", "*.py"), ("csrc", "*/*.cpp")):
        for f in ROOT.glob(f"{folder}/{pattern}"):
            assert str(f.relative_to(ROOT)) in names, f"{f.relative_to(ROOT)} missing from the sdist"
    for f in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "seed_fast/kernels/__init__.py"):
        assert f in names, f"{f} missing from the sdist"
    # the wheel's pure-Python part: the folders' modules land inside the seed_fast namespace
    _run_from_root(
        ["setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "build_py", "--build-lib", str(tmp_path / "lib")]
    )
    lib = tmp_path / "lib"
    for folder in ("kernels", "export"):
        for f in (ROOT / folder).glob("*.py"):
            assert (lib / "seed_fast" / folder / f.name).is_file(), (
                f"seed_fast/{folder}/{f.name} missing from the wheel"
            )
    assert not (lib / "kernels").exists() and not (lib / "export").exists()
    # every subpackage and the package data (a non-editable install imports from these alone)
    for init in (ROOT / "seed_fast").rglob("__init__.py"):
        rel = init.relative_to(ROOT)
        assert (lib / rel).is_file(), f"{rel.parent} missing from the wheel"
    for data in ("seed_fast/ops/dispatch_table.json", "seed_fast/default_model/assets/tokenizer/config.json"):
        assert (lib / data).is_file(), f"{data} missing from the wheel"


def _declared_floors():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def floors_of(reqs):
        out = {}
        for line in reqs:
            req = Requirement(line)
            for spec in req.specifier:
                if spec.operator == ">=":
                    out.setdefault(req.name.lower(), set()).add(spec.version)
        return out

    floors = floors_of(project["dependencies"])
    base = {name: min(map(Version, v)) for name, v in floors.items()}
    for name, versions in floors_of(r for extra in project["optional-dependencies"].values() for r in extra).items():
        if name in base:  # an extra may raise a floor of the core dependencies (quant: torch for torchao)
            assert all(Version(v) >= base[name] for v in versions), f"an extra lowers the floor of {name}"
            continue
        floors[name] = versions
    return floors


def test_floors_file_pins_every_declared_floor():
    """`make test-floors` installs tests/floors.txt: it must pin exactly the floors pyproject.toml declares."""
    from packaging.version import Version

    pins = {}
    for line in (ROOT / "tests" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"tests/floors.txt: {line!r} is not a name==version pin"
            pins[name.strip().lower()] = version.strip()
    for name, versions in _declared_floors().items():
        if name in ("pytest", "setuptools", "tensorrt", "onnxruntime-gpu", "torchao"):
            # the test runner, the build tool, GPU-only packages this machine cannot run, and torchao,
            # whose floor needs a torch above torch's floor (the quant tests skip at the floors)
            continue
        assert len(versions) == 1, f"{name} has several floors in pyproject.toml: {sorted(versions)}"
        assert name in pins and Version(pins[name]) == Version(next(iter(versions))), (
            f"pyproject.toml declares {name}>={next(iter(versions))}, tests/floors.txt pins {pins.get(name)}"
        )


def test_no_extra_mixes_onnxruntime_builds():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, reqs in extras.items():
        names = {Requirement(r).name.lower() for r in reqs}
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names, f"extra [{name}] installs both onnxruntime builds"
