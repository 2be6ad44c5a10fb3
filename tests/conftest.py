"""Shared fixtures, the GPU marker, and the test seeds.

Seeds: every test runs with its own seed, derived from a base seed and the test's id, so that a
test draws the same inputs alone as in the whole suite. The `seed` fixture seeds `random`, numpy
and torch (CPU and CUDA) before each test and is the value a test gives its own generators;
fixtures wider than a test are seeded the same way from their own name. The base is
SEED_FAST_TEST_SEED (an integer, default 0; `random` draws a fresh one, printed in the header).
A failing test's report says its seed and the command that reruns it with the same inputs.
"""

import os
import random
import zlib
from pathlib import Path

# Triton kernels run on CPU tensors under the interpreter when there is no GPU; this must be set
# before triton is first imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

SEED_ENV = "SEED_FAST_TEST_SEED"
_TESTS = Path(__file__).resolve().parent


def _base_seed() -> int:
    raw = os.environ.get(SEED_ENV, "0").strip()
    if raw == "random":
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer or 'random', got {raw!r}") from None


BASE_SEED = _base_seed()
_SEED = pytest.StashKey[int]()


def _test_id(node) -> str:
    """The node's id relative to tests/ (the same from the repository root or from tests/)."""
    path = Path(node.path).resolve()
    rel = path.relative_to(_TESTS).as_posix() if path.is_relative_to(_TESTS) else path.name
    tail = node.nodeid.split("::", 1)[1] if "::" in node.nodeid else ""
    return f"{rel}::{tail}" if tail else rel


def derive_seed(key: str) -> int:
    """A seed in [0, 2**31) from the base seed and a name."""
    return zlib.crc32(f"{BASE_SEED}:{key}".encode()) & 0x7FFFFFFF


def _seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # every device's generator


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed; the global RNGs are already seeded with it."""
    s = derive_seed(_test_id(request.node))
    request.node.stash[_SEED] = s
    _seed_everything(s)
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    # fixtures shared by several tests draw from their own seed, whichever test happens to create them
    if fixturedef.scope != "function":
        node = request.node
        where = _test_id(node) if Path(node.path).resolve().is_relative_to(_TESTS) else "session"
        param = f"[{request.param}]" if hasattr(request, "param") else ""
        _seed_everything(derive_seed(f"{where}::{fixturedef.argname}{param}"))
    yield


def _rerun(item) -> str:
    return f"{SEED_ENV}={BASE_SEED} python -m pytest '{item.nodeid}'"


def pytest_report_header(config):
    how = "fresh (random)" if os.environ.get(SEED_ENV, "").strip() == "random" else "fixed"
    return f"seed_fast test seeds: {SEED_ENV}={BASE_SEED} ({how} base; each test's seed derives from it and its id)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _SEED in item.stash:
        rep.sections.append(("seed", f"test seed {item.stash[_SEED]}; rerun with the same inputs: {_rerun(item)}"))
        rep.user_properties.append(("rerun", _rerun(item)))


def pytest_terminal_summary(terminalreporter):
    reruns = dict.fromkeys(dict(r.user_properties).get("rerun") for r in terminalreporter.stats.get("failed", []))
    reruns.pop(None, None)
    if reruns:
        terminalreporter.section("rerun the failures with their seeds")
        for r in reruns:
            terminalreporter.line(r)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tok():
    from seed_fast import SeedTokenizer

    return SeedTokenizer.from_config("tiny", seed=1234, init="unit")


@pytest.fixture
def images(seed):
    return torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def refuses_misfit_weights():
    """check(path, load): rewrite the safetensors file at `path` with one key dropped and one foreign
    key added, then assert that load() refuses it naming both keys."""
    import re

    from safetensors.torch import load_file, save_file

    def check(path, load):
        bad = load_file(str(path))
        dropped = sorted(bad)[0]
        del bad[dropped]
        bad["extra.weight"] = torch.zeros(1)
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=re.escape(f"missing ['{dropped}'], unexpected ['extra.weight']")):
            load()

    return check
