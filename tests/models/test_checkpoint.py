"""Loading the released layout, our own format, and refusing bad files."""

import json
import os
import random

import pytest
import torch

from seed_fast import CheckpointError, SeedTokenizer, get_config
from seed_fast.models.checkpoint import load_state_dict_file, ours_to_official
from seed_fast.testing import assert_equal


def _spec_official_shapes():
    """The released key names and shapes, written from SEED_SPEC.md section 2 (not from our code)."""
    H, F, V = 768, 3072, 1408
    quant = {"query_tokens": (1, 32, H), "ln_vision.weight": (V,), "ln_vision.bias": (V,)}
    quant.update({f"Qformer.bert.embeddings.LayerNorm.{p}": (H,) for p in ("weight", "bias")})
    for i in range(12):
        pre = f"Qformer.bert.encoder.layer.{i}."
        kinds = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for kind in kinds:
            kv_in = V if kind == "crossattention" else H
            quant[pre + f"{kind}.self.query.weight"] = (H, H)
            quant[pre + f"{kind}.self.query.bias"] = (H,)
            for kv in ("key", "value"):
                quant[pre + f"{kind}.self.{kv}.weight"] = (H, kv_in)
                quant[pre + f"{kind}.self.{kv}.bias"] = (H,)
            quant[pre + f"{kind}.output.dense.weight"] = (H, H)
            quant[pre + f"{kind}.output.dense.bias"] = (H,)
            quant[pre + f"{kind}.output.LayerNorm.weight"] = (H,)
            quant[pre + f"{kind}.output.LayerNorm.bias"] = (H,)
        quant[pre + "intermediate_query.dense.weight"] = (F, H)
        quant[pre + "intermediate_query.dense.bias"] = (F,)
        quant[pre + "output_query.dense.weight"] = (H, F)
        quant[pre + "output_query.dense.bias"] = (H,)
        quant[pre + "output_query.LayerNorm.weight"] = (H,)
        quant[pre + "output_query.LayerNorm.bias"] = (H,)
    quant["quantize.embedding.weight"] = (8192, 32)
    quant.update({"encode_task_layer.0.weight": (H, H), "encode_task_layer.0.bias": (H,)})
    quant.update({"encode_task_layer.2.weight": (32, H), "encode_task_layer.2.bias": (32,)})
    quant.update({"decode_task_layer.0.weight": (32, 32), "decode_task_layer.0.bias": (32,)})
    quant.update({"decode_task_layer.2.weight": (H, 32), "decode_task_layer.2.bias": (H,)})
    for pos, blocks in (("pos_embed", "blocks"), ("pos_embed_image", "blocks_image")):
        quant[pos] = (1, 32, H)
        for i in range(4):
            b = f"{blocks}.{i}."
            quant.update(
                {b + "norm1.weight": (H,), b + "norm1.bias": (H,), b + "norm2.weight": (H,), b + "norm2.bias": (H,)}
            )
            quant.update({b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,)})
            quant.update({b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,)})
            quant.update({b + "mlp.fc1.weight": (4 * H, H), b + "mlp.fc1.bias": (4 * H,)})
            quant.update({b + "mlp.fc2.weight": (H, 4 * H), b + "mlp.fc2.bias": (H,)})
    quant.update({"image_down.0.weight": (256, H), "image_down.2.weight": (128, 256), "image_down.4.weight": (32, 128)})
    quant.update({"distill_image_proj.weight": (1024, 1024), "distill_image_proj.bias": (1024,)})

    vit = {"cls_token": (1, 1, V), "pos_embed": (1, 257, V), "patch_embed.proj.weight": (V, 3, 14, 14)}
    vit["patch_embed.proj.bias"] = (V,)
    for i in range(39):
        b = f"blocks.{i}."
        vit.update({b + "norm1.weight": (V,), b + "norm1.bias": (V,), b + "norm2.weight": (V,), b + "norm2.bias": (V,)})
        vit.update({b + "attn.qkv.weight": (3 * V, V), b + "attn.q_bias": (V,), b + "attn.v_bias": (V,)})
        vit.update({b + "attn.proj.weight": (V, V), b + "attn.proj.bias": (V,)})
        vit.update({b + "mlp.fc1.weight": (6144, V), b + "mlp.fc1.bias": (6144,)})
        vit.update({b + "mlp.fc2.weight": (V, 6144), b + "mlp.fc2.bias": (V,)})
    return quant, vit


def test_full_size_layout_matches_the_released_key_names():
    with torch.device("meta"):
        tok = SeedTokenizer("seed-tokenizer-2")
    quant, vit = ours_to_official(tok.state_dict())
    want_q, want_v = _spec_official_shapes()
    assert sorted(set(want_q) - set(quant)) == [] and sorted(set(quant) - set(want_q)) == []
    assert sorted(set(want_v) - set(vit)) == [] and sorted(set(vit) - set(want_v)) == []
    assert {k: tuple(v.shape) for k, v in quant.items()} == want_q
    assert {k: tuple(v.shape) for k, v in vit.items()} == want_v


