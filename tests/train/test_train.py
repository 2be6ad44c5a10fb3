"""The training launcher: config checks, resume after kill -9, DDP (torchrun, gloo) equals one process."""

import dataclasses
import json
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from cfgs import spawn as _spawn
from cfgs import stage2_run as _cfg
from cfgs import train_args

from seed_fast.testing import assert_close, assert_equal
from seed_fast.train import ConfigError, TrainConfig, main
from seed_fast.train.loop import latest_checkpoint, read_metrics, train


def _write(tmp_path, data, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _losses(run):
    keys = ("step", "loss", "vq", "cos", "mse", "itc", "temp")
    return [tuple(r[k] for k in keys if k in r) for r in read_metrics(run) if not r.get("eval")]


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"stepz": 3}, r"unknown key\(s\) \['stepz'\]"),
        ({"steps": "10"}, "config.steps must be int"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"stage": "stage9"}, "stage must be one of"),
        ({"data": {"kind": "parquet"}}, "data.kind must be one of synthetic, folder, tar, webdataset, hf"),
        ({"data": {"kind": "folder", "index": "/nope.jsonl"}}, "data.index must be an existing"),
        ({"data": {"n": 4}}, r"data.n \(4\) must be >= global_batch"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
        ({"stage2": {"target": "/no/clip"}}, "stage2.target"),
        ({"stage2": {"codebook_init": "magic"}}, "codebook_init"),
        ({"stage2": {"code_dim": 0}}, "stage2.code_dim must be a positive integer"),
        ({"stage2": {"itc_text_weight": 1.0}}, "stage2.itc_text_weight needs stage2.itc_heads"),
        ({"stage2": {"itc_text_weight": -1.0}}, "stage2 loss weights must be >= 0"),
        ({"precision": "fp8"}, "precision"),
        ({"strategy": "fsdp"}, "strategy 'fsdp' is for the llm stage"),
        ({"decoder": {"channels": [32]}}, "decoder.channels must be 2 or more"),
        ({"decoder": {"channels": [16, 20]}}, "decoder.channels must be 2 or more multiples of 8"),
        ({"decoder": {"channels": [16, 32, 64, 128], "image_size": 36}}, "decoder.image_size must be a multiple of 8"),
        (
            {"decoder": {"channels": [16, 32], "patch": 2, "image_size": 30}},
            "decoder.image_size must be a multiple of 4",
        ),
        ({"decoder": {"patch": 0}}, "decoder.patch must be a positive integer"),
        ({"decoder": {"embedding_cache": -1}}, "decoder.embedding_cache must be a number of samples"),
        ({"decoder": {"embedding_cache": True}}, "decoder.embedding_cache must be int"),
        ({"report_to": ["mlflow"]}, r"report_to takes \['auto', 'tensorboard', 'wandb', 'none'\], got \['mlflow'\]"),
    ],
)
def test_bad_configs_fail_before_any_work(tmp_path, change, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig.from_dict(_cfg(tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_config_and_stage_mismatch(tmp_path, capsys):
    assert main(["stage2", "--config", str(_write(tmp_path, _cfg(tmp_path / "r", steps=-1)))]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["stage1", "--config", str(_write(tmp_path, _cfg(tmp_path / "r")))]) == 2
    assert "the command says stage1" in capsys.readouterr().err
    assert main(["stage2", "--config", str(_write(tmp_path, _cfg(tmp_path / "r"))), "--steps", "0"]) == 2
    assert "steps must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["stage2", "--config", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["stage2", "--config", str(tmp_path / "broken.json")]) == 2


def test_stage2_trains_logs_checkpoints_and_exports(tmp_path):
    cfg = TrainConfig.from_dict(
        _cfg(tmp_path / "run", steps=12, stage2={"codebook_init": "kmeans", "restart_dead_every": 4}, global_batch=16)
    )
    last = train(cfg, progress=False)
    rows = _losses(tmp_path / "run")
    assert [r[0] for r in rows] == list(range(1, 13))
    assert rows[-1][1] < 0.7 * rows[0][1]  # the loss goes down
    assert last["val_recon_cos"] > 0
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "step_00000012" and len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 2
    from seed_fast import SeedTokenizer

    tok = SeedTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    state = torch.load(ck / "state.pt", weights_only=True)["model"]
    assert_equal(tok.quantizer.codebook.weight, state["tok.quantizer.codebook.weight"], name="exported codebook")
    # the codebook usage is the share of codes the exported tokenizer gives the validation images
    from seed_fast.models.preprocess import normalize
    from seed_fast.train.data import make_collate
    from seed_fast.train.sources import make_source

    val = make_source(cfg, "val")
    pixels = make_collate(tok.config.vision.image_size)([val[i] for i in range(min(len(val), 16))]).pixels
    with torch.no_grad():
        codes = tok.quantizer.lookup(
            tok.causal_embeddings(normalize(pixels, tok.config.image_mean, tok.config.image_std))
        )
    assert last["val_codebook_usage"] == pytest.approx(codes.unique().numel() / tok.codebook_size)
    assert (tmp_path / "run" / "metrics.png").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, progress=False)


def test_stage2_can_reshape_the_quantizer_and_resume(tmp_path):
    from seed_fast import SeedTokenizer

    def cfg(name):
        return TrainConfig.from_dict(_cfg(tmp_path / name, steps=4, stage2={"code_dim": 8, "codebook_size": 48}))

    full = train(cfg("a"), progress=False)
    train(cfg("b"), progress=False, stop_after=2)
    resumed = train(cfg("b"), resume=True, progress=False)
    assert resumed["val_recon_cos"] == pytest.approx(full["val_recon_cos"], rel=1e-5)
    tok = SeedTokenizer.from_pretrained(tmp_path / "a" / "tokenizer")
    assert (tok.config.quantizer.code_dim, tok.codebook_size) == (8, 48)
    assert tok.quantizer.codebook.weight.shape == (48, 8) and tok.quantizer.encode_task_layer[-1].out_features == 8
    other = SeedTokenizer.from_pretrained(tmp_path / "b" / "tokenizer")
    assert_close(tok.quantizer.codebook.weight, other.quantizer.codebook.weight, atol=1e-5, rtol=1.3e-6, name="resumed")
    codes = tok.encode(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 32) and int(codes.max()) < 48


def test_bad_samples_are_skipped_and_counted(tmp_path):
    from PIL import Image

    lines = []
    for i in range(10):
        Image.new("RGB", (40, 40), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "caption": f"red {i}"})
    (tmp_path / "3.png").write_bytes(b"corrupt")
    lines[5]["caption"] = ""
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = TrainConfig.from_dict(
        _cfg(
            tmp_path / "run", steps=4, global_batch=10, data={"kind": "folder", "index": str(tmp_path / "index.jsonl")}
        )
    )
    train(cfg, progress=False)
    rows = [r for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    assert [r["skipped"] for r in rows] == [2, 4, 6, 8]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = 40
    ref_cfg = _write(tmp_path, _cfg(tmp_path / "ref", steps=steps, ckpt_every=3), "ref.json")
    p = _spawn(train_args("stage2", ref_cfg))
    p.communicate(timeout=600)
    assert p.returncode == 0

    cfg = _write(tmp_path, _cfg(tmp_path / "run", steps=steps, ckpt_every=3), "run.json")
    p = _spawn(train_args("stage2", cfg))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        rows = read_metrics(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 8:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    ck = latest_checkpoint(tmp_path / "run")
    assert ck is not None and int(ck.name.split("_")[1]) < steps
    torch.load(ck / "state.pt", weights_only=True)  # intact

    q = _spawn(train_args("stage2", cfg, "--resume"))
    out, err = q.communicate(timeout=600)
    assert q.returncode == 0, err
    got, want = _losses(tmp_path / "run"), _losses(tmp_path / "ref")
    assert [r[0] for r in got] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-7), f"step {g[0]}"


@pytest.mark.parametrize("stage", ["stage1", "stage2", "llm"])
def test_torchrun_two_processes_match_one(tmp_path, stage):
    # stage 1 gathers contrastive negatives across ranks: the 2-process loss equals the 1-process
    # loss on the same global batch only if the gather (and its gradient) is right
    one = _write(tmp_path, _cfg(tmp_path / "one", steps=5, stage=stage), "one.json")
    two = _write(tmp_path, _cfg(tmp_path / "two", steps=5, stage=stage), "two.json")
    p = _spawn(train_args(stage, one))
    q = _spawn(train_args(stage, two, ranks=2))
    _, err_p = p.communicate(timeout=600)
    _, err_q = q.communicate(timeout=600)
    assert p.returncode == 0, err_p
    assert q.returncode == 0, err_q
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=2e-4, abs=1e-6), f"step {x[0]}"


def test_fsdp_two_processes_match_one_and_resume(tmp_path):
    # the llm stage sharded with FSDP2 over 2 gloo ranks, stopped after 3 steps and resumed, gives
    # the single-process loss curve; checkpoints hold the gathered full state
    base = dict(stage="llm", steps=5)  # no dropout: its masks depend on the row within the local batch
    one = _write(tmp_path, _cfg(tmp_path / "one", **base), "one.json")
    two = _write(tmp_path, _cfg(tmp_path / "two", strategy="fsdp", **base), "two.json")
    p = _spawn(train_args("llm", one))
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    for extra in (["--stop-after", "3"], ["--resume"]):
        q = _spawn(train_args("llm", two, *extra, ranks=2))
        _, err = q.communicate(timeout=600)
        assert q.returncode == 0, err
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=2e-4, abs=1e-6), f"step {x[0]}"
    s1 = torch.load(latest_checkpoint(tmp_path / "one") / "state.pt", weights_only=True)["model"]
    s2 = torch.load(latest_checkpoint(tmp_path / "two") / "state.pt", weights_only=True)["model"]
    assert s1.keys() == s2.keys() and all(type(v) is torch.Tensor for v in s2.values())
    # Adam turns float-rounding differences of near-zero gradients into lr-sized steps, so compare
    # the bulk: a wrong gather or shard order would move nearly every element
    for k in s1:
        assert s1[k].shape == s2[k].shape, k
        assert ((s1[k] - s2[k]).abs() > 1e-4).float().mean() < 0.05, k
    ev1 = [r for r in read_metrics(tmp_path / "one") if r.get("eval")][-1]
    ev2 = [r for r in read_metrics(tmp_path / "two") if r.get("eval")][-1]
    assert ev1["val_i2t_loss"] == pytest.approx(ev2["val_i2t_loss"], rel=1e-3)
    assert (tmp_path / "two" / "llm" / "seed_llm.json").exists()


