"""The embedded model's pixel-space diffusion decoder: interface, guidance, errors, save / load,
the unCLIP entry points accepting it, and that its loss trains."""

import pytest
import torch

pytest.importorskip("diffusers")

from seed_fast.models.decoders.image_decoder import (  # noqa: E402
    SeedImageDecoderPipeline,
    decoder_training_loss,
    load_image_decoder,
    mini_autoencoder,
    mini_image_decoder,
)
from seed_fast.models.decoders.unclip import embeddings_to_images, load_unclip_pipeline  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return mini_image_decoder(embed_dim=16, image_size=16, seed=3)


def test_images_have_the_decoder_size_and_depend_on_the_embedding(pipe, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(3, 16, generator=g)
    out = pipe(emb, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert out.shape == (3, 3, 16, 16) and bool(((out >= 0) & (out <= 1)).all())
    again = pipe(emb, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert_equal(again, out, name="same seed, same images")
    other = pipe(emb * -3, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert not torch.allclose(out, other)
    pil = pipe(emb[:1], num_inference_steps=2).images
    assert pil[0].size == (16, 16)


def test_guidance_uses_the_negative_embedding(pipe, seed):
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    zeros = pipe(emb, generator=torch.Generator().manual_seed(2), **kw).images
    explicit = pipe(
        emb, negative_image_embeds=torch.zeros_like(emb), generator=torch.Generator().manual_seed(2), **kw
    ).images
    other = pipe(
        emb, negative_image_embeds=torch.ones_like(emb), generator=torch.Generator().manual_seed(2), **kw
    ).images
    assert_close(explicit, zeros, atol=1e-8, rtol=1e-5, name="explicit zero negative")
    assert not torch.allclose(zeros, other)
    # one negative row is shared by the batch, as the unCLIP pipeline does (SeedLLM passes its (1, D) negative)
    neg = torch.randn(1, 16, generator=torch.Generator().manual_seed(seed + 1))
    shared = pipe(emb, negative_image_embeds=neg, generator=torch.Generator().manual_seed(2), **kw).images
    per_row = pipe(
        emb, negative_image_embeds=neg.expand(2, 16), generator=torch.Generator().manual_seed(2), **kw
    ).images
    assert_close(per_row, shared, atol=1e-8, rtol=1e-5, name="negative per row")
    assert not torch.allclose(shared, zeros)


def test_bad_inputs_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="D=8, this decoder takes D=16"):
        pipe(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        pipe(torch.randn(16))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(torch.randn(1, 16), num_inference_steps=0)
    with pytest.raises(ValueError, match="negative_image_embeds"):
        pipe(torch.randn(2, 16), negative_image_embeds=torch.randn(3, 16), guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"negative_image_embeds must have shape \(1, 16\) or \(2, 16\)"):
        pipe(torch.randn(2, 16), negative_image_embeds=torch.randn(2, 8), guidance_scale=2.0)
    with pytest.raises(TypeError, match="unexpected"):
        pipe(torch.randn(1, 16), noise_level=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        mini_image_decoder(16, 18)
    with pytest.raises(ValueError, match="multiple of 8"):
        mini_image_decoder(16, 20, channels=(8, 16, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        mini_image_decoder(16, 16, channels=(12,))


def test_save_load_and_the_unclip_entry_points(pipe, tmp_path, seed):
    pipe.save_pretrained(tmp_path / "dec")
    for loaded in (load_image_decoder(tmp_path / "dec"), load_unclip_pipeline(tmp_path / "dec")):
        assert isinstance(loaded, SeedImageDecoderPipeline)
        for (k, a), (_, b) in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().items()):
            assert_equal(b, a, name=k)
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
    a = embeddings_to_images(pipe, emb, num_inference_steps=2, guidance_scale=1.0, seed=9, progress=False)
    b = embeddings_to_images(loaded, emb, num_inference_steps=2, guidance_scale=1.0, seed=9, progress=False)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    with pytest.raises(ValueError, match="draws 16 px"):
        embeddings_to_images(pipe, emb, height=32, progress=False)
    with pytest.raises(FileNotFoundError, match="not a SeedImageDecoderPipeline folder"):
        load_image_decoder(tmp_path)


def test_the_training_loss_goes_down(seed):
    p = mini_image_decoder(embed_dim=8, image_size=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    emb = torch.randn(8, 8, generator=g)
    opt = torch.optim.AdamW(p.unet.parameters(), lr=3e-3)
    losses = []
    for i in range(30):
        loss = decoder_training_loss(
            p, images, emb, null_prob=0.0, generator=torch.Generator().manual_seed(seed + i % 3)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_patch_decoder_folds_pixels_into_channels(seed):
    """patch 2: the UNet runs at half the resolution on 12 channels; the pipeline still takes and
    returns full-size 3-channel pixels, and _denoise is exactly unfold -> UNet -> fold."""
    import torch.nn.functional as F

    p = mini_image_decoder(embed_dim=8, image_size=24, seed=seed, channels=(16, 32), patch=2)
    assert (p.patch, p.image_size, p.image_channels) == (2, 24, 3)
    assert p.unet.config.in_channels == p.unet.config.out_channels == 12 and p.unet.config.sample_size == 12
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(3, 3, 24, 24, generator=g), torch.randn(3, 8, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    with torch.no_grad():
        got = p._denoise(x, t, emb)
        ref = F.pixel_shuffle(
            p.unet(F.pixel_unshuffle(x, 2), t, encoder_hidden_states=emb[:, None], class_labels=emb).sample, 2
        )
    assert got.shape == x.shape
    assert_equal(got, ref, name="_denoise")
    # the fold keeps each 2x2 block together: moving one pixel changes only the UNet input cell holding it
    y = x.clone()
    y[0, 1, 5, 7] += 1
    diff = (F.pixel_unshuffle(y, 2) - F.pixel_unshuffle(x, 2)).abs().sum(1)
    assert diff.nonzero().tolist() == [[0, 2, 3]]
    out = p(emb, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert out.shape == (3, 3, 24, 24)
    loss = decoder_training_loss(p, x.clamp(-1, 1), emb, null_prob=0.5, generator=torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss) and p.unet.conv_in.weight.grad.abs().sum() > 0


def test_patch_decoder_saves_loads_and_rejects_bad_sizes(tmp_path, seed):
    p = mini_image_decoder(embed_dim=8, image_size=16, seed=seed, channels=(16, 32), patch=2)
    p.save_pretrained(tmp_path / "dec")
    q = load_image_decoder(tmp_path / "dec")
    assert (q.patch, q.image_size) == (2, 16)
    emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    kw = dict(num_inference_steps=2, output_type="pt")
    assert_equal(
        q(emb, generator=torch.Generator().manual_seed(4), **kw).images,
        p(emb, generator=torch.Generator().manual_seed(4), **kw).images,
        name="loaded vs saved",
    )
    with pytest.raises(ValueError, match="multiple of patch 3"):
        mini_image_decoder(8, 16, patch=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        mini_image_decoder(8, 20, channels=(16, 32, 64), patch=2)
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        mini_image_decoder(8, 16, patch=0)
    from diffusers import UNet2DConditionModel

    unet4 = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=8,
    )
    with pytest.raises(ValueError, match="3 \\* patch\\*\\*2 input channels \\(RGB pixels\\), got 4"):
        SeedImageDecoderPipeline(unet=unet4, scheduler=p.scheduler)
    with pytest.raises(ValueError, match="3 \\* patch\\*\\*2 input channels \\(the autoencoder latents\\), got 4"):
        SeedImageDecoderPipeline(
            unet=unet4, scheduler=p.scheduler, vae=mini_autoencoder(16, (8, 16), latent_channels=3)
        )
    with pytest.raises(TypeError, match="AutoencoderKL"):
        SeedImageDecoderPipeline(unet=unet4, scheduler=p.scheduler, vae=unet4)


def test_attention_levels_puts_cross_attention_on_more_levels(tmp_path, seed):
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D

    one = mini_image_decoder(embed_dim=8, image_size=16, seed=1, channels=(8, 16, 32))
    two = mini_image_decoder(embed_dim=8, image_size=16, seed=1, channels=(8, 16, 32), attention_levels=2)
    with pytest.raises(ValueError, match="multiples of 16"):
        mini_image_decoder(embed_dim=8, image_size=16, channels=(8, 16, 32), attention_levels=3)
    kinds = [[type(b) for b in p.unet.down_blocks] for p in (one, two)]
    assert kinds[0].count(CrossAttnDownBlock2D) == 1 and kinds[1].count(CrossAttnDownBlock2D) == 2
    assert kinds[1][0] is not CrossAttnDownBlock2D  # the full-resolution level stays plain
    assert [type(b) for b in two.unet.up_blocks].count(CrossAttnUpBlock2D) == 2
    # the extra cross-attention reads the embedding at the 8 x 8 level too, and the layout survives a save
    emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    x = two(emb, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    two.save_pretrained(tmp_path / "dec")
    again = load_image_decoder(tmp_path / "dec")
    y = again(emb, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert x.shape == (2, 3, 16, 16)
    assert_equal(y, x, name="loaded vs saved")
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="attention_levels"):
            mini_image_decoder(8, 16, channels=(8, 16, 32), attention_levels=bad)


def _latent_decoder(seed: int, image_size: int = 16):
    vae = mini_autoencoder(
        image_size, (8, 16), latent_channels=4, seed=seed
    ).eval()  # as loaded (SDPA rounds otherwise)
    vae.register_to_config(scaling_factor=1.7)
    return mini_image_decoder(embed_dim=8, image_size=image_size, seed=seed, channels=(16, 32), vae=vae)


def test_latent_decoder_denoises_latents_and_draws_through_the_autoencoder(seed):
    """With a vae the loop runs on (latent channels, image_size / 2) samples, as a plain DDIM loop over
    the UNet does, and the output is vae.decode(x / scaling_factor) mapped to [0, 1]."""
    p = _latent_decoder(seed)
    assert (p.sample_channels, p.sample_size, p.vae_scale_factor, p.image_size, p.patch) == (4, 8, 2, 16, 1)
    assert p.unet.config.in_channels == 4 and p.scheduler.config.clip_sample is False
    g = torch.Generator().manual_seed(seed)
    emb, noise = torch.randn(2, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = p(emb, num_inference_steps=3, latents=noise, guidance_scale=2.0, output_type="pt").images
    assert out.shape == (2, 3, 16, 16)
    # the reference: the same DDIM loop written out, then the autoencoder's decoder
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(p.scheduler.config)
    sched.set_timesteps(3)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((4,), int(t))
            e2 = torch.cat([torch.zeros_like(emb), emb])
            pred = p.unet(torch.cat([x, x]), tt, encoder_hidden_states=e2[:, None], class_labels=e2).sample
            uncond, cond = pred.chunk(2)
            x = sched.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
        ref = (p.vae.decode(x / 1.7).sample / 2 + 0.5).clamp(0, 1)
    assert_close(out, ref, atol=1e-5, rtol=1e-4, name="latent DDIM loop")
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 8, 8\)"):
        p(emb, latents=torch.randn(2, 3, 16, 16))
    # encode_images: the latent means, scaled; the training loss runs on them
    imgs = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        lat = p.encode_images(imgs)
        assert_close(lat, p.vae.encode(imgs).latent_dist.mean * 1.7, atol=1e-5, rtol=1.3e-6, name="latents")
    loss = decoder_training_loss(p, lat, emb, null_prob=0.0, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and p.unet.conv_in.weight.grad.abs().sum() > 0


def test_latent_decoder_saves_loads_and_errors(tmp_path, seed):
    p = _latent_decoder(seed)
    p.save_pretrained(tmp_path / "dec")
    assert (tmp_path / "dec" / "vae" / "config.json").is_file()
    q = load_image_decoder(tmp_path / "dec")
    assert q.vae is not None and q.vae.config.scaling_factor == 1.7 and q.image_size == 16
    emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    kw = dict(num_inference_steps=2, output_type="pt")
    assert_equal(
        q(emb, generator=torch.Generator().manual_seed(4), **kw).images,
        p(emb, generator=torch.Generator().manual_seed(4), **kw).images,
        name="loaded vs saved",
    )
    assert embeddings_to_images(q, emb, num_inference_steps=2, seed=1, progress=False)[0].size == (16, 16)
    # a pixel decoder saves no vae and loads as one
    mini_image_decoder(embed_dim=8, image_size=16, seed=0).save_pretrained(tmp_path / "pix")
    assert not (tmp_path / "pix" / "vae").exists() and load_image_decoder(tmp_path / "pix").vae is None
    import shutil

    shutil.rmtree(tmp_path / "dec" / "vae")
    with pytest.raises(FileNotFoundError, match="lists a vae but there is no vae/"):
        load_image_decoder(tmp_path / "dec")
    with pytest.raises(ValueError, match="not a multiple of the autoencoder's down-sampling"):
        mini_image_decoder(8, 15, channels=(16, 32), vae=mini_autoencoder(16, (8, 16)))
    with pytest.raises(ValueError, match="autoencoder channels"):
        mini_autoencoder(16, (12,))
    with pytest.raises(ValueError, match="image_size must be a multiple of 4"):
        mini_autoencoder(18, (8, 16, 32))


# ---------------------------------------------------------------- diffusers conventions
def test_diffusion_pipeline_from_pretrained_loads_a_saved_decoder(tmp_path, seed):
    """A saved decoder folder loads through diffusers' own entry point, as its pipelines do."""
    from diffusers import DiffusionPipeline

    p = mini_image_decoder(embed_dim=16, image_size=16, seed=4)
    p.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is SeedImageDecoderPipeline
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
    kw = dict(num_inference_steps=2, output_type="pt")
    assert_equal(
        loaded(emb, generator=torch.Generator().manual_seed(1), **kw).images,
        p(emb, generator=torch.Generator().manual_seed(1), **kw).images,
        name="loaded the diffusers way",
    )


def test_diffusers_call_arguments(pipe, seed):
    """num_images_per_prompt, a generator per image, callback_on_step_end (which may replace the
    latents or interrupt) and every output_type, as diffusers' pipelines take them."""
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
    kw = dict(num_inference_steps=3, output_type="pt")
    two = pipe(emb, num_images_per_prompt=2, generator=torch.Generator().manual_seed(1), **kw).images
    assert two.shape == (4, 3, 16, 16)
    # a generator per image: image i is what that generator gives alone
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    each = pipe(emb, num_images_per_prompt=2, generator=gens, **kw).images
    alone = pipe(emb[1:2], generator=torch.Generator().manual_seed(12), **kw).images
    assert_close(each[2:3], alone, atol=2e-5, rtol=1e-4, name="generator 2 -> image 2 (embedding 1)")
    seen = []

    def record(p, step, t, tensors):
        seen.append((step, int(t), tuple(tensors["latents"].shape)))
        return {}

    pipe(emb, callback_on_step_end=record, **kw)
    assert [s for s, _, _ in seen] == [0, 1, 2] and all(shape == (2, 3, 16, 16) for _, _, shape in seen)

    def zero_out(p, step, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}

    blank = pipe(emb, callback_on_step_end=zero_out, **kw).images
    assert_close(blank, torch.full_like(blank, 0.5), atol=1e-6, rtol=0, name="latents replaced by the callback")

    def stop(p, step, t, tensors):
        p._interrupt = True
        return {}

    steps = []
    pipe(emb, callback_on_step_end=lambda *a: (steps.append(a[1]), stop(*a))[1], **kw)
    assert steps == [0]
    latent = pipe(emb, output_type="latent", generator=torch.Generator().manual_seed(1), **dict(num_inference_steps=3))
    assert latent.images.shape == (2, 3, 16, 16)
    assert pipe(emb, output_type="np", num_inference_steps=2).images.shape == (2, 16, 16, 3)
    for bad, match in (
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(generator=[torch.Generator()]), "generators for 2 images"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "may name"),
        (dict(callback_on_step_end=3), "must be callable"),
        (dict(output_type="latents"), "output_type"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            pipe(emb, num_inference_steps=1, **bad)
