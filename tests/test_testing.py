"""The test helpers: seed_fast.testing's comparisons, and conftest.py's seeds and rerun line."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seed_fast.testing import assert_close, assert_equal


def test_assert_close_reports_count_worst_index_and_relative_error():
    want = torch.ones(3, 4)
    got = want.clone()
    got[1, 2] += 0.5
    got[2, 0] += 0.01
    with pytest.raises(AssertionError) as e:
        assert_close(got, want, atol=1e-3, rtol=0, name="x")
    msg = str(e.value)
    assert msg.startswith("x: 2/12 elements exceed atol=0.001 rtol=0; worst at (1, 2): got 1.5, expected 1")
    assert "rel err 0.5" in msg
    assert_close(got, want, atol=0.5, rtol=0)  # at the bound
    assert_close(got, want, atol=0, rtol=0.5)
    with pytest.raises(AssertionError, match=r"shape \(3, 4\) != expected \(4, 3\)"):
        assert_close(got, want.T, atol=1, rtol=1)


def test_assert_close_takes_numpy_and_matches_non_finite_values_exactly():
    a = np.array([1.0, np.inf, -np.inf])
    assert_close(a, torch.tensor([1.0, float("inf"), float("-inf")]), atol=0, rtol=0)
    with pytest.raises(AssertionError, match=r"1/3 element\(s\) non-finite.*at \(1,\): got inf, expected 5"):
        assert_close(a, np.array([1.0, 5.0, -np.inf]), atol=100, rtol=100)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([np.nan]), np.array([np.nan]), atol=1, rtol=1)  # NaN never matches


def test_assert_equal_lists_the_first_mismatches():
    codes = torch.arange(12).reshape(3, 4)
    assert_equal(codes, codes.numpy().astype(np.int32))  # dtypes may differ, values may not
    bad = codes.clone()
    bad[0, 1], bad[2, 3] = 99, -1
    with pytest.raises(AssertionError) as e:
        assert_equal(bad, codes, name="codes")
    assert str(e.value) == "codes: 2/12 elements differ; (0, 1): got 99, expected 1; (2, 3): got -1, expected 11"
    with pytest.raises(AssertionError, match=r"8/12 elements differ;.* \.\.\.$"):
        assert_equal(codes.flip(0), codes, show=2)
    with pytest.raises(AssertionError, match="shape"):
        assert_equal(codes[0], codes)


def _run_pytest(folder: Path, *args: str, seed: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if seed is not None:
        env["SEED_FAST_TEST_SEED"] = seed
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(folder), "-s", *args]
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    return done.stdout + done.stderr


def test_each_test_has_its_own_seed_and_a_failure_says_how_to_rerun_it(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_draw.py").write_text(
        "import torch\n\n"
        "def test_a(seed):\n"
        "    print('DRAW a', seed, torch.rand(1).item())\n"
        "    assert False\n\n"
        "def test_b(seed):\n"
        "    print('DRAW b', seed, torch.rand(1).item())\n"
    )

    def draws(out):
        return dict((m[0], (int(m[1]), m[2])) for m in re.findall(r"DRAW (\w) (\d+) (\S+)", out))

    out = _run_pytest(tmp_path, "test_draw.py")
    first = draws(out)
    assert first["a"][0] != first["b"][0], "two tests got one seed"
    assert "rerun with the same inputs: SEED_FAST_TEST_SEED=0 python -m pytest 'test_draw.py::test_a'" in out
    assert f"test seed {first['a'][0]};" in out and "test_b'" not in out  # only the failure gets a rerun line
    # alone, a test draws what it drew in the whole run; another base seed draws other values
    assert draws(_run_pytest(tmp_path, "test_draw.py::test_a", seed="0"))["a"] == first["a"]
    out = _run_pytest(tmp_path, "test_draw.py", seed="12345")
    assert draws(out)["a"] != first["a"] and draws(out)["b"] != first["b"]
    assert "SEED_FAST_TEST_SEED=12345 python -m pytest 'test_draw.py::test_a'" in out
    assert "SEED_FAST_TEST_SEED must be an integer or 'random', got 'x'" in _run_pytest(
        tmp_path, "test_draw.py", seed="x"
    )