def test_stage1_retrieval_beats_chance(tmp_path):
    cfg = TrainConfig.from_dict(
        _cfg(
            tmp_path / "s1",
            stage="stage1",
            steps=60,
            global_batch=32,
            ckpt_every=60,
            data={"n": 1024, "val_n": 64},
            optim={"lr": 3e-4, "warmup": 5, "weight_decay": 0.01},
        )
    )
    last = train(cfg, progress=False)
    assert last["val_i2t_r1"] > 5 * last["val_chance_r1"] and last["val_t2i_r1"] > 5 * last["val_chance_r1"]
    assert (tmp_path / "s1" / "itc_heads.safetensors").exists() and (tmp_path / "s1" / "tokenizer").is_dir()
    # stage II on the stage-I tokenizer, with its ITC heads: most codes in use, and retrieval with codes
    cfg2 = TrainConfig.from_dict(
        _cfg(
            tmp_path / "s2",
            steps=40,
            global_batch=64,
            ckpt_every=40,
            tokenizer=str(tmp_path / "s1" / "tokenizer"),
            data={"n": 1024, "val_n": 64},
            optim={"lr": 1e-3, "warmup": 5},
            stage2={"codebook_init": "kmeans", "restart_dead_every": 10, "itc_heads": str(tmp_path / "s1")},
        )
    )
    ev = train(cfg2, progress=False)
    assert ev["val_codebook_usage"] > 0.5
    # continuous features through the loaded heads are stage I's own (same numbers as its evaluation);
    # retrieval with codes is measured (40 steps are too few for it to beat chance reliably: see docs/training.md)
    for k in ("i2t_r1", "t2i_r1", "i2t_r10"):
        assert ev[f"val_embed_{k}"] == pytest.approx(last[f"val_{k}"])
        hits = ev[f"val_code_{k}"] * 64  # a share of the 64 validation scenes
        assert hits == pytest.approx(round(hits)), (k, ev[f"val_code_{k}"])
    assert ev["val_code_i2t_r10"] >= ev["val_code_i2t_r1"]  # a hit in the top 1 is a hit in the top 10

    # the contrastive loss from codes (stage2.itc_text_weight) is stage I's loss with the image side
    # read from the input features: on the continuous last query it equals stage I's own loss
    from seed_fast.models.preprocess import normalize
    from seed_fast.train.data import make_collate
    from seed_fast.train.sources import make_source
    from seed_fast.train.stage2 import Stage2Task

    cfg3 = TrainConfig.from_dict(
        _cfg(
            tmp_path / "s3",
            steps=4,
            global_batch=64,
            ckpt_every=4,
            tokenizer=str(tmp_path / "s1" / "tokenizer"),
            data={"n": 1024, "val_n": 64},
            optim={"lr": 1e-3, "warmup": 1},
            stage2={"codebook_init": "kmeans", "itc_heads": str(tmp_path / "s1"), "itc_text_weight": 1.0},
        )
    )
    task = Stage2Task(cfg3, torch.device("cpu"))
    ds = make_source(cfg3, "train")
    batch = make_collate(task.image_size)([ds[j] for j in range(24)])
    tok, heads = task.tok, task.itc
    with torch.no_grad():
        x = normalize(batch.pixels, tok.config.image_mean, tok.config.image_std)
        ours = task.module._text_contrastive(tok.causal_embeddings(x)[:, -1], batch.captions)
        heads.train_vit = False
        ref = heads(batch)["loss"]
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    # it reaches the quantizer, and only the stage-II weights train (the text branch stays frozen)
    task.module.w = dataclasses.replace(cfg3.stage2, vq_weight=0.0, cos_weight=0.0, mse_weight=0.0)
    out = task.module(batch)
    assert out["itc_text"] > 0 and out["loss"].item() == pytest.approx(out["itc_text"].item())
    out["loss"].backward()
    assert tok.quantizer.encode_task_layer[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in heads.text.parameters()) and heads.temp.grad is None
    assert not any(k.startswith("_itc_heads") for k in task.module.state_dict())
    ev3 = train(cfg3, progress=False)
    assert (
        "itc_text" in [r for r in read_metrics(tmp_path / "s3") if not r.get("eval")][-1]
        and ev3["val_codebook_usage"] > 0
    )

    # with a queue of earlier captions' text features (stage2.itc_text_queue): the ring fills in order,
    # the image -> text side ranks against it minus the sample's own caption, and a stopped run resumes
    # to the uninterrupted one's losses (the queue is checkpointed)
    s2q = {"codebook_init": "kmeans", "itc_heads": str(tmp_path / "s1"), "itc_text_weight": 1.0, "itc_text_queue": 40}
    cfgq = TrainConfig.from_dict(
        _cfg(
            tmp_path / "q",
            steps=4,
            global_batch=32,
            ckpt_every=2,
            tokenizer=str(tmp_path / "s1" / "tokenizer"),
            data={"n": 1024, "val_n": 32},
            optim={"lr": 1e-3, "warmup": 1},
            stage2=s2q,
        )
    )
    tq = Stage2Task(cfgq, torch.device("cpu"))
    m = tq.module
    m.w = dataclasses.replace(cfgq.stage2, vq_weight=0.0, cos_weight=0.0, mse_weight=0.0)
    b1 = make_collate(tq.image_size)([ds[j] for j in range(24)])
    b2 = make_collate(tq.image_size)([ds[j] for j in range(24, 48)])
    b2.captions[0] = b1.captions[5]  # a queued caption equal to the sample's own is not a negative
    with torch.no_grad():
        first = m(b1)["loss"]
        assert int(m.text_queue_next) == 24 and (m.text_queue_ids[24:] == -1).all()
        t1 = tq.itc.encode_text(b1.captions)
        assert_close(m.text_queue[:24], t1, atol=1e-8, rtol=1e-5, name="queued text features")
        x = normalize(b2.pixels, tq.tok.config.image_mean, tq.tok.config.image_std)
        causal = tq.tok.causal_embeddings(x)
        dec = tq.tok.quantizer.embed(tq.tok.quantizer.lookup(causal))
        img = F.normalize(tq.itc.vision_proj(tq.tok.reconstructor(dec)[:, -1]).float(), dim=-1)
        t2 = tq.itc.encode_text(b2.captions)
        temp = tq.itc.temp.float().clamp(0.001, 0.5)
        want_i2t = []
        for i in range(24):  # one row at a time: the batch's texts, then every queued text but the same caption
            negs = [t1[j] for j in range(24) if b1.captions[j] != b2.captions[i]]
            row = torch.cat([img[i] @ t2.t(), img[i] @ torch.stack(negs).t()]) / temp
            want_i2t.append(F.cross_entropy(row[None], torch.tensor([i]), label_smoothing=0.1))
        want = (
            torch.stack(want_i2t).mean() + F.cross_entropy(t2 @ img.t() / temp, torch.arange(24), label_smoothing=0.1)
        ) / 2
        got = m(b2)["loss"]
        assert got.item() == pytest.approx(want.item(), rel=1e-4) and got.item() != pytest.approx(first.item())
        assert int(m.text_queue_next) == 48 - 40  # wrapped around
        assert_close(m.text_queue[:8], t2[16:], atol=1e-8, rtol=1e-5, name="queue after wrapping")
    assert {"text_queue", "text_queue_ids", "text_queue_next"} <= set(tq.state_dict())
    train(cfgq, progress=False)
    cfgq2 = TrainConfig.from_dict({**cfgq.to_dict(), "out": str(tmp_path / "q2")})
    train(cfgq2, progress=False, stop_after=2)
    train(cfgq2, resume=True, progress=False)
    a, b = _losses(tmp_path / "q"), _losses(tmp_path / "q2")
    assert len(a) == len(b) == 4 and all(x == pytest.approx(y, rel=1e-5) for x, y in zip(a, b))


