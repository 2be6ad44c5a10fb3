"""The decoder stage's options: UNet levels, EMA weights (checkpointed, resumed, exported)."""

import math

import pytest
import torch

pytest.importorskip("diffusers")

from seed_fast.default_model import DEFAULT_DIR  # noqa: E402
from seed_fast.models.decoders.image_decoder import load_image_decoder  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402
from seed_fast.train import ConfigError, TrainConfig  # noqa: E402
from seed_fast.train.loop import latest_checkpoint, train  # noqa: E402


def _cfg(out, **decoder):
    return TrainConfig.from_dict(
        {
            "stage": "decoder",
            "out": str(out),
            "steps": 4,
            "global_batch": 4,
            "ckpt_every": 2,
            "tokenizer": str(DEFAULT_DIR / "tokenizer"),
            "data": {"n": 16, "val_n": 4, "image_size": 64},
            "optim": {"lr": 1e-3, "warmup": 1},
            "decoder": {"image_size": 16, "channels": [8, 16], **decoder},
        }
    )


def test_ema_weights_are_checkpointed_resumed_and_exported(tmp_path):
    full = train(_cfg(tmp_path / "a", ema=0.9), progress=False)
    cfg = _cfg(tmp_path / "b", ema=0.9)
    train(cfg, progress=False, stop_after=2)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["val_mse_t300"] == pytest.approx(full["val_mse_t300"], rel=1e-4)
    state = torch.load(latest_checkpoint(tmp_path / "a") / "state.pt", weights_only=True)["model"]
    exported = load_image_decoder(tmp_path / "a" / "decoder").unet.state_dict()
    other = load_image_decoder(tmp_path / "b" / "decoder").unet.state_dict()
    for k in exported:
        assert_close(exported[k], other[k], atol=1e-5, rtol=1e-5, name=k)
    ema = {k[len("ema_unet.") :]: v for k, v in state.items() if k.startswith("ema_unet.")}
    raw = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    assert set(ema) == set(exported) == set(raw)
    for k in ema:
        assert_equal(ema[k], exported[k], name=k)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the export is the average, not the last weights


def test_no_ema_exports_the_trained_weights(tmp_path):
    train(_cfg(tmp_path / "run"), progress=False)
    assert load_image_decoder(tmp_path / "run" / "decoder").unet.config.block_out_channels == [8, 16]


def test_attention_levels_option_reaches_the_exported_unet(tmp_path):
    train(_cfg(tmp_path / "run", channels=[16, 32], attention_levels=2), progress=False)
    unet = load_image_decoder(tmp_path / "run" / "decoder").unet
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    for bad in (0, 3, True):
        with pytest.raises(ConfigError, match="decoder.attention_levels"):
            _cfg(tmp_path / "bad", attention_levels=bad)
    with pytest.raises(ConfigError, match="multiples of 16"):
        _cfg(tmp_path / "bad", attention_levels=2)  # [8, 16]: 8 channels cannot hold 16 heads


def test_patch_option_trains_a_full_size_decoder(tmp_path):
    train(_cfg(tmp_path / "run", patch=2), progress=False)
    dec = load_image_decoder(tmp_path / "run" / "decoder")
    assert (dec.patch, dec.image_size, dec.unet.config.sample_size, dec.unet.config.in_channels) == (2, 16, 8, 12)


def test_math_attention_trains_the_same_decoder_and_exports_the_default(tmp_path):
    """decoder.attention "math" swaps the UNet's attention kernel for training only: the same losses up
    to rounding, and the exported folder loads with diffusers' default processors."""
    from seed_fast.train.decoder import DecoderTask
    from seed_fast.train.loop import read_metrics

    task = DecoderTask(_cfg(tmp_path / "t", attention="math"), torch.device("cpu"))
    assert {type(p).__name__ for p in task.pipe.unet.attn_processors.values()} == {"AttnProcessor"}
    runs = {}
    for name in ("sdpa", "math"):
        train(_cfg(tmp_path / name, attention=name), progress=False)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name) if not r.get("eval")]
    assert len(runs["sdpa"]) == 4 and runs["sdpa"] == pytest.approx(runs["math"], rel=1e-4)
    procs = {type(p).__name__ for p in load_image_decoder(tmp_path / "math" / "decoder").unet.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}
    with pytest.raises(ConfigError, match="decoder.attention must be"):
        _cfg(tmp_path / "bad", attention="flash")


