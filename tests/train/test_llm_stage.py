"""The LLM stage: sequence layout, the on-disk code cache, the loss, learning, bf16 and checkpointing."""

import json
from collections import Counter

import pytest
import torch
from cfgs import merged  # tests/train/cfgs.py (pytest puts this folder on sys.path)

from seed_fast.testing import assert_close, assert_equal
from seed_fast.train import ConfigError, TrainConfig
from seed_fast.train.llm import IGNORE, CachedPairs, CodedSample, LLMTask, SequenceBuilder, build_code_cache
from seed_fast.train.loop import read_metrics, train


def _cfg(out, **kw):
    return merged(
        {
            "stage": "llm",
            "out": str(out),
            "steps": 4,
            "global_batch": 8,
            "ckpt_every": 2,
            "data": {"n": 48, "val_n": 8, "image_size": 64},
            "optim": {"lr": 2e-3, "warmup": 1},
            "llm": {"eval_n": 8, "lora_dropout": 0.0},
        },
        **kw,
    )


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("llmtask")
    t = LLMTask(TrainConfig.from_dict(_cfg(out / "run", llm={"mode": "instruct"})), torch.device("cpu"))
    t.progress = False
    return t


def _sample(task, i=0, epoch=0, caption="two red circles left of a blue square", question=None, answer=None):
    codes = torch.randint(0, task.tok.codebook_size, (task.tok.num_codes,))  # the test's seeded global RNG
    return CodedSample(codes, caption, question, answer, epoch, i)


def test_sequences_match_the_inference_prompts(task):
    llm, b = task.llm, SequenceBuilder(task.llm, task.cfg.llm)
    s = _sample(task, question="what shape is on the right?", answer="square")
    prompt, ans = b.parts(s, "i2t")
    assert prompt == llm.encode_turn(llm.template.caption, s.codes[None])
    assert ans == llm._text_ids(s.caption) + [llm.text_tokenizer.eos_token_id]
    prompt, ans = b.parts(s, "t2i")
    assert prompt == llm.image_prompt_ids(s.caption) and prompt[-1] == llm.vocab.boi
    assert ans == [llm.vocab.base + int(c) for c in s.codes] + [llm.vocab.eoi, llm.text_tokenizer.eos_token_id]
    prompt, ans = b.parts(s, "qa")
    assert prompt == llm.encode_turn(llm.template.answer.format(question=s.question), s.codes[None])
    # the batch: right-padded, labels masked on the prompt only with loss_on=answers
    for loss_on in ("all", "answers"):
        cfg = task.cfg.llm.__class__(**{**task.cfg.llm.__dict__, "loss_on": loss_on})
        batch = SequenceBuilder(llm, cfg).batch([s, None, _sample(task, 1)], ["qa", None, "t2i"])
        assert batch.kinds == ["qa", "t2i"] and batch.skipped == 1
        n0 = len(prompt) + len(ans)
        assert batch.input_ids[0, :n0].tolist() == prompt + ans and batch.attention_mask[0].sum() == n0
        want = (prompt if loss_on == "all" else [IGNORE] * len(prompt)) + ans
        assert batch.labels[0, :n0].tolist() == want and (batch.labels[0, n0:] == IGNORE).all()


def test_direction_is_half_and_half_and_reproducible(task):
    cfg = task.cfg.llm.__class__(**{**task.cfg.llm.__dict__, "mode": "pretrain"})
    b = SequenceBuilder(task.llm, cfg, seed=3)
    kinds = [b.choose(_sample(task, i, epoch=0)) for i in range(600)]
    share = Counter(kinds)["i2t"] / len(kinds)
    assert 0.43 < share < 0.57
    assert kinds == [b.choose(_sample(task, i, epoch=0)) for i in range(600)]  # same (seed, epoch, i): same choice
    assert kinds != [b.choose(_sample(task, i, epoch=1)) for i in range(600)]  # a new epoch draws again
    qa = SequenceBuilder(task.llm, task.cfg.llm, seed=3)  # instruct: about qa_ratio of the samples with a question
    picks = Counter(qa.choose(_sample(task, i, question="q?", answer="a")) for i in range(600))
    assert 0.4 < picks["qa"] / 600 < 0.6 and picks["i2t"] and picks["t2i"]
    assert qa.choose(_sample(task, 0, caption=None, question="q?", answer="a")) == "qa"
    assert b.choose(_sample(task, 0, caption=None, question="q?", answer="a")) is None  # pretrain needs a caption