def test_smoothed_cross_entropy_over_the_valid_classes(seed):
    from seed_fast.train.stage2 import _smoothed_ce

    g = torch.Generator().manual_seed(seed)
    logits, labels = torch.randn(5, 9, generator=g), torch.tensor([0, 3, 8, 2, 2])
    every = torch.ones(5, 9, dtype=torch.bool)
    assert _smoothed_ce(logits, labels, every, 0.1).item() == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6
    )
    valid = every.clone()
    valid[1, [0, 5]] = False  # row 1 sees 7 classes: its label (3) becomes index 2 of them
    keep = [c for c in range(9) if c not in (0, 5)]
    rows = [
        F.cross_entropy(
            logits[i : i + 1, keep if i == 1 else slice(None)],
            torch.tensor([2 if i == 1 else int(labels[i])]),
            label_smoothing=0.1,
        )
        for i in range(5)
    ]
    assert _smoothed_ce(logits, labels, valid, 0.1).item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-6)


def test_retrieval_at_k_matches_a_loop(seed):
    from seed_fast.train.stage1 import retrieval_at_k

    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(17, 8, generator=g), torch.randn(17, 8, generator=g)
    caps = [f"c{i % 13}" for i in range(17)]
    got = retrieval_at_k(img, txt, caps, ks=(1, 3))
    sim = img @ txt.t()
    for k in (1, 3):
        i2t = sum(any(caps[j] == caps[i] for j in sim[i].argsort(descending=True)[:k].tolist()) for i in range(17)) / 17
        t2i = (
            sum(any(caps[j] == caps[i] for j in sim[:, i].argsort(descending=True)[:k].tolist()) for i in range(17))
            / 17
        )
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)


