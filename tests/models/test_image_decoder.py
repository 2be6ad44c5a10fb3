"""The embedded model's pixel-space diffusion decoder: interface, guidance, errors, save / load,
the unCLIP entry points accepting it, and that its loss trains."""

import pytest
import torch

pytest.importorskip("diffusers")

from seed_fast.models.image_decoder import (  # noqa: E402
    SeedImageDecoderPipeline,
    decoder_training_loss,
    load_image_decoder,
    mini_image_decoder,
)
from seed_fast.models.unclip import embeddings_to_images, load_unclip_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return mini_image_decoder(embed_dim=16, image_size=16, seed=3)


def test_images_have_the_decoder_size_and_depend_on_the_embedding(pipe):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 16, generator=g)
    out = pipe(emb, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert out.shape == (3, 3, 16, 16) and bool(((out >= 0) & (out <= 1)).all())
    again = pipe(emb, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(out, again)  # same seed, same images
    other = pipe(emb * -3, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert not torch.allclose(out, other)
    pil = pipe(emb[:1], num_inference_steps=2).images
    assert pil[0].size == (16, 16)


def test_guidance_uses_the_negative_embedding(pipe):
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    zeros = pipe(emb, generator=torch.Generator().manual_seed(2), **kw).images
    explicit = pipe(emb, negative_image_embeds=torch.zeros_like(emb), generator=torch.Generator().manual_seed(2), **kw).images
    other = pipe(emb, negative_image_embeds=torch.ones_like(emb), generator=torch.Generator().manual_seed(2), **kw).images
    assert torch.allclose(zeros, explicit) and not torch.allclose(zeros, other)


def test_bad_inputs_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="D=8, this decoder takes D=16"):
        pipe(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        pipe(torch.randn(16))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(torch.randn(1, 16), num_inference_steps=0)
    with pytest.raises(ValueError, match="negative_image_embeds"):
        pipe(torch.randn(2, 16), negative_image_embeds=torch.randn(1, 16), guidance_scale=2.0)
    with pytest.raises(TypeError, match="unexpected"):
        pipe(torch.randn(1, 16), noise_level=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        mini_image_decoder(16, 18)
    with pytest.raises(ValueError, match="multiple of 8"):
        mini_image_decoder(16, 20, channels=(8, 16, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        mini_image_decoder(16, 16, channels=(12,))


def test_save_load_and_the_unclip_entry_points(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "dec")
    for loaded in (load_image_decoder(tmp_path / "dec"), load_unclip_pipeline(tmp_path / "dec")):
        assert isinstance(loaded, SeedImageDecoderPipeline)
        for (k, a), (_, b) in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().items()):
            assert torch.equal(a, b), k
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    a = embeddings_to_images(pipe, emb, num_inference_steps=2, guidance_scale=1.0, seed=9, progress=False)
    b = embeddings_to_images(loaded, emb, num_inference_steps=2, guidance_scale=1.0, seed=9, progress=False)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    with pytest.raises(ValueError, match="draws 16 px"):
        embeddings_to_images(pipe, emb, height=32, progress=False)
    with pytest.raises(FileNotFoundError, match="not a SeedImageDecoderPipeline folder"):
        load_image_decoder(tmp_path)


def test_the_training_loss_goes_down():
    p = mini_image_decoder(embed_dim=8, image_size=8, seed=0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    emb = torch.randn(8, 8, generator=g)
    opt = torch.optim.AdamW(p.unet.parameters(), lr=3e-3)
    losses = []
    for i in range(30):
        loss = decoder_training_loss(p, images, emb, null_prob=0.0, generator=torch.Generator().manual_seed(i % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
