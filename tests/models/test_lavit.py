"""LaVIT's dynamic tokenizer: batched merger vs the per-image loop, selection modes, codes, loading."""

import pytest
import torch

from seed_fast.models.preprocess import InputError
from seed_fast.models.related.lavit import (
    CODE_OFFSET,
    END_IMG_ID,
    IMG_ID,
    LavitFeatureDecoder,
    LavitTokenizer,
    get_lavit_config,
    keep_ratio_loss,
    lavit_token_ids,
    merge_tokens,
    merge_tokens_ref,
    pad_codes,
    reconstruction_loss,
    select_tokens,
)
from seed_fast.ops import codebook_lookup_ref, record_dispatch
from seed_fast.testing import assert_close, assert_equal


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tok():
    return LavitTokenizer.from_config("tiny-lavit", seed=3).eval()


@pytest.mark.parametrize("impl", ["ref", "sdpa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_batched_merger_equals_the_per_image_loop(tok, impl, dtype, tol, seed):
    g = _gen(seed)
    merger = tok.causal_encoder.to(dtype)
    try:
        for b, n in ((1, 1), (3, 7), (6, 64)):
            feats = torch.randn(b, n, tok.config.width, generator=g, dtype=dtype)
            keep = (torch.rand(b, n, generator=g) < torch.rand(b, 1, generator=g)).to(dtype)
            keep[0] = 1.0  # nothing dropped: the uniform cross-attention edge case
            if b > 2:
                keep[1] = 0.0
                keep[1, n - 1] = 1.0  # exactly one kept, the last patch
            keep[(keep.sum(-1) == 0)] = 1.0
            want = merge_tokens_ref(merger, feats, keep)
            got, valid = merge_tokens(merger, feats, keep, impl=impl if dtype != torch.float64 else "ref")
            assert valid.sum(-1).tolist() == [len(w) for w in want]
            for i, w in enumerate(want):
                assert_close(
                    got[i][valid[i]], w, atol=tol * float(w.detach().abs().max()), rtol=0, name=f"b={b} n={n} row {i}"
                )
                assert not got[i][~valid[i]].any(), f"b={b} n={n} row {i}: padding is not zero"
    finally:
        merger.float()


def test_merger_gradients_match_the_loop(tok, seed):
    g = _gen(seed)
    feats = torch.randn(4, 16, tok.config.width, generator=g, requires_grad=True)
    keep = (torch.rand(4, 16, generator=g) < 0.4).float()
    keep[:, 0] = 1.0
    out, valid = merge_tokens(tok.causal_encoder, feats, keep, impl="ref")
    w = torch.randn(out[valid].shape, generator=g)  # a random projection (a sum of squares after LayerNorm is constant)
    (out[valid] * w).sum().backward()
    g_batched = feats.grad.clone()
    feats.grad = None
    (torch.cat(merge_tokens_ref(tok.causal_encoder, feats, keep)) * w).sum().backward()
    assert g_batched.abs().max() > 1e-3
    assert_close(g_batched, feats.grad, atol=1e-5 * float(feats.grad.abs().max()), rtol=1e-4, name="feature grad")


def test_selection_modes(seed):
    g = _gen(seed)
    lp = torch.randn(5, 40, 2, generator=g).log_softmax(-1)
    p_keep = lp[..., 0].exp()
    a, b = select_tokens(lp, "threshold"), select_tokens(lp, "threshold")
    assert_equal(b, a, name="threshold twice")
    assert_equal(a.bool(), p_keep >= 0.5, name="threshold")  # (random logits: every row keeps some patch)
    top = select_tokens(lp, "topk", k=7)
    assert (top.sum(-1) == 7).all()
    for row, p in zip(top.bool(), p_keep):  # every kept patch is at least as likely as every dropped one
        assert p[row].min() >= p[~row].max()
    s1 = select_tokens(lp, "gumbel", generator=torch.Generator().manual_seed(seed + 1))
    s2 = select_tokens(lp, "gumbel", generator=torch.Generator().manual_seed(seed + 1))
    s3 = select_tokens(lp, "gumbel", generator=torch.Generator().manual_seed(seed + 2))
    assert_equal(s2, s1, name="gumbel, the same generator seed")
    assert not torch.equal(s1, s3)
    # every image keeps at least its most likely patch, whatever the mode
    never = torch.stack([torch.full((40,), -20.0), torch.zeros(40)], -1).log_softmax(-1)[None].repeat(3, 1, 1)
    never[1, 13, 0] = -5.0
    for mode in ("threshold", "gumbel"):
        k = select_tokens(never, mode)
        assert (k.sum(-1) >= 1).all()
        assert k[1, 13] == 1.0
    # the gumbel sample is differentiable (straight-through)
    logits = torch.randn(2, 10, 2, requires_grad=True)
    keep = select_tokens(logits.log_softmax(-1), "gumbel", generator=torch.Generator().manual_seed(seed + 3))
    keep_ratio_loss(keep, 1 / 3).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for bad, match in (
        ({"mode": "nope"}, "unknown selection"),
        ({"mode": "topk"}, "topk"),
        ({"mode": "threshold", "threshold": 2.0}, "threshold"),
        ({"mode": "gumbel", "tau": 0.0}, "tau"),
    ):
        with pytest.raises(InputError, match=match):
            select_tokens(lp, **bad)
    with pytest.raises(InputError, match="no token"):
        merge_tokens(LavitTokenizer.from_config().causal_encoder, torch.randn(2, 4, 64), torch.zeros(2, 4))


def test_encode_gives_variable_length_cosine_codes(tok, seed):
    g = _gen(seed)
    x = torch.rand(3, 3, 64, 64, generator=g)
    codes = tok.encode(x, mode="topk", k=5)
    assert [len(c) for c in codes] == [5, 5, 5]
    for i, (a, b) in enumerate(zip(tok.encode(x), tok.encode(x))):  # the threshold mode is deterministic
        assert_equal(b, a, name=f"image {i}, encoded twice")
    # the codes are the cosine-nearest codebook rows of the merged tokens
    feats = tok.features(x)
    keep = tok.select(feats, "topk", k=5)
    merged, valid = tok.merged(feats, keep)
    z = tok.encode_task_layer(merged)[valid]
    ref, _ = codebook_lookup_ref(z, tok.quantize.embedding.weight, metric="cosine")
    assert_equal(torch.cat(codes), ref, name="codes vs cosine-nearest rows")
    with record_dispatch() as log:
        tok.encode(x)
    assert {op for op, _ in log} >= {"codebook_lookup", "qformer_attention"}
    ids = lavit_token_ids(codes)
    assert ids[0][0] == IMG_ID and ids[0][-1] == END_IMG_ID and ids[0][1] == int(codes[0][0]) + CODE_OFFSET
    padded, mask = pad_codes([torch.tensor([3, 4]), torch.tensor([5])])
    assert padded.tolist() == [[3, 4], [5, -1]] and mask.tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tokenizer_selects_in_fp32_and_encodes(dtype, seed):
    g = _gen(seed)
    half = LavitTokenizer.from_config("tiny-lavit", seed=5).eval().to(dtype)
    # the selector runs in fp32 on the (rounded) half weights: the same log-probs as an fp32 copy of them
    fp32 = LavitTokenizer.from_config("tiny-lavit", seed=5).eval()
    fp32.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    feats = torch.randn(2, 9, half.config.width, generator=g)
    with torch.no_grad():
        got = half.token_predictor(feats.to(dtype))
        want = fp32.token_predictor(feats.to(dtype).float())
    assert got.dtype == torch.float32
    assert_equal(got, want, name="selector log-probs")
    x = torch.rand(3, 3, 64, 64, generator=g)
    codes = half.encode(x, mode="topk", k=4)
    assert [len(c) for c in codes] == [4, 4, 4] and all(c.dtype == torch.int64 for c in codes)
    n = half.quantize.embedding.weight.shape[0]
    assert all(int(c.min()) >= 0 and int(c.max()) < n for c in codes)
    for i, (a, b) in enumerate(zip(half.encode(x), half.encode(x))):
        assert_equal(b, a, name=f"image {i}, encoded twice")


def test_feature_decoder_and_losses(tok):
    cfg = tok.config
    dec = LavitFeatureDecoder(cfg)
    codes, valid = pad_codes([torch.tensor([1, 2, 3]), torch.tensor([7])])
    vec = tok.quantize.embedding.weight[codes.clamp_min(0)]
    out = dec(vec, valid)
    assert out.shape == (2, cfg.num_patches, cfg.width)
    # padding does not leak: changing a padded code vector leaves the output unchanged
    vec2 = vec.clone()
    vec2[1, 1:] = 123.0
    assert_close(dec(vec2, valid), out, atol=1e-6, rtol=1e-5, name="output with padding changed")
    target = torch.randn_like(out)
    assert abs(float(reconstruction_loss(target, target))) < 1e-6
    assert float(reconstruction_loss(-target, target)) == pytest.approx(2.0, abs=1e-5)


def test_keep_ratio_moves_toward_its_target_in_a_short_training_run(seed):
    from seed_fast.synthetic import sample_images

    # fixed initial weights, whose keep ratio starts far from the target; the batches and draws follow the seed
    torch.manual_seed(0)
    tok = LavitTokenizer.from_config("tiny-lavit", seed=0)
    dec = LavitFeatureDecoder(tok.config)
    params = (
        list(tok.token_predictor.parameters())
        + list(tok.causal_encoder.parameters())
        + list(tok.encode_task_layer.parameters())
        + list(dec.parameters())
    )
    opt = torch.optim.AdamW(params, lr=3e-3)
    images, _ = sample_images(64, seed=1, size=64)
    with torch.no_grad():
        feats_all = tok.features(images)
    g = torch.Generator().manual_seed(seed)
    ratios = []
    for step in range(40):
        feats = feats_all[torch.randint(0, 64, (16,), generator=g)]
        keep = tok.select(feats, "gumbel", generator=g)
        merged, valid = tok.merged(feats, keep)
        z = tok.encode_task_layer(merged)
        recon = dec(torch.nn.functional.normalize(z, dim=-1), valid)
        loss = reconstruction_loss(recon, feats) + keep_ratio_loss(keep, tok.config.keep_ratio, tok.config.keep_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(float(keep.detach().mean()))
    start, end = sum(ratios[:5]) / 5, sum(ratios[-5:]) / 5
    target = tok.config.keep_ratio
    assert abs(end - target) < abs(start - target) - 0.05, (start, end)


def test_official_layout_loads_by_key_name(seed):
    full = get_lavit_config("lavit")
    assert full.width == 1408 and full.num_patches == 256 and full.codebook_size == 16384 and full.code_dim == 32
    tok = LavitTokenizer.from_config("tiny-lavit", seed=1)
    keys = {k for k in tok.state_dict() if not k.startswith("encoder.")}
    # the released tokenizer_encoder.bin layout (facts: key names of jy0205/LaVIT's DynamicVisualTokenizer)
    expected = {
        "quantize.embedding.weight",
        "encode_task_layer.0.weight",
        "encode_task_layer.0.bias",
        "encode_task_layer.2.weight",
        "encode_task_layer.2.bias",
        "vit_proj.weight",
        "vit_proj.bias",
        "causal_encoder.ln_vision.weight",
        "causal_encoder.ln_vision.bias",
        "causal_encoder.norm.weight",
        "causal_encoder.norm.bias",
    }
    for p in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4"):
        expected |= {f"token_predictor.{p}.weight", f"token_predictor.{p}.bias"}
    for i in range(tok.config.merger_depth):
        for p in (
            "norm0",
            "token_causal_attn.qkv",
            "token_causal_attn.proj",
            "norm1",
            "token_cross_attn.query",
            "token_cross_attn.key",
            "token_cross_attn.value",
            "token_cross_attn.proj",
            "norm2",
            "mlp.fc1",
            "mlp.fc2",
        ):
            expected |= {f"causal_encoder.blocks.{i}.{p}.weight", f"causal_encoder.blocks.{i}.{p}.bias"}
    assert keys == expected
    # an official-format dict built from that key list loads and is used
    g = _gen(seed)
    official = {
        k: torch.randn(v.shape, generator=g) for k, v in tok.state_dict().items() if not k.startswith("encoder.")
    }
    other = LavitTokenizer.from_config("tiny-lavit", seed=2)
    missing, unexpected = other.load_official(official)
    assert unexpected == [] and all(m.startswith("encoder.") for m in missing)
    assert_equal(other.quantize.embedding.weight, official["quantize.embedding.weight"], name="codebook")
    from seed_fast.models.checkpoint import CheckpointError

    bad = dict(official, **{"vit_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        other.load_official(bad)
    with pytest.raises(CheckpointError, match="missing keys"):
        other.load_official(official, strict=True)