def test_bf16_on_a_cpu_without_bf16_kernels_warns(tmp_path, monkeypatch):
    import warnings

    from seed_fast.train import loop

    for fast in (False, True):
        monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda fast=fast: fast)
        cfg = TrainConfig.from_dict(_cfg(tmp_path / f"run{fast}", steps=2, ckpt_every=2, precision="bf16"))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(cfg, progress=False)
        slow = [w for w in seen if "without oneDNN's bf16 kernels" in str(w.message)]
        assert len(slow) == (0 if fast else 1)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    """A missing or stale `latest`, or a damaged newest checkpoint: --resume takes the newest intact one,
    reproduces the uninterrupted run, logs each step once, and pruning keeps the newest."""
    import shutil

    def cfg(out):
        return TrainConfig.from_dict(_cfg(out, steps=8))

    train(cfg(tmp_path / "full"), progress=False)
    want = _losses(tmp_path / "full")
    train(cfg(tmp_path / "cut"), progress=False, stop_after=6)  # checkpoints step 4 and 6
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step_*")] != []

    def damage(run, how):
        ck = run / "checkpoints"
        if how == "no latest":
            (ck / "latest").unlink()
        elif how == "stale latest":
            (ck / "latest").write_text("step_00000099")
        elif how == "truncated state":
            f = ck / "step_00000006" / "state.pt"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif how == "truncated rng":
            f = ck / "step_00000006" / "rng_rank0.pt"
            f.write_bytes(f.read_bytes()[:100])
        return {"no latest": 6, "stale latest": 6, "truncated state": 4, "truncated rng": 4}[how]

    for how in ("no latest", "stale latest", "truncated state", "truncated rng"):
        run = tmp_path / how.replace(" ", "_")
        shutil.copytree(tmp_path / "cut", run)
        start = damage(run, how)
        capsys.readouterr()
        train(cfg(run), resume=True, progress=False)
        out = capsys.readouterr().out
        assert f"resuming from step_{start:08d}" in out, (how, out)
        if how.startswith("truncated"):  # the damaged newest is named with the file and why it is passed over
            name = "state.pt" if how == "truncated state" else "rng_rank0.pt"
            assert f"skipping step_00000006: {name} does not match its size and checksum" in out, out
        assert _losses(run) == want, how  # each step once, the same values as without the interruption
        steps = [r["step"] for r in read_metrics(run) if not r.get("eval")]
        assert len(steps) == len(set(steps)), how
        assert latest_checkpoint(run).name == "step_00000008"
        kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        assert kept[-1] == "step_00000008" and len(kept) == 2, (how, kept)


