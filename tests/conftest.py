import os

# Triton kernels run on CPU tensors under the interpreter when there is no GPU; this must be set
# before triton is first imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


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
def images():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return torch.rand(3, 3, 224, 224, generator=g)


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
