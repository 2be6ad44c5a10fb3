"""The reference SEED tokenizer: API, causality, batch invariance, dtypes, transformers parity."""

import numpy as np
import pytest
import torch
from PIL import Image

from seed_fast import SeedTokenizer, TokenizerConfig, get_config
from seed_fast.models.checkpoint import ours_to_hf_qformer
from seed_fast.ops import codebook_lookup_ref
from seed_fast.testing import assert_close, assert_equal


def test_api_shapes_and_ranges(tiny_tok, images):
    codes = tiny_tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, 32)
    assert int(codes.min()) >= 0 and int(codes.max()) < tiny_tok.codebook_size
    emb = tiny_tok.encode_embeddings(images)
    assert emb.shape == (3, 32, tiny_tok.config.qformer.hidden)
    gen = tiny_tok.decode(codes)
    assert gen.shape == (3, tiny_tok.config.detokenizer.out_dim)
    # codes are the nearest codes of the embeddings
    z = tiny_tok.quantizer.encode_task_layer(emb)
    assert_equal(codes, codebook_lookup_ref(z, tiny_tok.quantizer.codebook.weight)[0], name="codes")


def test_codes_depend_on_the_image(tiny_tok, images):
    codes = tiny_tok.encode(images)
    assert not torch.equal(codes[0], codes[1]) or not torch.equal(codes[1], codes[2])


def test_input_kinds_agree(tiny_tok, seed):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=g)
    pil = [Image.fromarray(u8[i].permute(1, 2, 0).numpy()) for i in range(2)]
    c_u8 = tiny_tok.encode(u8)
    assert_equal(tiny_tok.encode(u8.float() / 255), c_u8, name="float input")
    assert_equal(tiny_tok.encode(pil), c_u8, name="PIL input")
    assert_equal(tiny_tok.encode(u8.numpy()), c_u8, name="numpy input")
    # other sizes, modes and aspect ratios are resized (no crop) and converted
    odd = [Image.fromarray(np.full((50, 333), 128, np.uint8), mode="L"), pil[0].convert("RGBA").resize((97, 31))]
    assert tiny_tok.encode(odd).shape == (2, 32)
    assert tiny_tok.encode(torch.rand(2, 3, 300, 101)).shape == (2, 32)