def test_long_sequences_are_cut_and_counted(task):
    cfg = task.cfg.llm.__class__(**{**task.cfg.llm.__dict__, "max_len": 40})
    b = SequenceBuilder(task.llm, cfg)
    long = _sample(task, caption=" ".join(["red"] * 40))
    batch = b.batch([long, long], ["i2t", "t2i"])  # i2t: the caption is cut; t2i: the prompt alone is too long
    assert batch.input_ids.shape == (1, 40) and batch.kinds == ["i2t"] and batch.truncated == 2 and batch.skipped == 1


def test_loss_is_the_token_mean_of_a_plain_formulation(task):
    b = SequenceBuilder(task.llm, task.cfg.llm)
    batch = b.batch(
        [_sample(task, i, question="what shape is on the right?", answer="square") for i in range(5)],
        ["i2t", "t2i", "qa", "t2i", "i2t"],
    )
    out = task.module(batch)
    logits = task.llm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    assert_close(out["loss"], ref, atol=1e-6, rtol=1e-5, name="loss")
    assert out["tokens"] == float((batch.labels[:, 1:] != IGNORE).sum())


def test_code_cache_is_built_once_and_keyed(task, tmp_path, monkeypatch):
    from PIL import Image

    from seed_fast.train.data import FolderPairs

    lines = []
    for i in range(7):
        Image.new("RGB", (50, 50), (30 * i, 200 - 20 * i, 90)).save(tmp_path / f"{i}.png")
        lines.append(
            {"image": f"{i}.png", "caption": f"red {i}"}
            if i != 4
            else {"image": "4.png", "question": "q?", "answer": "a"}
        )
    (tmp_path / "2.png").write_bytes(b"not a png")
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = FolderPairs(tmp_path / "index.jsonl")
    tok = task.tok
    cache = build_code_cache(ds, tok, tmp_path / "c" / "train.pt", "k1", batch_size=3, progress=False)
    assert cache["valid"].tolist() == [True, True, False, True, True, True, True]
    want = tok.encode([ds[i].image for i in (0, 1, 3, 4, 5, 6)])
    assert_equal(cache["codes"][cache["valid"]], want, name="cached codes")
    assert cache["texts"][4] == [None, "q?", "a"] and cache["texts"][0][0] == "red 0"
    assert CachedPairs(cache)[(1, 2)] is None and CachedPairs(cache)[(1, 5)].epoch == 1

    def boom(*a, **k):
        raise AssertionError("the tokenizer ran although the cache was valid")

    monkeypatch.setattr(tok, "encode", boom)
    again = build_code_cache(ds, tok, tmp_path / "c" / "train.pt", "k1", batch_size=3, progress=False)
    assert_equal(again["codes"], cache["codes"], name="codes read back")
    with pytest.raises(AssertionError, match="although"):  # a different key (changed tokenizer or data): encoded again
        build_code_cache(ds, tok, tmp_path / "c" / "train.pt", "k2", batch_size=3, progress=False)


