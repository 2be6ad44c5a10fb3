"""VW-LMM's visual words through the training launcher: the batched loss equals a per-sample
written-out one, only the connector learns, PIF feeds convex combinations of text embeddings, the
KV-cached greedy captions equal a cache-free loop, runs resume exactly, exports reload, and bad
configs fail before any work."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from seed_fast import SeedLLM, SeedTokenizer
from seed_fast.models.related.visual_words import VisualWordsLM, load_vwlmm, visual_word_kl_ref
from seed_fast.testing import assert_close, assert_equal
from seed_fast.train import TrainConfig
from seed_fast.train.config import ConfigError
from seed_fast.train.loop import train


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vwlmm_parts")
    SeedLLM.from_config("tiny-llama", seed=0, template="seed-opt").save_pretrained(root / "llm")
    SeedTokenizer.from_config("mini", seed=1).save_pretrained(root / "tok")
    return root


@pytest.fixture(scope="module")
def llm(parts):
    from seed_fast.models.related.connector import load_frozen_lm

    return load_frozen_lm(str(parts / "llm"))


def _cfg(out, parts, **vc):
    return TrainConfig.from_dict(
        {
            "stage": "vwlmm",
            "out": str(out),
            "steps": 4,
            "global_batch": 8,
            "ckpt_every": 2,
            "eval_every": 4,
            "data": {"n": 48, "val_n": 8, "image_size": 64},
            "optim": {"lr": 3e-3, "warmup": 1},
            "vwlmm": {"lm": str(parts / "llm"), "vit_from": str(parts / "tok"), "eval_n": 4, "max_new_tokens": 6, **vc},
        }
    )


def _vw(llm, variant="vw", seed=0, media_dim=12):
    torch.manual_seed(seed)
    return VisualWordsLM(llm, media_dim, variant=variant)


@pytest.mark.parametrize("variant", ["vw", "pif"])
def test_batched_loss_equals_a_per_sample_written_out_loss(llm, variant, seed):
    vw = _vw(llm, variant)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 5, 12, generator=g)
    captions = ["one red circle left of a blue square", "two green triangles", "a yellow square"]
    ce, n, kl = vw.losses(feats, captions)
    emb = llm.model.get_input_embeddings()
    ce_ref, n_ref, kl_ref = 0.0, 0, 0.0
    with torch.no_grad():
        for i, cap in enumerate(captions):  # one unpadded sequence at a time, every piece written out
            answer = llm._text_ids(cap) + [vw.eos]
            x = vw.projector(feats[i])
            words = torch.softmax(vw.head.vm_head(x).double(), -1)
            if variant == "pif":
                x = (words @ emb.weight[: llm.vocab.base].double()).float()
            ids_after = vw.suffix + answer
            seq = torch.cat([emb(torch.tensor(vw.prefix)), x, emb(torch.tensor(ids_after))])[None]
            logits = llm.model(inputs_embeds=seq).logits[0].double()
            start = len(vw.prefix) + 5 + len(vw.suffix)  # the first answer token's position
            ce_ref += float(F.cross_entropy(logits[start - 1 : -1], torch.tensor(answer), reduction="sum"))
            n_ref += len(answer)
            pos = torch.arange(len(vw.prefix), len(vw.prefix) + 4)  # patch t predicts patch t + 1's word
            target = torch.zeros(1, seq.shape[1], llm.vocab.base, dtype=torch.float64)
            target[0, pos] = words[1:]
            mask = torch.zeros(1, seq.shape[1], dtype=torch.bool)
            mask[0, pos] = True
            kl_ref += float(visual_word_kl_ref(logits[None], target, mask)) * 4
    assert int(n) == n_ref
    assert float(ce) == pytest.approx(ce_ref, rel=1e-4)
    assert float(kl) == pytest.approx(kl_ref / 12, rel=1e-4)
    # the visual words are not detached (as upstream): the KL alone reaches vm_head and the projector
    vw.zero_grad()
    kl.backward()
    assert vw.head.vm_head.weight.grad.abs().sum() > 0 and vw.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.model.parameters())


def test_pif_feeds_convex_combinations_of_text_embeddings(llm, seed):
    vw = _vw(llm, "pif")
    feats = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(seed))
    x, words = vw.image_inputs(feats)
    assert_close(words.sum(-1), torch.ones(2, 4), atol=1e-5, rtol=1e-5, name="word distribution sums")
    assert bool((words >= 0).all())
    table = llm.model.get_input_embeddings().weight[: llm.vocab.base]
    assert_close(x, words @ table, atol=1e-5, rtol=1e-5, name="pseudo image features")
    plain, _ = _vw(llm, "vw").image_inputs(feats)
    assert plain.shape == x.shape and not torch.allclose(plain, x)


def test_cached_greedy_captions_equal_a_full_forward_loop(llm, seed):
    vw = _vw(llm, seed=4).eval()
    feats = torch.randn(3, 6, 12, generator=torch.Generator().manual_seed(seed))
    got = vw.captions(feats, max_new_tokens=5)
    embeds, mask, _, _, _ = vw.sequences(feats)
    emb = llm.model.get_input_embeddings()
    rows = [[] for _ in range(3)]
    with torch.no_grad():
        for i in range(3):
            seq = embeds[i : i + 1]
            for _ in range(5):
                nxt = int(llm.model(inputs_embeds=seq).logits[0, -1].argmax())
                rows[i].append(nxt)
                if nxt == vw.eos:
                    break
                seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], 1)
    assert got == llm._decode_text(rows)
    assert mask.shape == embeds.shape[:2] and bool(mask.all())  # caption prompts share one length: no padding


@pytest.mark.parametrize("media,variant", [("vit", "vw"), ("qformer", "pif")])
def test_vwlmm_stage_trains_only_the_connector_and_exports(
    tmp_path, parts, media, variant, refuses_misfit_weights, seed
):
    before = load_file(str(parts / "llm" / "llm" / "model.safetensors"))
    m = train(_cfg(tmp_path / "run", parts, media=media, variant=variant), progress=False)
    for key in ("val_caption_loss", "val_kl", "val_caption_exact", "val_caption_objects_ok"):
        assert key in m
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] >= 0 and r["caption_loss"] > 0 for r in rows if "kl" in r)
    after = load_file(str(parts / "llm" / "llm" / "model.safetensors"))
    for k in before:
        assert_equal(before[k], after[k], name=k)
    vw, tok, meta = load_vwlmm(tmp_path / "run")
    assert (meta["media"], meta["variant"], meta["lm"]) == (media, variant, str(parts / "llm"))
    saved = load_file(str(tmp_path / "run" / "vwlmm" / "weights.safetensors"))
    assert set(saved) == set(vw.state_dict())
    for k, v in vw.state_dict().items():
        assert_equal(v, saved[k], name=k)
    assert all(k.startswith(("projector.", "head.")) for k in saved)  # the frozen LM is not in the file
    from seed_fast.models.related.visual_words import patch_features

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    feats = patch_features(tok, pixels, media)
    assert feats.shape[1] == (64 if media == "vit" else 32)  # the ViT's 8 x 8 patches without the class token
    words = vw.top_words(feats, k=2)
    assert len(words) == 2 and len(words[0]) == feats.shape[1] and len(words[0][0]) == 2
    # a weights file that does not fit its config is refused, naming the keys
    refuses_misfit_weights(tmp_path / "run" / "vwlmm" / "weights.safetensors", lambda: load_vwlmm(tmp_path / "run"))


def test_vwlmm_resume_matches_an_uninterrupted_run(tmp_path, parts):
    full = train(_cfg(tmp_path / "a", parts), progress=False)
    cfg = _cfg(tmp_path / "b", parts)
    train(cfg, progress=False, stop_after=2)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["val_caption_loss"] == pytest.approx(full["val_caption_loss"], rel=1e-4)
    a = load_file(str(tmp_path / "a" / "vwlmm" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "vwlmm" / "weights.safetensors"))
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, name=k)


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"media": "pixels"}, "vwlmm.media"),
        ({"variant": "soft"}, "vwlmm.variant"),
        ({"projector": "qformer"}, "vwlmm.projector"),
        ({"kl_weight": -1}, "kl_weight"),
        ({"prompt": "no image here"}, "vwlmm.prompt"),
        ({"lm": "/no/such"}, "vwlmm.lm"),
        ({"vit_from": None}, "vwlmm.vit_from must be set"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_vwlmm_configs_fail_before_any_work(tmp_path, parts, change, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path / "x", parts, **change)
    assert not (tmp_path / "x").exists()


def test_load_vwlmm_names_what_is_missing(tmp_path):
    (tmp_path / "vwlmm").mkdir()
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        load_vwlmm(tmp_path)
