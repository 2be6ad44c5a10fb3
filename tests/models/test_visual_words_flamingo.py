"""VW-LMM visual words (KL loss, PIF) and the Flamingo-style continuous baseline, on SeedLLM's LMs."""

import pytest
import torch

from seed_fast import SeedLLM
from seed_fast.models.preprocess import InputError
from seed_fast.models.related.flamingo import FlamingoConnector, PerceiverResampler
from seed_fast.models.related.visual_words import VisualWordHead, next_patch_targets, visual_word_kl, visual_word_kl_ref
from seed_fast.testing import assert_close


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def llm():
    return SeedLLM.from_config("tiny-llama", seed=0)


def test_kl_matches_the_written_out_formula(seed):
    g = _gen(seed)
    for b, t, v, v_lm in ((1, 1, 2, 2), (3, 11, 37, 50), (2, 5, 64, 64)):
        logits = torch.randn(b, t, v_lm, generator=g) * 3
        words = torch.randn(b, t, v, generator=g).softmax(-1)
        words[0, 0] = 0.0
        words[0, 0, 0] = 1.0  # a one-hot word (zeros in p)
        mask = torch.rand(b, t, generator=g) < 0.6
        mask[0, 0] = True
        got = visual_word_kl(logits, words, mask)
        want = visual_word_kl_ref(logits, words, mask)
        assert_close(got, want, atol=1e-5 * max(1.0, abs(float(want))), rtol=0, name=f"KL b={b} t={t} v={v}")
    assert float(visual_word_kl(logits, words, torch.zeros_like(mask))) == 0.0
    with pytest.raises(InputError, match="visual words span"):
        visual_word_kl(torch.randn(1, 2, 3), torch.rand(1, 2, 5).softmax(-1), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="share"):
        visual_word_kl(torch.randn(1, 2, 8), torch.rand(1, 3, 5).softmax(-1), torch.ones(1, 2, dtype=torch.bool))


def test_head_on_a_seed_llm_and_pif_rows_are_convex(llm, seed):
    head = VisualWordHead.for_lm(llm.model, vocab=llm.vocab.base)  # text words only, not image tokens
    hidden = llm.model.config.hidden_size
    assert head.vm_head.weight.shape == (llm.vocab.base, hidden) and head.vm_head.bias is None
    g = _gen(seed)
    x = torch.randn(2, 9, hidden, generator=g)
    w = head.words(x)
    assert_close(w.sum(-1), torch.ones(2, 9), atol=1e-6, rtol=1e-5, name="word distribution sums")
    assert (w >= 0).all()
    emb = llm.model.get_input_embeddings().weight[: llm.vocab.base].detach()
    pif = head.pseudo_image_features(x, emb)
    assert_close(pif, w @ emb, atol=1e-5, rtol=1e-5, name="pseudo image features")
    # a convex combination lies inside the embeddings' bounding box
    assert (pif <= emb.max(0).values + 1e-5).all() and (pif >= emb.min(0).values - 1e-5).all()
    with pytest.raises(InputError, match="match vm_head"):
        head.pseudo_image_features(x, llm.model.get_input_embeddings().weight.detach())  # image rows included
    with pytest.raises(InputError, match="vocab must lie"):
        VisualWordHead.for_lm(llm.model, vocab=10**7)
    words = head.top_words(x, llm.text_tokenizer, k=2)
    assert len(words) == 2 and len(words[0]) == 9 and len(words[0][0]) == 2


def test_kl_objective_trains_through_the_lm(llm, seed):
    model = llm.model
    head = VisualWordHead.for_lm(model, vocab=llm.vocab.base)
    g = _gen(seed)
    b, p, hidden = 2, 6, model.config.hidden_size
    patches = torch.randn(b, p, hidden, generator=g)
    prefix = torch.randint(4, 40, (b, 3), generator=g)
    embeds = torch.cat([model.get_input_embeddings()(prefix), patches], 1)
    out = model(inputs_embeds=embeds)
    positions = torch.arange(3, 3 + p).repeat(b, 1)
    targets, mask = next_patch_targets(head.words(patches).detach(), positions, embeds.shape[1])
    assert mask.sum() == b * (p - 1) and not mask[:, -1].any()
    assert_close(targets[:, 3], head.words(patches)[:, 1], atol=1e-8, rtol=1e-5, name="targets")
    loss = visual_word_kl(out.logits, targets, mask)
    loss.backward()
    assert loss > 0 and model.get_input_embeddings().weight.grad is not None
    model.zero_grad()
    with pytest.raises(InputError, match="image_positions"):
        next_patch_targets(targets[:, :p], positions + 100, embeds.shape[1])


def test_flamingo_connector_starts_as_the_frozen_lm_and_trains_only_itself(llm, seed):
    model = llm.model
    g = _gen(seed)
    ids = torch.randint(4, 40, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    conn = FlamingoConnector(model, media_dim=48, every=2, num_latents=8)
    media = torch.randn(2, 20, 48, generator=g)
    with torch.no_grad():
        same = conn(ids, mask, media=media).logits
    assert_close(same, plain, atol=1e-6, rtol=1e-5, name="tanh(0) gates: the LM unchanged")
    with torch.no_grad():
        for blk in conn.xattn:
            blk.attn_gate.fill_(0.5)
            blk.ff_gate.fill_(0.5)
    out = conn(ids, mask, media=media).logits
    assert not torch.allclose(out, plain, atol=1e-4)
    out2 = conn(ids, mask, media=media.flip(0)).logits
    assert not torch.allclose(out, out2, atol=1e-5)  # the answer depends on the image
    out.square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert conn.resampler.latents.grad is not None and conn.xattn[0].attn_gate.grad is not None
    assert len(conn.xattn) == len(range(0, model.config.num_hidden_layers, 2))
    conn.remove()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert_close(after, plain, atol=1e-6, rtol=1e-5, name="the LM after remove()")
    model.requires_grad_(True)
    with pytest.raises(InputError, match="media items"):
        FlamingoConnector(model, media_dim=48)(ids, mask, media=media[:1])


def test_perceiver_resampler_shapes_and_padding(seed):
    g = _gen(seed)
    r = PerceiverResampler(media_dim=12, dim=16, depth=2, heads=4, num_latents=5)
    media = torch.randn(3, 9, 12, generator=g)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 4:] = False
    out = r(media, valid)
    assert out.shape == (3, 5, 16)
    media2 = media.clone()
    media2[1, 4:] = 99.0  # padding does not leak
    assert_close(r(media2, valid)[1], out[1], atol=1e-5, rtol=1e-5, name="with padding changed")
    with pytest.raises(InputError, match="media must be"):
        r(torch.randn(3, 9, 11))