def test_tokenizer_fingerprint_sees_weight_changes(task):
    from seed_fast.train.llm import tokenizer_fingerprint

    tok = task.tok
    a = tokenizer_fingerprint(tok)
    with torch.no_grad():
        tok.quantizer.codebook.weight[5, 3] += 1.0
        b = tokenizer_fingerprint(tok)
        tok.quantizer.codebook.weight[5, 3] -= 1.0
    assert a != b and tokenizer_fingerprint(tok) == a


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"llm": {"mode": "chat"}}, "llm.mode must be"),
        ({"llm": {"model": "/no/such/model"}}, "llm.model must be"),
        ({"llm": {"max_len": 20}}, "llm.max_len must be >= 40"),
        ({"llm": {"loss_on": "some"}}, "llm.loss_on"),
        ({"llm": {"template": "vicuna"}}, "llm.template must be one of"),
        ({"llm": {"gradient_checkpointing": 1}}, "llm.gradient_checkpointing must be bool"),
        ({"llm": {"attention": "flash"}}, "llm.attention must be"),
        ({"llm": {"lm_overrides": [6]}}, "llm.lm_overrides must be dict"),
    ],
)
def test_bad_llm_configs(tmp_path, change, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig.from_dict(_cfg(tmp_path / "run", **change))


def test_llm_stage_learns_and_exports(tmp_path):
    cfg = TrainConfig.from_dict(
        _cfg(
            tmp_path / "run",
            steps=120,
            global_batch=16,
            ckpt_every=60,
            eval_every=20,
            data={"n": 128, "val_n": 16},
            llm={"eval_n": 16},
        )
    )
    train(cfg, progress=False)
    evals = [r for r in read_metrics(tmp_path / "run") if r.get("eval")]
    first, last = evals[0], evals[-1]
    assert last["val_t2i_loss"] < 0.5 * first["val_t2i_loss"] and last["val_i2t_loss"] < 0.7 * first["val_i2t_loss"]
    assert last["val_code_match"] > first["val_code_match"]
    from seed_fast.models.llm.seed_llm import SeedLLM

    llm = SeedLLM.from_pretrained(tmp_path / "run" / "llm")
    assert llm.has_lora and llm.tokenizer is not None
    codes = llm.generate_image_codes(["two red circles left of a blue square"])
    assert codes.shape == (1, llm.tokenizer.num_codes)
    assert (tmp_path / "run" / "codes" / "train.pt").exists() and (tmp_path / "run" / "metrics.png").exists()


def test_gradient_checkpointing_gives_the_same_steps_and_bf16_runs(tmp_path):
    runs = {}
    for name, extra in (("plain", {}), ("ckpt", {"llm": {"gradient_checkpointing": True}})):
        train(TrainConfig.from_dict(_cfg(tmp_path / name, **extra)), progress=False)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name) if not r.get("eval")]
    assert runs["plain"] == pytest.approx(runs["ckpt"], rel=1e-5)
    train(
        TrainConfig.from_dict(
            _cfg(tmp_path / "bf16", precision="bf16", llm={"mode": "instruct", "loss_on": "answers"})
        ),
        progress=False,
    )
    rows = read_metrics(tmp_path / "bf16")
    losses = [r["loss"] for r in rows if not r.get("eval")]
    assert all(0 < x < 20 for x in losses) and losses[-1] < losses[0]
    assert "val_answer_exact" in rows[-1]


def test_resume_matches_an_uninterrupted_llm_run(tmp_path):
    ref = TrainConfig.from_dict(_cfg(tmp_path / "ref", steps=6, llm={"lora_dropout": 0.1}))
    train(ref, progress=False)
    cfg = TrainConfig.from_dict(_cfg(tmp_path / "run", steps=6, llm={"lora_dropout": 0.1}))
    train(cfg, progress=False, stop_after=3)
    train(cfg, resume=True, progress=False)
    a = [r["loss"] for r in read_metrics(tmp_path / "ref") if not r.get("eval")]
    b = [r["loss"] for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    assert len(a) == 6 and a == pytest.approx(b, rel=1e-6)


def test_attention_and_preset_overrides(tmp_path):
    """llm.attention picks the LM's kernel (the same steps up to rounding); llm.lm_overrides changes the
    preset's shape and is refused for a model folder or an unknown config field."""
    runs = {}
    for name, llm in (("sdpa", {}), ("eager", {"attention": "eager"})):
        cfg = TrainConfig.from_dict(_cfg(tmp_path / name, llm=llm))
        if name == "eager":
            assert LLMTask(cfg, torch.device("cpu")).llm.base_model.config._attn_implementation == "eager"
        train(cfg, progress=False)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name) if not r.get("eval")]
    assert len(runs["sdpa"]) == 4 and runs["sdpa"] == pytest.approx(runs["eager"], rel=1e-4)
    cfg = TrainConfig.from_dict(_cfg(tmp_path / "deep", llm={"lm_overrides": {"num_hidden_layers": 3}}))
    assert LLMTask(cfg, torch.device("cpu")).llm.base_model.config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown config field.*num_layerz"):
        LLMTask(
            TrainConfig.from_dict(_cfg(tmp_path / "bad", llm={"lm_overrides": {"num_layerz": 3}})), torch.device("cpu")
        )
    with pytest.raises(ConfigError, match="lm_overrides applies to the preset models"):
        TrainConfig.from_dict(
            _cfg(tmp_path / "dir", llm={"model": str(tmp_path), "lm_overrides": {"num_hidden_layers": 3}})
        )
