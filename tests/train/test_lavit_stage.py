"""The LaVIT stage through the training launcher: learns, resumes, exports, refuses bad configs."""

import json

import pytest
from safetensors.torch import load_file

from seed_fast.models.related.lavit import LavitTokenizer
from seed_fast.testing import assert_close
from seed_fast.train import TrainConfig
from seed_fast.train.config import ConfigError
from seed_fast.train.data import make_collate
from seed_fast.train.loop import train
from seed_fast.train.sources import make_source


def _cfg(out, **lavit):
    return TrainConfig.from_dict(
        {
            "stage": "lavit",
            "out": str(out),
            "steps": 6,
            "global_batch": 8,
            "ckpt_every": 3,
            "eval_every": 6,
            "data": {"n": 48, "val_n": 16, "image_size": 64},
            "optim": {"lr": 2e-3, "warmup": 1},
            "lavit": {"preset": "tiny-lavit", **lavit},
        }
    )


def test_lavit_stage_trains_evaluates_and_exports(tmp_path):
    cfg = _cfg(tmp_path / "run")
    m = train(cfg, progress=False)
    for key in ("val_recon", "val_kept", "val_tokens", "val_codebook_usage"):
        assert key in m
    assert 1 <= m["val_tokens"] <= 64
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    assert steps[-1]["recon"] < steps[0]["recon"]
    sd = load_file(str(tmp_path / "run" / "lavit" / "tokenizer.safetensors"))
    tok = LavitTokenizer.from_config("tiny-lavit", seed=99)
    missing, unexpected = tok.load_official(sd)
    assert not missing and not unexpected
    # the codebook usage is the share of codes the exported tokenizer gives the validation images
    val = make_source(cfg, "val")
    pixels = make_collate(64)([val[i] for i in range(min(len(val), 16))]).pixels
    used = {int(c) for codes in tok.eval().encode(pixels) for c in codes}
    assert m["val_codebook_usage"] == pytest.approx(len(used) / tok.config.codebook_size)


def test_lavit_resume_matches_an_uninterrupted_run(tmp_path):
    full = train(_cfg(tmp_path / "a"), progress=False)
    cfg = _cfg(tmp_path / "b")
    train(cfg, progress=False, stop_after=3)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["val_recon"] == pytest.approx(full["val_recon"], rel=1e-4)
    a = load_file(str(tmp_path / "a" / "lavit" / "decoder.safetensors"))
    b = load_file(str(tmp_path / "b" / "lavit" / "decoder.safetensors"))
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, name=k)


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"preset": "nope"}, "lavit.preset"),
        ({"vit_from": "/no/such"}, "vit_from"),
        ({"codebook_init": "zeros"}, "codebook_init"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"tau": 0}, "tau"),
    ],
)
def test_bad_lavit_configs_fail_before_any_work(tmp_path, change, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path / "x", **change)
    assert not (tmp_path / "x").exists()


def test_vit_from_a_tokenizer_that_does_not_fit(tmp_path):
    from seed_fast import SeedTokenizer

    SeedTokenizer.from_config("tiny").save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match="does not fit"):
        train(_cfg(tmp_path / "x", vit_from=str(tmp_path / "tok")), progress=False)