def _official_files(tok, tmp_path, extras=True):
    quant, vit = tok.official_state_dicts()
    if extras:  # what the released files carry besides the inference weights
        h = tok.config.qformer.hidden
        quant["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
        quant["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(tok.config.qformer.ffn, h)
        quant["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(30523, 8)[:, :8]
        d = tok.config.vision.depth
        vit[f"blocks.{d}.norm1.weight"] = torch.ones(tok.config.vision.width)  # EVA's dropped last block
    qp, vp = tmp_path / "seed_quantizer.pt", tmp_path / "eva_vit_g.pth"
    torch.save(quant, qp)
    torch.save(vit, vp)
    return qp, vp


def test_official_round_trip_tiny(tiny_tok, images, tmp_path):
    qp, vp = _official_files(tiny_tok, tmp_path)
    tok = SeedTokenizer.from_official(qp, vp, config="tiny")
    r = tok.load_report
    assert r.missing == [] and r.unexpected == [] and r.mismatched == []
    assert "Qformer.bert.embeddings.position_ids" in r.ignored
    assert any("blocks.2.norm1" in k for k in r.ignored)
    for k, v in tiny_tok.state_dict().items():
        assert_equal(tok.state_dict()[k], v, name=k)
    codes = tiny_tok.encode(images)
    assert_equal(tok.encode(images), codes, name="codes")
    assert_equal(tok.encode_embeddings(images), tiny_tok.encode_embeddings(images), name="embeddings")
    assert_equal(tok.decode(codes), tiny_tok.decode(codes), name="decoded")


def test_official_safetensors_and_without_reconstruction_head(tiny_tok, images, tmp_path):
    from safetensors.torch import save_file

    quant, vit = tiny_tok.official_state_dicts()
    quant = {k: v for k, v in quant.items() if not k.startswith(("pos_embed", "blocks.")) or "image" in k}
    save_file({k: v.contiguous() for k, v in quant.items()}, str(tmp_path / "q.safetensors"))
    save_file({k: v.contiguous() for k, v in vit.items()}, str(tmp_path / "v.safetensors"))
    tok = SeedTokenizer.from_official(tmp_path / "q.safetensors", tmp_path / "v.safetensors", config="tiny")
    assert tok.load_report.missing == []
    assert_equal(tok.encode(images), tiny_tok.encode(images), name="codes")


def test_official_strictness(tiny_tok, tmp_path):
    quant, vit = tiny_tok.official_state_dicts()
    del quant["decode_task_layer.2.bias"]
    quant["some_new_head.weight"] = torch.ones(3)
    torch.save(quant, tmp_path / "q.pt")
    torch.save(vit, tmp_path / "v.pt")
    with pytest.raises(CheckpointError) as e:
        SeedTokenizer.from_official(tmp_path / "q.pt", tmp_path / "v.pt", config="tiny")
    assert "quantizer.decode_task_layer.2.bias" in str(e.value) and "some_new_head.weight" in str(e.value)
    with pytest.warns(UserWarning, match="missing"):
        tok = SeedTokenizer.from_official(tmp_path / "q.pt", tmp_path / "v.pt", config="tiny", strict=False)
    assert tok.load_report.missing == ["quantizer.decode_task_layer.2.bias"]
    assert tok.load_report.unexpected == ["some_new_head.weight"]
    # a ViT file for another width is a shape mismatch, named
    with pytest.raises(CheckpointError, match=r"vision\.pos_embed: file \(1, 257, 96\) vs model"):
        cfg = get_config("tiny")
        cfg.vision.width, cfg.vision.heads = 128, 4
        torch.save(tiny_tok.official_state_dicts()[0], tmp_path / "q2.pt")
        SeedTokenizer.from_official(tmp_path / "q2.pt", tmp_path / "v.pt", config=cfg)
    # without the ViT file, the ViT is missing
    with pytest.raises(CheckpointError, match="vision.cls_token"):
        SeedTokenizer.from_official(tmp_path / "q2.pt", None, config="tiny")


def test_save_and_from_pretrained(tiny_tok, images, tmp_path):
    tiny_tok.save_pretrained(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["config"]["name"] == "tiny" and meta["format_version"] == 1
    tok = SeedTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.config == tiny_tok.config
    assert_equal(tok.encode(images), tiny_tok.encode(images), name="codes")
    with pytest.raises(FileNotFoundError, match="missing"):
        os.remove(tmp_path / "tok" / "model.safetensors")
        SeedTokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        SeedTokenizer.from_pretrained(tmp_path / "nothing")


class NotAStateDict:
    def __init__(self):
        self.weights = torch.ones(2)


@pytest.mark.parametrize(
    "case,match",
    [
        ("object", "not a plain state dict"),
        ("list", "holds a list, not a state dict"),
        ("mixed", "entries that are not tensors: epoch"),
        ("empty_dict", "empty state dict"),
        ("garbage", "corrupt or truncated|could not be read"),
        ("truncated", "corrupt or truncated"),
        ("zero_bytes", "empty \\(0 bytes\\)"),
        ("bad_safetensors", "not a readable safetensors file"),
    ],
)
def test_bad_checkpoint_files(tmp_path, case, match, seed):
    path = tmp_path / ("x.safetensors" if case == "bad_safetensors" else "x.pt")
    if case == "object":
        torch.save(NotAStateDict(), path)
    elif case == "list":
        torch.save([torch.ones(2)], path)
    elif case == "mixed":
        torch.save({"w": torch.ones(2), "epoch": 3}, path)
    elif case == "empty_dict":
        torch.save({}, path)
    elif case == "garbage":
        path.write_bytes(random.Random(seed).randbytes(4096))
    elif case == "truncated":
        torch.save({f"w{i}": torch.randn(256) for i in range(20)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "bad_safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=match):
        load_state_dict_file(path)
    # and through the public entry point
    with pytest.raises(CheckpointError):
        SeedTokenizer.from_official(path, None, config="tiny")


def test_lavis_wrapper_is_unwrapped(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "x.pt")
    assert list(load_state_dict_file(tmp_path / "x.pt")) == ["w"]


class _RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_malicious_pickle_is_refused_as_such(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.randn(3), "x": _RunsACommand(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(
        CheckpointError, match=r"pickled objects other than tensors \(it names (posix|os|nt)\.system\)"
    ) as e:
        load_state_dict_file(path)
    assert "weights_only" not in str(e.value) and "corrupt" not in str(e.value)
    assert not marker.exists()


# torch 2.13's refusal, word for word: a hint to pass weights_only=False, then the blocked global
_TORCH_2_13_REFUSAL = (
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
    "source.\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n"
)


def test_a_malicious_pickle_is_refused_whatever_torch_says(tmp_path, monkeypatch, capsys):
    """The verdict comes from the file, not from torch's wording: with torch 2.13's message (and with
    a message that says nothing) the file is called unsafe, never corrupt, and no hint to use
    weights_only=False is passed on; the command line says it in one line."""
    import pickle

    from seed_fast.cli import main

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.randn(3), "x": _RunsACommand(marker)}, path)
    for said in (_TORCH_2_13_REFUSAL, ""):

        def refuse(*args, said=said, **kwargs):
            raise pickle.UnpicklingError(said)

        monkeypatch.setattr(torch, "load", refuse)
        with pytest.raises(CheckpointError, match=r"pickled objects other than tensors") as e:
            load_state_dict_file(path)
        assert "weights_only" not in str(e.value) and "corrupt" not in str(e.value)
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        main(["tokenize", str(tmp_path / "x.png"), "--official", str(path), str(path), "--config", "tiny"])
    assert "refusing to unpickle it" in str(e.value.code) and "\n" not in str(e.value.code)
    assert "weights_only" not in str(e.value.code)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version="2"), r"format_version must be an integer, got '2'"),
        (lambda m: m["config"]["qformer"].update(heads=0), r"qformer.heads must be >= 1, got 0"),
        (lambda m: m["config"]["qformer"].update(num_queries=-4), r"qformer.num_queries must be >= 1, got -4"),
        (lambda m: m["config"]["vision"].update(width="96"), r"vision.width must be an integer, got '96'"),
        (lambda m: m["config"]["quantizer"].update(beta=None), r"quantizer.beta must be a finite number"),
        (lambda m: m["config"]["detokenizer"].update(down_dims=[32, 0]), r"detokenizer.down_dims must be a list"),
        (lambda m: m["config"].update(qformer=[1, 2]), r"qformer must be an object of fields"),
        (lambda m: m["config"]["qformer"].update(causal="yes"), r"qformer.causal must be true, false or null"),
    ],
)
def test_a_config_with_wrong_types_or_ranges_is_refused(tiny_tok, tmp_path, edit, match):
    import json

    tiny_tok.save_pretrained(tmp_path / "t")
    cfg = tmp_path / "t" / "config.json"
    meta = json.loads(cfg.read_text())
    edit(meta)
    cfg.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match):
        SeedTokenizer.from_pretrained(tmp_path / "t")


def test_weights_of_the_wrong_kind_or_not_finite_are_refused(tiny_tok, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_tok.save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "model.safetensors"
    good = load_file(str(weights))
    key = next(k for k, v in good.items() if v.is_floating_point() and v.dim() == 2)
    save_file({**good, key: good[key].round().to(torch.int64)}, str(weights))
    with pytest.raises(CheckpointError, match=rf"{key}: file torch.int64 vs model torch.float32"):
        SeedTokenizer.from_pretrained(tmp_path / "t")
    bad = good[key].clone()
    bad[0, 0] = float("nan")
    save_file({**good, key: bad}, str(weights))
    with pytest.raises(CheckpointError, match=rf"NaN or inf values: {key}"):
        SeedTokenizer.from_pretrained(tmp_path / "t")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        SeedTokenizer.from_pretrained(tmp_path / "t", strict=False)
    save_file(good, str(weights))
    assert SeedTokenizer.from_pretrained(tmp_path / "t").load_report.ok()
