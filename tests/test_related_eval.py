"""`seed-fast eval --lavit / --flamingo / --vwlmm`: the related tokenizers measured on SEED's held-out scenes."""

import math

import pytest
import torch
import torch.nn.functional as F

from seed_fast import SeedLLM, SeedTokenizer
from seed_fast.cli import main
from seed_fast.default_model.demo import test_scenes as held_out_scenes
from seed_fast.default_model.related_eval import (
    evaluate_flamingo,
    evaluate_lavit,
    evaluate_vwlmm,
    load_lavit_run,
    related_markdown,
)
from seed_fast.synthetic import COLORS, parse_caption
from seed_fast.train import TrainConfig
from seed_fast.train.loop import train


def _caption_rates(preds: list[str], caps: list[str]) -> tuple[float, float]:
    """(every object's color and shape right, caption exact) over the scenes, judged here from each
    prediction's words against the true caption's words."""

    def objects(text):
        f = parse_caption(text)
        return None if f is None else (f["left_color"], f["left_shape"], f["right_color"], f["right_shape"])

    assert len(preds) == len(caps), (preds, caps)
    ok = sum(objects(p) is not None and objects(p) == objects(c) for p, c in zip(preds, caps))
    exact = sum(p.strip().rstrip(".") == c for p, c in zip(preds, caps))
    return ok / len(caps), exact / len(caps)


def _spy_on_captions(monkeypatch) -> list[str]:
    """Every caption the evaluated model writes (both connectors decode their tokens with SeedLLM's
    `_decode_text`), in order."""
    seen, decode = [], SeedLLM._decode_text

    def spy(self, rows):
        out = decode(self, rows)
        seen.extend(out)
        return out

    monkeypatch.setattr(SeedLLM, "_decode_text", spy)
    return seen


def _script_captions(monkeypatch, answers: list[str]) -> None:
    """The model 'writes' these captions, in order, whatever its tokens are."""
    queue = list(answers)

    def scripted(self, rows):
        out = queue[: len(rows)]
        del queue[: len(rows)]
        return out

    monkeypatch.setattr(SeedLLM, "_decode_text", scripted)


def _known_answers(n: int = 4) -> tuple[list[str], float, float]:
    """Captions for the first n held-out scenes with a known score: right (with a period), the left
    color wrong, right in capitals (objects right, not exact), not a caption at all."""
    caps = held_out_scenes(n)[1]
    answers = []
    for i, cap in enumerate(caps):
        words = cap.split()
        if i % 4 == 0:
            answers.append(cap + ".")
        elif i % 4 == 1:
            words[1] = next(c for c in COLORS if c != words[1])
            answers.append(" ".join(words))
        elif i % 4 == 2:
            answers.append(cap.upper())
        else:
            answers.append("nothing to see here")
    return answers, sum(i % 4 in (0, 2) for i in range(n)) / n, sum(i % 4 == 0 for i in range(n)) / n


