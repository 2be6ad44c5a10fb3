"""The vae stage (a small AutoencoderKL) and a latent decoder stage trained on its latents."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from seed_fast.default_model import DEFAULT_DIR  # noqa: E402
from seed_fast.models.decoders.image_decoder import load_image_decoder  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402
from seed_fast.train import ConfigError, TrainConfig  # noqa: E402
from seed_fast.train.loop import latest_checkpoint, read_metrics, train  # noqa: E402


def _vae_cfg(out, steps=4, **vae):
    return TrainConfig.from_dict(
        {
            "stage": "vae",
            "out": str(out),
            "steps": steps,
            "global_batch": 4,
            "ckpt_every": 2,
            "data": {"n": 16, "val_n": 4, "image_size": 64},
            "optim": {"lr": 1e-3, "warmup": 1},
            "vae": {"image_size": 16, "channels": [8, 16], **vae},
        }
    )


def _decoder_cfg(out, vae, **decoder):
    return TrainConfig.from_dict(
        {
            "stage": "decoder",
            "out": str(out),
            "steps": 3,
            "global_batch": 4,
            "ckpt_every": 3,
            "tokenizer": str(DEFAULT_DIR / "tokenizer"),
            "data": {"n": 16, "val_n": 4, "image_size": 64},
            "optim": {"lr": 1e-3, "warmup": 1},
            "decoder": {"image_size": 16, "channels": [16, 32], "vae": str(vae), **decoder},
        }
    )


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae") / "run"
    metrics = train(_vae_cfg(run), progress=False)
    return run, metrics


def test_vae_stage_exports_an_autoencoder_with_its_latent_scale(vae_run):
    from diffusers import AutoencoderKL

    run, metrics = vae_run
    vae = AutoencoderKL.from_pretrained(run / "vae")
    assert list(vae.config.block_out_channels) == [8, 16] and vae.config.latent_channels == 4
    assert metrics["val_mse"] > 0 and metrics["val_latent_std"] > 0
    # the exported scale makes the training latents unit-scale (its own sample of them)
    from seed_fast.train.vae import VaeTask

    task = VaeTask(_vae_cfg(run.parent / "unused"), torch.device("cpu"))
    task.vae.load_state_dict(vae.state_dict())
    assert vae.config.scaling_factor == pytest.approx(task.latent_scale(), rel=1e-5)
    assert vae.config.scaling_factor != 1.0
    losses = [r for r in read_metrics(run) if not r.get("eval")]
    assert len(losses) == 4 and all(r["loss"] >= r["mse"] > 0 and r["kl"] >= 0 for r in losses)
    assert not (run / "vae.tmp").exists()


def test_vae_stage_resumes_to_the_same_weights(tmp_path, vae_run):
    cfg = _vae_cfg(tmp_path / "b")
    train(cfg, progress=False, stop_after=2)
    assert latest_checkpoint(tmp_path / "b") is not None
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["val_mse"] == pytest.approx(vae_run[1]["val_mse"], rel=1e-4)


def test_vae_config_errors(tmp_path):
    for bad, msg in (
        ({"channels": [12]}, "vae.channels"),
        ({"image_size": 15}, "vae.image_size must be a multiple of 2"),
        ({"latent_channels": 0}, "vae.latent_channels"),
        ({"kl_weight": -1.0}, "vae.kl_weight"),
    ):
        with pytest.raises(ConfigError, match=msg):
            _vae_cfg(tmp_path / "x", **bad)


def test_latent_decoder_stage_trains_on_the_autoencoders_latents(tmp_path, vae_run):
    run, _ = vae_run
    metrics = train(_decoder_cfg(tmp_path / "dec", run / "vae"), progress=False)
    assert {"val_latent_mse_t50", "val_latent_mse_t300", "val_latent_mse_t700"} <= set(metrics)
    dec = load_image_decoder(tmp_path / "dec" / "decoder")
    assert dec.vae is not None and (dec.sample_channels, dec.sample_size, dec.image_size) == (4, 8, 16)
    assert dec.vae.config.scaling_factor == pytest.approx(
        json.loads((run / "vae" / "config.json").read_text())["scaling_factor"]
    )
    exported = json.loads((tmp_path / "dec" / "decoder" / "vae" / "config.json").read_text())
    assert "_name_or_path" not in exported and str(tmp_path) not in json.dumps(exported)  # no training-machine path
    # the frozen autoencoder is not trained: the exported one is the vae stage's
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(run / "vae").state_dict()
    for k, v in dec.vae.state_dict().items():
        assert_equal(v, ref[k], name=k)
    images = dec(torch.randn(2, dec.image_embedding_dim), num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # only the UNet is checkpointed
    state = torch.load(latest_checkpoint(tmp_path / "dec") / "state.pt", weights_only=True)["model"]
    assert state and all(k.startswith("unet.") for k in state)


def test_latent_decoder_cache_holds_the_latents_it_would_compute(tmp_path, vae_run):
    """With the cache on, a sample's embedding and latents are what the frozen tokenizer and
    autoencoder give for its pixels."""
    from seed_fast.train.decoder import DecoderTask, decoder_targets, embeddings_from_pixels

    run, _ = vae_run
    task = DecoderTask(_decoder_cfg(tmp_path / "t", run / "vae"), torch.device("cpu"))
    pixels = torch.rand(3, 3, 64, 64)
    emb, lat = task.module.embeddings_and_samples(pixels, ["a", "b", "c"])
    emb2, lat2 = task.module.embeddings_and_samples(pixels, ["a", "b", "c"])
    assert task.module.embeddings.hits == 3
    assert_equal(lat2, lat, name="cached latents")
    assert_equal(emb2, emb, name="cached embeddings")
    with torch.no_grad():
        want = task.pipe.vae.encode(decoder_targets(pixels, 16)).latent_dist.mean * task.pipe.vae.config.scaling_factor
    assert_close(lat, want, atol=1e-5, rtol=1e-5, name="latents")
    assert_close(emb, embeddings_from_pixels(task.tok, pixels), atol=1e-5, rtol=1e-5, name="embeddings")


def test_latent_decoder_config_errors(tmp_path, vae_run):
    run, _ = vae_run
    with pytest.raises(ConfigError, match="decoder.vae must be an autoencoder folder"):
        _decoder_cfg(tmp_path / "x", tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"decoder.image_size \(32\) must be the size the autoencoder"):
        _decoder_cfg(tmp_path / "x", run / "vae", image_size=32)
    with pytest.raises(ConfigError, match="times the autoencoder's down-sampling"):
        _decoder_cfg(
            tmp_path / "x", run / "vae", channels=[16, 32, 64, 128, 256]
        )  # 16 px -> 8 latents: 4 halvings too many
