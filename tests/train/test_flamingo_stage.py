"""The Flamingo-style baseline through the training launcher: only the connector learns, the KV-cached
greedy captions equal a cache-free loop, runs resume exactly, exports reload, bad configs fail early."""

import json

import pytest
import torch
from safetensors.torch import load_file

from seed_fast import SeedLLM, SeedTokenizer
from seed_fast.models.related.flamingo import FlamingoConnector, load_flamingo
from seed_fast.synthetic import caption_scores
from seed_fast.testing import assert_close, assert_equal
from seed_fast.train import TrainConfig
from seed_fast.train.config import ConfigError
from seed_fast.train.loop import train


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("flamingo_parts")
    SeedLLM.from_config("tiny-llama", seed=0).save_pretrained(root / "llm")
    SeedTokenizer.from_config("mini", seed=1).save_pretrained(root / "tok")
    return root


def _cfg(out, parts, **fl):
    return TrainConfig.from_dict(
        {
            "stage": "flamingo",
            "out": str(out),
            "steps": 4,
            "global_batch": 8,
            "ckpt_every": 2,
            "eval_every": 4,
            "data": {"n": 48, "val_n": 8, "image_size": 64},
            "optim": {"lr": 3e-3, "warmup": 1},
            "flamingo": {
                "lm": str(parts / "llm"),
                "vit_from": str(parts / "tok"),
                "eval_n": 4,
                "max_new_tokens": 6,
                "num_latents": 8,
                **fl,
            },
        }
    )


@pytest.mark.parametrize("media", ["vit", "qformer"])
def test_flamingo_stage_trains_only_the_connector_and_exports(tmp_path, parts, media, refuses_misfit_weights):
    before = load_file(str(parts / "llm" / "llm" / "model.safetensors"))
    m = train(_cfg(tmp_path / "run", parts, media=media), progress=False)
    for key in ("val_caption_loss", "val_caption_exact", "val_caption_objects_ok"):
        assert key in m
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["gate"] for r in rows if "gate" in r][-1] > 0  # the tanh gates left zero: the image reaches the LM
    after = load_file(str(parts / "llm" / "llm" / "model.safetensors"))
    for k in before:
        assert_equal(before[k], after[k], name=k)
    conn, llm, tok, meta = load_flamingo(tmp_path / "run")
    assert meta["media"] == media and meta["lm"] == str(parts / "llm")
    saved = load_file(str(tmp_path / "run" / "flamingo" / "connector.safetensors"))
    for k, v in conn.state_dict().items():
        assert_equal(v, saved[k], name=k)
    # the LM inside the reloaded connector is the untouched frozen LM
    lm_sd = llm.model.state_dict()
    ref = SeedLLM.from_pretrained(parts / "llm").model.state_dict()
    for k in ref:
        assert_equal(lm_sd[k], ref[k], name=k)
    # a weights file that does not fit its config is refused, naming the keys
    refuses_misfit_weights(
        tmp_path / "run" / "flamingo" / "connector.safetensors", lambda: load_flamingo(tmp_path / "run")
    )


def test_cached_greedy_equals_a_full_forward_loop(parts, seed):
    llm = SeedLLM.from_pretrained(parts / "llm")
    llm.model.eval()
    g = torch.Generator().manual_seed(seed)
    conn = FlamingoConnector(llm.model, media_dim=24, num_latents=5, every=2).eval()
    with torch.no_grad():
        for name, p in conn.named_parameters():  # gates at 0 would make the check trivial: open them
            if name.endswith("_gate"):
                p.fill_(0.8)
    media = torch.randn(3, 7, 24, generator=g)
    ids = torch.randint(5, 200, (3, 6), generator=g)

    def cached(m):
        out = conn.generate(
            ids,
            torch.ones_like(ids),
            media=m,
            max_new_tokens=5,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1).float()

    got, got_logits = cached(media)
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(5):
            step = conn(seq, torch.ones_like(seq), media=media, use_cache=False).logits[:, -1].float()
            logits.append(step)
            seq = torch.cat([seq, step.argmax(-1)[:, None]], 1)
    assert_equal(got, seq[:, ids.shape[1] :], name="greedy tokens")
    assert_close(got_logits, torch.stack(logits, 1), atol=1e-4, rtol=1e-4, name="logits")
    # the media reach the logits, and the connector at closed gates is exactly the LM
    _, other = cached(torch.randn(3, 7, 24, generator=g))
    assert (other - got_logits).abs().max() > 1e-3
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if name.endswith("_gate"):
                p.zero_()
        plain = llm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        gated = conn(ids, torch.ones_like(ids), media=media).logits
    assert_equal(gated, plain, name="logits at closed gates")


def test_flamingo_resume_matches_an_uninterrupted_run(tmp_path, parts):
    full = train(_cfg(tmp_path / "a", parts), progress=False)
    cfg = _cfg(tmp_path / "b", parts)
    train(cfg, progress=False, stop_after=2)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["val_caption_loss"] == pytest.approx(full["val_caption_loss"], rel=1e-4)
    a = load_file(str(tmp_path / "a" / "flamingo" / "connector.safetensors"))
    b = load_file(str(tmp_path / "b" / "flamingo" / "connector.safetensors"))
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, name=k)


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"media": "pixels"}, "flamingo.media"),
        ({"lm": "/no/such"}, "flamingo.lm"),
        ({"lm": None}, "flamingo.lm must be set"),
        ({"every": 0}, "every"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_flamingo_configs_fail_before_any_work(tmp_path, parts, change, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path / "x", parts, **change)
    assert not (tmp_path / "x").exists()


def test_load_flamingo_names_what_is_missing(tmp_path):
    (tmp_path / "flamingo").mkdir()
    with pytest.raises(FileNotFoundError, match="connector.safetensors"):
        load_flamingo(tmp_path)


def test_caption_scores_judge_objects_by_the_scene_grammar():
    truth = ["two red circles left of a blue square", "one green triangle left of a yellow circle"]
    preds = ["three red circles left of a blue square", "one green triangle left of a red circle"]
    s = caption_scores(preds, truth)
    assert s["val_caption_exact"] == 0.0 and s["val_caption_objects_ok"] == 0.5
    assert caption_scores(["gibberish"], truth[:1])["val_caption_objects_ok"] == 0.0