@pytest.fixture(scope="module")
def lavit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lavit_eval") / "run"
    train(
        TrainConfig.from_dict(
            {
                "stage": "lavit",
                "out": str(out),
                "steps": 3,
                "global_batch": 8,
                "ckpt_every": 3,
                "data": {"n": 24, "val_n": 8, "image_size": 64},
                "optim": {"lr": 2e-3, "warmup": 1},
                "lavit": {"preset": "tiny-lavit"},
            }
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def flamingo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flamingo_eval")
    SeedLLM.from_config("tiny-llama", seed=0).save_pretrained(root / "llm")
    SeedTokenizer.from_config("mini", seed=1).save_pretrained(root / "tok")
    train(
        TrainConfig.from_dict(
            {
                "stage": "flamingo",
                "out": str(root / "run"),
                "steps": 2,
                "global_batch": 8,
                "ckpt_every": 2,
                "data": {"n": 16, "val_n": 8, "image_size": 64},
                "optim": {"lr": 1e-3, "warmup": 1},
                "flamingo": {
                    "lm": str(root / "llm"),
                    "vit_from": str(root / "tok"),
                    "eval_n": 0,
                    "num_latents": 4,
                    "max_new_tokens": 4,
                },
            }
        ),
        progress=False,
    )
    return root / "run"


@pytest.fixture(scope="module")
def vwlmm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vwlmm_eval")
    SeedLLM.from_config("tiny-llama", seed=0).save_pretrained(root / "llm")
    SeedTokenizer.from_config("mini", seed=1).save_pretrained(root / "tok")
    train(
        TrainConfig.from_dict(
            {
                "stage": "vwlmm",
                "out": str(root / "run"),
                "steps": 2,
                "global_batch": 8,
                "ckpt_every": 2,
                "data": {"n": 16, "val_n": 8, "image_size": 64},
                "optim": {"lr": 1e-3, "warmup": 1},
                "vwlmm": {"lm": str(root / "llm"), "vit_from": str(root / "tok"), "eval_n": 0, "max_new_tokens": 4},
            }
        ),
        progress=False,
    )
    return root / "run"


def test_lavit_eval_counts_tokens_and_is_deterministic(lavit_run):
    m = evaluate_lavit(lavit_run, n=12, batch=5, progress=False)
    tok, _ = load_lavit_run(lavit_run)
    codes = tok.encode(held_out_scenes(12)[0])
    lengths = torch.tensor([len(c) for c in codes], dtype=torch.float32)
    assert m["tokens_per_image_mean"] == pytest.approx(float(lengths.mean()))
    assert (
        m["tokens_per_image_min"] == int(lengths.min()) >= 1 and m["tokens_per_image_max"] == int(lengths.max()) <= 64
    )
    assert m["llm_tokens_per_image_mean"] == pytest.approx(m["tokens_per_image_mean"] + 2)
    assert m["kept_share"] == pytest.approx(m["tokens_per_image_mean"] / 64)
    assert m["deterministic"] is True
    # usage and reconstruction, recomputed here on all 12 scenes at once (the eval runs batches of 5)
    assert m["codebook_usage"] == pytest.approx(len({int(c) for cs in codes for c in cs}) / tok.config.codebook_size)
    tok, dec = load_lavit_run(lavit_run)
    with torch.no_grad():
        feats = tok.features(held_out_scenes(12)[0])
        book = F.normalize(tok.quantize.embedding.weight.float(), dim=-1)
        cos = []
        for i, c in enumerate(codes):  # one image at a time: no padding
            vecs = book[c][None]
            recon = dec(vecs, torch.ones(1, len(c), dtype=torch.bool))
            cos.append(F.cosine_similarity(recon.float(), feats[i : i + 1].float(), dim=-1).mean())
    assert m["feature_reconstruction_cos"] == pytest.approx(float(torch.stack(cos).mean()), abs=1e-5)
    md = related_markdown(m)
    assert "codes per image (mean)" in md and "same codes run to run | yes" in md


def test_flamingo_eval_with_and_without_seed_next_to_it(flamingo_run, monkeypatch):
    with monkeypatch.context() as mp:
        preds = _spy_on_captions(mp)
        m = evaluate_flamingo(flamingo_run, n=4, progress=False)
    ok, exact = _caption_rates(preds, held_out_scenes(4)[1])
    assert (m["caption_objects_ok"], m["caption_exact"]) == (pytest.approx(ok), pytest.approx(exact)), preds
    assert m["llm_tokens_per_image_mean"] == 0 and m["resampled_latents_per_image"] == 4
    assert "seed_caption_objects_ok" not in m
    from seed_fast.default_model import load_default

    both = evaluate_flamingo(flamingo_run, n=4, compare=load_default(), progress=False)
    assert both["seed_llm_tokens_per_image"] == 34 and both["caption_objects_ok"] == m["caption_objects_ok"]
    assert both["seed_caption_objects_ok"] >= 0.5  # the shipped SEED stack captions these scenes well
    assert "(SEED, 32 codes)" in related_markdown(both)


def test_vwlmm_eval_captions_and_lays_the_top_words_on_the_patch_grid(vwlmm_run, capsys):
    from seed_fast.models.related.visual_words import load_vwlmm, patch_features

    with pytest.MonkeyPatch.context() as mp:
        preds = _spy_on_captions(mp)
        m = evaluate_vwlmm(vwlmm_run, n=5, batch=2, progress=False)
    ok, exact = _caption_rates(preds, held_out_scenes(5)[1])
    assert (m["caption_objects_ok"], m["caption_exact"]) == (pytest.approx(ok), pytest.approx(exact)), preds
    assert m["llm_tokens_per_image_mean"] == 64 + 2
    assert "seed_caption_objects_ok" not in m
    vw, tok, _ = load_vwlmm(vwlmm_run)
    images, caps, _, _ = held_out_scenes(5)
    from seed_fast.models.preprocess import images_to_tensor

    words = vw.top_words(patch_features(tok, images_to_tensor(images[:2], 64), "vit"))
    assert [w["caption"] for w in m["top_words"]] == caps[:2]
    assert [w["words"] for w in m["top_words"]] == [[p[0] for p in img] for img in words]
    # the word statistics, recomputed here from the words themselves
    feats = patch_features(tok, images_to_tensor(images, 64), "vit")
    with torch.no_grad():
        probs = vw.image_inputs(feats)[1]
    top = probs.argmax(-1)
    assert m["word_distinct"] == len(set(top.flatten().tolist()))
    assert m["word_most_common_share"] == pytest.approx(torch.bincount(top.flatten()).max().item() / top.numel())
    hits = sum(torch.isin(top[i], torch.tensor(vw.llm._text_ids(c))).sum().item() for i, c in enumerate(caps))
    assert m["word_in_caption_share"] == pytest.approx(hits / top.numel())
    ent = -(probs * probs.log()).sum(-1).mean().item()
    assert m["word_entropy_mean"] == pytest.approx(ent, rel=1e-4)
    assert m["word_entropy_uniform"] == pytest.approx(math.log(probs.shape[-1]))
    assert m["word_most_common"][0][1] == pytest.approx(m["word_most_common_share"]) and len(m["word_most_common"]) <= 5
    md = related_markdown(m)
    assert "VW-LMM, continuous" in md and "top visual word of each patch" in md and "most common top visual words" in md
    grid = [
        line
        for line in md.splitlines()
        if line.startswith("| ")
        and "metric" not in line
        and "VW-LMM" not in line
        and "captions" not in line
        and "LLM tokens" not in line
        and "images/s" not in line
        and "word" not in line
    ]
    assert len(grid) == 2 * 8 and all(line.count(" | ") == 7 for line in grid)  # 8 x 8 patches, twice
    assert main(["eval", "--vwlmm", str(vwlmm_run), "--n", "2", "--no-progress", "--no-compare"]) == 0
    assert "vwlmm on 2 held-out scenes" in capsys.readouterr().out


@pytest.mark.parametrize("n", [4, 9])
def test_caption_scores_are_right_on_known_answers(flamingo_run, vwlmm_run, monkeypatch, n):
    """With the captions fixed (right, wrong color, right in capitals, not a caption), the scores are
    known: 1/2 objects right and 1/4 exact on 4 scenes, 5/9 and 3/9 on 9."""
    answers, want_ok, want_exact = _known_answers(n)
    for evaluate, run in ((evaluate_flamingo, flamingo_run), (evaluate_vwlmm, vwlmm_run)):
        _script_captions(monkeypatch, answers)
        m = evaluate(run, n=n, batch=2, progress=False)
        assert m["caption_objects_ok"] == pytest.approx(want_ok), evaluate.__name__
        assert m["caption_exact"] == pytest.approx(want_exact), evaluate.__name__
    _script_captions(monkeypatch, held_out_scenes(n)[1])
    m = evaluate_flamingo(flamingo_run, n=n, progress=False)
    assert (m["caption_objects_ok"], m["caption_exact"]) == (1.0, 1.0)


def test_eval_cli_names_a_run_that_is_not_one(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not a LaVIT stage output"):
        main(["eval", "--lavit", str(tmp_path), "--n", "2"])
    with pytest.raises(SystemExit, match="not a flamingo stage output"):
        main(["eval", "--flamingo", str(tmp_path), "--n", "2", "--no-compare"])
    with pytest.raises(SystemExit, match="not a vwlmm stage output"):
        main(["eval", "--vwlmm", str(tmp_path), "--n", "2", "--no-compare"])


def test_eval_cli_lavit_prints_the_table(lavit_run, capsys, tmp_path):
    assert (
        main(["eval", "--lavit", str(lavit_run), "--n", "4", "--no-progress", "--json", str(tmp_path / "m.json")]) == 0
    )
    out = capsys.readouterr().out
    assert "lavit on 4 held-out scenes" in out and (tmp_path / "m.json").is_file()
