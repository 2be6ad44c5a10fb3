"""The decoder stage's options: UNet levels, EMA weights (checkpointed, resumed, exported)."""

import pytest
import torch

pytest.importorskip("diffusers")

from seed_fast.default_model import DEFAULT_DIR  # noqa: E402
from seed_fast.models.image_decoder import load_image_decoder  # noqa: E402
from seed_fast.train import TrainConfig  # noqa: E402
from seed_fast.train.loop import latest_checkpoint, train  # noqa: E402


def _cfg(out, **decoder):
    return TrainConfig.from_dict({"stage": "decoder", "out": str(out), "steps": 4, "global_batch": 4, "ckpt_every": 2,
                                  "tokenizer": str(DEFAULT_DIR / "tokenizer"),
                                  "data": {"n": 16, "val_n": 4, "image_size": 64}, "optim": {"lr": 1e-3, "warmup": 1},
                                  "decoder": {"image_size": 16, "channels": [8, 16], **decoder}})


def test_ema_weights_are_checkpointed_resumed_and_exported(tmp_path):
    full = train(_cfg(tmp_path / "a", ema=0.9), progress=False)
    cfg = _cfg(tmp_path / "b", ema=0.9)
    train(cfg, progress=False, stop_after=2)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["val_mse_t300"] == pytest.approx(full["val_mse_t300"], rel=1e-4)
    state = torch.load(latest_checkpoint(tmp_path / "a") / "state.pt", weights_only=True)["model"]
    exported = load_image_decoder(tmp_path / "a" / "decoder").unet.state_dict()
    other = load_image_decoder(tmp_path / "b" / "decoder").unet.state_dict()
    assert all(torch.allclose(exported[k], other[k], atol=1e-5) for k in exported)
    ema = {k[len("ema_unet."):]: v for k, v in state.items() if k.startswith("ema_unet.")}
    raw = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    assert set(ema) == set(exported) == set(raw)
    assert all(torch.equal(ema[k], exported[k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the export is the average, not the last weights


def test_no_ema_exports_the_trained_weights(tmp_path):
    train(_cfg(tmp_path / "run"), progress=False)
    assert load_image_decoder(tmp_path / "run" / "decoder").unet.config.block_out_channels == [8, 16]


def test_patch_option_trains_a_full_size_decoder(tmp_path):
    train(_cfg(tmp_path / "run", patch=2), progress=False)
    dec = load_image_decoder(tmp_path / "run" / "decoder")
    assert (dec.patch, dec.image_size, dec.unet.config.sample_size, dec.unet.config.in_channels) == (2, 16, 8, 12)
