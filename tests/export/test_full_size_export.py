"""The released size through ONNX: seed-tokenizer-2 (about 1.1 B parameters, random weights) exports
with its weights in an external-data file (over protobuf's 2 GB) and runs in onnxruntime on CPU with
the same codes as torch. Slow (minutes, ~15 GB of memory at peak): `pytest -m slow`."""

import time

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from seed_fast import SeedTokenizer  # noqa: E402
from seed_fast.export import export_onnx  # noqa: E402
from seed_fast.runtime import SeedRuntime  # noqa: E402
from seed_fast.synthetic import sample_images  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402

pytestmark = pytest.mark.slow


def test_seed_tokenizer_2_exports_and_runs_in_onnxruntime(tmp_path):
    tok = SeedTokenizer.from_config("seed-tokenizer-2", seed=0, init="unit")
    t0 = time.perf_counter()
    man = export_onnx(["tokenizer", "detokenizer"], tmp_path, objects={"tokenizer": tok}, progress=False)
    t_export = time.perf_counter() - t0
    rep = man["reports"]["tokenizer"]
    assert "image_tokenizer.onnx.data" in rep["files"] and rep["megabytes"] > 2048
    assert rep["parity"]["codes_equal"] == 1.0
    assert man["reports"]["detokenizer"]["parity"]["max_rel_err"] <= 1e-4
    rt = SeedRuntime(tmp_path, providers=["CPUExecutionProvider"])
    images, _ = sample_images(2, seed=5)
    t0 = time.perf_counter()
    codes = rt.encode(images)
    t_run = time.perf_counter() - t0
    assert codes.shape == (2, 32)
    assert_equal(codes, tok.encode(images), name="codes")
    emb = rt.decode(codes)
    assert emb.shape == (2, 1024)
    ref = tok.decode(torch.from_numpy(codes)).numpy()
    assert_close(emb, ref, atol=1e-4 * float(np.abs(ref).max()), rtol=0, name="embeddings")
    print(
        f"\nseed-tokenizer-2: export {t_export:.0f} s ({rep['megabytes']:.0f} MB), onnxruntime 2 images {t_run:.1f} s"
    )
