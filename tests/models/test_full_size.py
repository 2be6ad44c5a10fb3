"""The released size: seed-tokenizer-2 (about 1.1 B parameters) with random weights, on CPU.

Slow (minutes, ~10 GB of memory at peak, ~5 GB of temporary files): run with `pytest -m slow`.
"""

import resource
import time

import pytest
import torch

from seed_fast import SeedTokenizer
from seed_fast.synthetic import sample_images
from seed_fast.testing import assert_equal

pytestmark = pytest.mark.slow


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def test_full_size_encodes_one_image_and_round_trips_official_files(tmp_path):
    t0 = time.perf_counter()
    tok = SeedTokenizer.from_config("seed-tokenizer-2", seed=0, init="unit")
    n_params = sum(p.numel() for p in tok.parameters())
    t_build = time.perf_counter() - t0
    images, _ = sample_images(1, seed=0)

    t0 = time.perf_counter()
    codes = tok.encode(images)
    t_encode = time.perf_counter() - t0
    assert codes.shape == (1, 32) and int(codes.max()) < 8192
    emb = tok.encode_embeddings(images)
    assert emb.shape == (1, 32, 768)
    gen = tok.decode(codes)
    assert gen.shape == (1, 1024) and torch.isfinite(gen).all()

    quant, vit = tok.official_state_dicts()
    torch.save(quant, tmp_path / "seed_quantizer.pt")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    del quant, vit
    t0 = time.perf_counter()
    loaded = SeedTokenizer.from_official(tmp_path / "seed_quantizer.pt", tmp_path / "eva_vit_g.pth")
    t_load = time.perf_counter() - t0
    r = loaded.load_report
    assert r.missing == [] and r.unexpected == [] and r.mismatched == []
    assert_equal(loaded.encode(images), codes, name="codes")
    assert_equal(loaded.encode_embeddings(images), emb, name="embeddings")
    assert_equal(loaded.decode(codes), gen, name="decoded")
    print(
        f"\nseed-tokenizer-2: {n_params / 1e9:.3f} B params; build {t_build:.1f} s, encode 1 image {t_encode:.1f} s, "
        f"official load {t_load:.1f} s; peak RSS {_peak_rss_gb():.1f} GB"
    )