def test_pil_resize_matches_upstream_preprocessing(tiny_tok, seed):
    """PIL inputs: bicubic resize to 224 by PIL, /255, CLIP mean/std (the released transform)."""
    arr = np.random.default_rng(seed).integers(0, 256, (180, 260, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    x = tiny_tok.preprocess([im])
    ref = np.asarray(im.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    mean = np.array(tiny_tok.config.image_mean, np.float32)
    std = np.array(tiny_tok.config.image_std, np.float32)
    ref = torch.from_numpy(((ref - mean) / std).transpose(2, 0, 1))[None]
    assert_close(x, ref, atol=1e-6, rtol=1e-6, name="preprocess")


@pytest.mark.parametrize("j", [1, 7, 31])
def test_qformer_is_causal(tiny_tok, images, j):
    feats = tiny_tok.image_features(tiny_tok.preprocess(images))
    q = tiny_tok.qformer.query_tokens.expand(3, -1, -1).clone()
    with torch.no_grad():
        base = tiny_tok.qformer(feats, q)
        q2 = q.clone()
        q2[:, j] += torch.randn_like(q2[:, j])
        moved = tiny_tok.qformer(feats, q2)
    assert_equal(moved[:, :j], base[:, :j], name=f"outputs before query {j}")
    assert (base[:, j:] - moved[:, j:]).abs().amax() > 1e-3, "the changed query had no effect at all"


def test_bidirectional_qformer_is_not_causal(images):
    cfg = get_config("tiny")
    cfg.qformer.causal = False
    tok = SeedTokenizer.from_config(cfg, seed=0, init="unit")
    feats = tok.image_features(tok.preprocess(images))
    q = tok.qformer.query_tokens.expand(3, -1, -1).clone()
    with torch.no_grad():
        base = tok.qformer(feats, q)
        q[:, 31] += torch.randn_like(q[:, 31])  # (a constant shift would vanish in the LayerNorm)
        moved = tok.qformer(feats, q)
    assert (base[:, :31] - moved[:, :31]).abs().amax() > 1e-4


def test_upstream_causality_rule():
    assert get_config("seed-tokenizer-2").qformer.is_causal
    assert not TokenizerConfig(qformer={"num_queries": 1}).qformer.is_causal
    assert TokenizerConfig(qformer={"num_queries": 1, "causal": True}).qformer.is_causal


def test_batch_invariance(tiny_tok, seed):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(5, 3, 224, 224, generator=g)
    batch = tiny_tok.encode(imgs)
    alone = torch.cat([tiny_tok.encode(imgs[i : i + 1]) for i in range(5)])
    assert_equal(batch, alone, name="codes batch vs alone")
    assert_equal(tiny_tok.encode(imgs, batch_size=2), batch, name="codes batch_size=2")
    emb_b = tiny_tok.encode_embeddings(imgs)
    emb_a = torch.cat([tiny_tok.encode_embeddings(imgs[i : i + 1]) for i in range(5)])
    assert_close(emb_b, emb_a, atol=1e-5, rtol=1e-5, name="embeddings batch vs alone")
    gen_b = tiny_tok.decode(batch)
    gen_a = torch.cat([tiny_tok.decode(batch[i : i + 1]) for i in range(5)])
    assert_close(gen_b, gen_a, atol=1e-5, rtol=1e-5, name="decode batch vs alone")


def _hf_qformer(cfg: TokenizerConfig):
    transformers = pytest.importorskip("transformers")
    q = cfg.qformer
    hf_cfg = transformers.Blip2QFormerConfig(
        hidden_size=q.hidden,
        num_hidden_layers=q.layers,
        num_attention_heads=q.heads,
        intermediate_size=q.ffn,
        encoder_hidden_size=cfg.vision.width,
        cross_attention_frequency=q.cross_attention_freq,
        layer_norm_eps=q.ln_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.Blip2QFormerModel(hf_cfg).eval()


def test_qformer_matches_transformers(tiny_tok, images):
    """transformers' Blip2QFormerModel with the causal query mask is the reference."""
    hf = _hf_qformer(tiny_tok.config)
    sd = ours_to_hf_qformer(tiny_tok.state_dict())
    query_tokens = sd.pop("query_tokens")
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        feats = tiny_tok.image_features(tiny_tok.preprocess(images))
        mask = torch.ones(3, 1, 32, 32, dtype=torch.bool).tril()  # (B, 1, 32, 32) lower-triangular
        ref = hf(query_embeds=query_tokens.expand(3, -1, -1), attention_mask=mask, encoder_hidden_states=feats)
        ours = tiny_tok.qformer(feats)
    assert_close(ours, ref.last_hidden_state, atol=2e-5, rtol=2e-5, name="Q-Former vs transformers")
    # the mask matters: without it transformers is bidirectional and differs
    with torch.no_grad():
        free = hf(query_embeds=query_tokens.expand(3, -1, -1), encoder_hidden_states=feats).last_hidden_state
    assert (free - ours).abs().amax() > 1e-3


def test_load_transformers_qformer_and_vision(images, seed):
    """Weights in transformers' BLIP-2 layout load into our model and give transformers' outputs."""
    transformers = pytest.importorskip("transformers")
    cfg = get_config("tiny")
    hf_q = _hf_qformer(cfg)
    v = cfg.vision
    hf_v = transformers.Blip2VisionModel(
        transformers.Blip2VisionConfig(
            hidden_size=v.width,
            intermediate_size=v.mlp_hidden,
            num_hidden_layers=v.depth,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=1e-5,
            hidden_act="gelu",
            qkv_bias=True,
            attention_dropout=0.0,
        )
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(hf_q.parameters()) + list(hf_v.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    query_tokens = torch.randn(1, 32, cfg.qformer.hidden, generator=g)
    sd = {"query_tokens": query_tokens}
    sd.update({"qformer." + k: t for k, t in hf_q.state_dict().items()})
    sd.update({"vision_model." + k: t for k, t in hf_v.state_dict().items()})
    tok = SeedTokenizer.from_config("tiny", seed=0)
    report = tok.load_blip2_qformer(sd)
    assert report.ok(), report.summary()
    assert not [k for k in report.missing if k.startswith(("qformer.", "vision.", "ln_vision."))]
    with torch.no_grad():
        pixels = tok.preprocess(images)
        ref_v = hf_v(pixel_values=pixels, output_hidden_states=True)
        assert_close(tok.vision(pixels), ref_v.hidden_states[-1], atol=1e-4, rtol=1e-4, name="ViT vs transformers")
        feats = tok.image_features(pixels)
        assert_close(feats, ref_v.last_hidden_state, atol=1e-4, rtol=1e-4, name="ln_vision vs post_layernorm")
        mask = torch.ones(3, 1, 32, 32, dtype=torch.bool).tril()
        ref_q = hf_q(query_embeds=query_tokens.expand(3, -1, -1), attention_mask=mask, encoder_hidden_states=feats)
        assert_close(tok.qformer(feats), ref_q.last_hidden_state, atol=2e-5, rtol=2e-5, name="Q-Former")
    # a bare Blip2QFormerModel state dict (no prefix) loads too
    tok2 = SeedTokenizer.from_config("tiny", seed=1)
    bare = dict(hf_q.state_dict(), query_tokens=query_tokens)
    assert tok2.load_blip2_qformer(bare).ok()
    assert_equal(tok2.qformer.query_tokens, query_tokens, name="query_tokens")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inference(dtype, images):
    tok32 = SeedTokenizer.from_config("tiny", seed=5, init="unit")
    tok = SeedTokenizer.from_config("tiny", seed=5, init="unit").to(dtype)
    emb = tok.encode_embeddings(images)
    assert emb.dtype == dtype
    ref = tok32.encode_embeddings(images)
    tol = 2e-2 if dtype == torch.float16 else 8e-2  # of the largest embedding value
    assert_close(emb, ref, atol=tol * float(ref.abs().max()), rtol=0, name=f"{dtype} embeddings")
    codes = tok.encode(images)
    # the quantizer's distances are exact (fp64 here) on the low-precision z and codebook values
    z = tok.quantizer.encode_task_layer(emb)
    d = torch.cdist(z.double().reshape(-1, z.shape[-1]), tok.quantizer.codebook.weight.double()).square()
    best = d.min(dim=-1).values
    achieved = d.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert_equal(achieved, best, name="distance achieved vs the minimum")
    assert (codes == tok32.encode(images)).float().mean() > 0.5  # most codes survive the precision drop
    gen = tok.decode(codes)
    assert gen.dtype == dtype and torch.isfinite(gen.float()).all()


@pytest.mark.parametrize("queries,out_dim", [(1, 48), (77, 40)])
def test_reverse_qformer_heads(queries, out_dim):
    cfg = get_config("tiny")
    cfg.detokenizer.kind = "reverse_qformer"
    cfg.detokenizer.rq_queries = queries
    cfg.detokenizer.rq_layers = 2
    cfg.detokenizer.out_dim = out_dim
    tok = SeedTokenizer.from_config(cfg, seed=0, init="unit")
    codes = torch.randint(0, tok.codebook_size, (2, 32))
    out = tok.decode(codes)
    expect = (2, out_dim) if queries == 1 else (2, queries, out_dim)
    assert out.shape == expect
    assert not torch.allclose(out[0], out[1])
    assert not tok.detokenizer.reverse_qformer.causal  # bidirectional, as upstream for 1 / 77 queries


def test_presets_and_config_errors():
    for name in ("seed-tokenizer-2", "seed-tokenizer-2-rq1", "seed-v1", "tiny"):
        cfg = get_config(name)
        assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    v1 = get_config("seed-v1")
    assert (v1.detokenizer.rq_queries, v1.detokenizer.out_dim) == (77, 768)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        get_config("seed-tokenizer-3")
    with pytest.raises(ValueError, match="not divisible"):
        TokenizerConfig(qformer={"hidden": 100, "heads": 12})
    with pytest.raises(ValueError, match="unknown field"):
        TokenizerConfig.from_dict({"vision": {"widht": 3}})
    with pytest.raises(ValueError, match="init must be"):
        SeedTokenizer.from_config("tiny", init="xavier")


def test_seed_makes_weights_reproducible():
    a = SeedTokenizer.from_config("tiny", seed=11)
    b = SeedTokenizer.from_config("tiny", seed=11)
    c = SeedTokenizer.from_config("tiny", seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k in sa:
        assert_equal(sb[k], sa[k], name=k)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _tiny_reverse_qformer():
    from seed_fast.models.config import DetokenizerConfig

    cfg = get_config("tiny")
    cfg.detokenizer = DetokenizerConfig(kind="reverse_qformer", heads=4, rq_queries=5, rq_layers=1, out_dim=24)
    return cfg


@pytest.mark.parametrize("name", ["tiny", "mini", "reverse_qformer"])
def test_uniform_init_reaches_every_parameter_with_unit_scales(name, seed):
    cfg = _tiny_reverse_qformer() if name == "reverse_qformer" else name
    tok = SeedTokenizer.from_config(cfg, seed=4, init="uniform")
    again = SeedTokenizer.from_config(cfg, seed=4, init="uniform")
    other = SeedTokenizer.from_config(cfg, seed=5, init="uniform")
    sd, sd2, sd3 = tok.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values())
    for k in sd:  # the seed fixes the weights
        assert_equal(sd2[k], sd[k], name=k)
    assert any(not torch.equal(sd[k], sd3[k]) for k in sd), "another seed must change them"
    n_linear = 0
    for m in tok.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach().double()
            bound = 3**0.5 * w[0].numel() ** -0.5
            assert float(w.abs().max()) <= bound * (1 + 1e-6)
            if w.numel() >= 4096:  # the sample std of a uniform draw sits within a few percent of its own
                assert abs(float(w.std()) / (bound / 3**0.5) - 1) < 0.1
                n_linear += 1
            if m.bias is not None:
                assert not m.bias.any()
        elif isinstance(m, torch.nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.any()
    assert n_linear >= 4
    codes = tok.encode(
        torch.rand(
            3,
            3,
            tok.config.vision.image_size,
            tok.config.vision.image_size,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    assert codes.shape == (3, tok.num_codes) and int(codes.max()) < tok.codebook_size
    assert codes.unique().numel() > 1, "unit-scale weights: the codes should depend on the image"


def test_uniform_init_refuses_to_leave_a_parameter_unset(monkeypatch):
    def forgets_the_codebook(self, init="bert"):
        for name, p in self.named_parameters():
            if "codebook" not in name:
                torch.nn.init.zeros_(p)

    monkeypatch.setattr(SeedTokenizer, "init_weights", forgets_the_codebook)
    with pytest.raises(RuntimeError, match="uninitialized.*codebook"):
        SeedTokenizer.from_config("tiny", seed=0, init="uniform")


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="'uniform'"):
        SeedTokenizer.from_config("tiny", seed=0, init="xavier")


def test_eva_qkv_bias_is_kept_while_unchanged_and_follows_changes(seed):
    """EVA's [q_bias, 0, v_bias] is built once outside autograd (not per layer per call), rebuilt
    after an in-place change or a dtype cast, and built in the graph when the biases train."""
    from seed_fast.models.seed.vit import Attention

    g = torch.Generator().manual_seed(seed)
    att = Attention(16, 2, eva_bias=True)
    with torch.no_grad():
        att.q_bias.copy_(torch.randn(16, generator=g))
        att.v_bias.copy_(torch.randn(16, generator=g))
    x = torch.randn(2, 5, 16, generator=g)

    def want(m, x):
        bias = torch.cat([m.q_bias, torch.zeros_like(m.q_bias), m.v_bias])
        return torch.nn.functional.linear(x, m.qkv.weight, bias)

    with torch.no_grad():
        first = att.qkv_bias()
        assert att.qkv_bias() is first, "rebuilt although nothing changed"
        att.q_bias.add_(1.0)
        assert_equal(att.qkv_bias(), torch.cat([att.q_bias, torch.zeros(16), att.v_bias]), name="after add_")
        ref = want(att, x)
        assert_close(torch.nn.functional.linear(x, att.qkv.weight, att.qkv_bias()), ref, rtol=0, atol=0)
    half = Attention(16, 2, eva_bias=True)
    half.load_state_dict(att.state_dict())
    half = half.double()
    with torch.no_grad():
        assert half.qkv_bias().dtype == torch.float64
    out = att(x)  # grad enabled, biases trainable: built in the graph
    out.sum().backward()
    assert att.q_bias.grad is not None and att.v_bias.grad is not None
    assert_close(torch.nn.functional.linear(x, att.qkv.weight, att.qkv_bias()), ref, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        fresh = Attention(16, 2, eva_bias=True)
        assert fresh.qkv_bias().shape == (48,)  # inference tensors: no version counter, built per call
