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