def _scenes(n, offset=0, size=64):
    from seed_fast.models.preprocess import images_to_tensor
    from seed_fast.train.data import SyntheticPairs

    ds = SyntheticPairs(n + offset, seed=3, size=size)
    samples = [ds[i] for i in range(offset, offset + n)]
    return images_to_tensor([s.image for s in samples], size), [s.key for s in samples]


def test_embedding_cache_gives_what_the_tokenizer_gives_in_any_batch():
    from seed_fast.models import SeedTokenizer
    from seed_fast.train.decoder import EmbeddingCache, embeddings_from_pixels

    tok = SeedTokenizer.from_pretrained(DEFAULT_DIR / "tokenizer").eval()
    pixels, keys = _scenes(11)
    cache = EmbeddingCache(limit=100)
    first = cache(tok, pixels[:7], keys[:7])
    assert (cache.hits, cache.misses) == (0, 7)
    order = [9, 2, 6, 0, 10, 4]  # a new batch: four seen samples, two new ones, shuffled
    got = cache(tok, pixels[order], [keys[i] for i in order])
    assert (cache.hits, cache.misses) == (4, 9)
    want = embeddings_from_pixels(tok, pixels[order])
    assert_close(got, want, atol=1e-6, rtol=1e-5, name="embeddings, second batch")
    assert_close(first, embeddings_from_pixels(tok, pixels[:7]), atol=1e-6, rtol=1e-5, name="embeddings, first batch")


def test_embedding_cache_checks_pixels_and_keeps_its_limit():
    from seed_fast.models import SeedTokenizer
    from seed_fast.train.decoder import EmbeddingCache, embeddings_from_pixels

    tok = SeedTokenizer.from_pretrained(DEFAULT_DIR / "tokenizer").eval()
    pixels, keys = _scenes(4)
    other, _ = _scenes(4, offset=4)
    cache = EmbeddingCache(limit=3)
    cache(tok, pixels, keys)
    assert len(cache.entries) == 3
    # the same keys on other pictures (two sources reusing names): recomputed, never swapped
    got = cache(tok, other, keys)
    assert cache.hits == 0
    assert_close(got, embeddings_from_pixels(tok, other), atol=1e-6, rtol=1e-5, name="embeddings of the new pictures")
    assert not torch.allclose(got, embeddings_from_pixels(tok, pixels), atol=1e-3)
    off = EmbeddingCache(limit=0)
    off(tok, pixels, keys)
    assert not off.entries and off.hits == off.misses == 0


def test_embedding_cache_does_not_change_training(tmp_path):
    # 3 epochs of 4 steps: from the second epoch on, every embedding comes from the cache
    runs = {}
    for limit in (0, 131072):
        cfg = _cfg(tmp_path / f"c{limit}", embedding_cache=limit)
        cfg.steps = 12
        runs[limit] = train(cfg, progress=False)
        runs[limit]["unet"] = load_image_decoder(tmp_path / f"c{limit}" / "decoder").unet.state_dict()
    assert runs[0]["val_mse_t300"] == pytest.approx(runs[131072]["val_mse_t300"], rel=1e-4)
    a, b = runs[0]["unet"], runs[131072]["unet"]
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, name=k)


def test_bf16_training_conditions_on_full_precision_embeddings(tmp_path):
    # under `precision: bf16` the UNet runs in autocast, but the frozen tokenizer must give the decoder
    # what it gives at inference (fp32): that is what the cache keeps and what the UNet is trained on
    from seed_fast.train.decoder import DecoderTask, embeddings_from_pixels

    cfg = _cfg(tmp_path / "bf16")
    cfg.precision = "bf16"
    task = DecoderTask(cfg, torch.device("cpu"))
    ds, collate = task.dataset(), task.collate()
    batch = collate([ds[i] for i in range(6)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task.module(batch)
    assert torch.isfinite(out["loss"])
    cached = torch.stack([task.module.embeddings.entries[k][1] for k in batch.keys])
    assert cached.dtype == torch.float32
    assert_close(cached, embeddings_from_pixels(task.tok, batch.pixels), atol=1e-6, rtol=1e-5, name="cached")
    metrics = train(cfg, progress=False)
    mse = {k: v for k, v in metrics.items() if k.startswith("val_mse")}
    assert mse and all(math.isfinite(v) and v > 0 for v in mse.values()), mse