def test_pruning_goes_by_step_number_and_keeps_the_newest(tmp_path):
    """Older folders touched later (copied back, restored from a backup) are still the older ones: the
    lowest step numbers go, the checkpoint just written stays, whatever the modification times say."""
    from seed_fast.train.loop import Dist, save_checkpoint

    ck = tmp_path / "checkpoints"
    for step in (2, 4, 100):  # step 100 sorts before step 4 as text without the zero padding
        (ck / f"step_{step}").mkdir(parents=True)
        os.utime(ck / f"step_{step}", (time.time() + 1000 - step, time.time() + 1000 - step))
    save_checkpoint(tmp_path, 101, {"w": torch.ones(1)}, Dist(), keep=2)
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000101", "step_100"]
    save_checkpoint(tmp_path, 7, {"w": torch.ones(1)}, Dist(), keep=1)  # an older step written last
    assert (ck / "step_00000007" / "state.pt").is_file()
    assert (ck / "latest").read_text() == "step_00000007"


_DIE_WHILE_CHECKPOINTING = """
import os, signal, sys
from pathlib import Path
import torch
where, step = sys.argv[1], "step_%08d" % int(sys.argv[2])
save, replace = torch.save, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def torch_save(obj, f, *a, **k):
    if where == "state" and step in str(f) and str(f).endswith("state.pt"):
        save(obj, f, *a, **k)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])  # the write cut off half way
        die()
    return save(obj, f, *a, **k)

def os_replace(src, dst, *a, **k):
    if where == "rename" and Path(dst).name == step:
        die()  # every file written and in the manifest, the folder not yet renamed into place
    if where == "latest" and Path(dst).name == "latest" and step in Path(src).read_text():
        die()  # the checkpoint in place, `latest` still naming the one before
    return replace(src, dst, *a, **k)

torch.save, os.replace = torch_save, os_replace
from seed_fast.train import main
sys.exit(main(["stage2", "--config", sys.argv[3], "--no-progress"] + sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    ref = _write(tmp, _cfg(tmp / "ref", steps=8, ckpt_every=3), "ref.json")
    p = _spawn(train_args("stage2", ref))
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return _losses(tmp / "ref")


@pytest.mark.parametrize("where", ["state", "rename", "latest"])
def test_kill_9_while_writing_a_checkpoint_then_resume(tmp_path, uninterrupted, where):
    """Killed inside the checkpoint write at step 6 (a half-written state file, a complete folder not
    yet renamed into place, or `latest` not yet updated): --resume continues from the newest intact
    checkpoint and gives the uninterrupted loss curve, each step once in metrics.jsonl."""
    cfg = _write(tmp_path, _cfg(tmp_path / "run", steps=8, ckpt_every=3), "run.json")
    p = _spawn(["-c", _DIE_WHILE_CHECKPOINTING, where, "6", str(cfg)])
    _, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, err
    ck = latest_checkpoint(tmp_path / "run")
    assert ck is not None and ck.name == ("step_00000006" if where == "latest" else "step_00000003")
    q = _spawn(train_args("stage2", cfg, "--resume"))
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err
    got = _losses(tmp_path / "run")
    assert [r[0] for r in got] == list(range(1, 9))
    for g, w in zip(got, uninterrupted):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-7), f"step {g[0]}"
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step_00000006" in names and (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() in names


def test_tensorboard_gets_the_logged_scalars_and_a_resume_drops_the_redone_steps(tmp_path):
    """report_to "auto" writes TensorBoard events (when tensorboard is installed) next to
    metrics.jsonl: the same train and eval scalars, and after a resume no step twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig.from_dict(_cfg(tmp_path / "run", steps=6, ckpt_every=2, eval_every=3))
    train(cfg, progress=False, stop_after=5)  # stops after step 5; the newest checkpoint is step 4
    train(cfg, resume=True, progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    rows = [r for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert any(tag.startswith("eval/") for tag in acc.Tags()["scalars"])
    if not _has("wandb"):  # asked for and missing: refused before any work
        with pytest.raises(ConfigError, match="report_to 'wandb' needs the wandb package"):
            TrainConfig.from_dict(_cfg(tmp_path / "w", report_to=["wandb"]))
    off = TrainConfig.from_dict(_cfg(tmp_path / "off", steps=2, report_to=["none"]))
    train(off, progress=False)
    assert not (tmp_path / "off" / "tensorboard").exists() and read_metrics(tmp_path / "off")


def test_wandb_gets_the_logged_scalars_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    """report_to ["wandb"] with W&B's offline mode: every logged scalar goes to wandb's Run.log at
    its step, and a resumed run continues the same W&B run id."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, ids = [], []
    real_log, real_init = wandb.Run.log, wandb.init

    def log(self, data, step=None, **kw):
        calls.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    def init(*a, **kw):
        ids.append(kw.get("id"))
        return real_init(*a, **kw)

    monkeypatch.setattr(wandb.Run, "log", log)
    monkeypatch.setattr(wandb, "init", init)
    cfg = TrainConfig.from_dict(_cfg(tmp_path / "run", steps=4, ckpt_every=2, eval_every=2, report_to=["wandb"]))
    train(cfg, progress=False, stop_after=3)  # the newest checkpoint is step 2
    first = len(calls)
    train(cfg, resume=True, progress=False)
    assert len(ids) == 2 and ids[0] == ids[1] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{ids[0]}"))
    rows = [r for r in read_metrics(tmp_path / "run") if not r.get("eval")]
    train_calls = [(st, d) for st, d in calls[first:] if "train/loss" in d]
    assert [st for st, _ in train_calls] == [3, 4] == [r["step"] for r in rows[2:]]
    assert [d["train/loss"] for _, d in train_calls] == pytest.approx([r["loss"] for r in rows[2:]], rel=1e-6)
    assert any(k.startswith("eval/") for _, d in calls for k in d)


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None
