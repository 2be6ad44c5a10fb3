"""Stable unCLIP tail: generation embeddings -> images, with SEED's negative image embedding."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import StableDiffusionPipeline, StableUnCLIPImg2ImgPipeline  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from seed_fast.models.decoders.unclip import (  # noqa: E402
    SeedUnCLIPPipeline,
    as_seed_pipeline,
    embeddings_to_images,
    load_unclip_pipeline,
    tiny_unclip_pipeline,
)
from seed_fast.testing import assert_equal  # noqa: E402

D = 32
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models are tiny, so threads buy nothing, and OpenMP spin-waiting makes two threads crawl (10-100x) when
    # another process shares the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return tiny_unclip_pipeline(embed_dim=D, sample_size=8, seed=0)


@pytest.fixture(scope="module")
def embeds():
    return torch.randn(2, D), torch.randn(2, D)  # the global RNG, seeded for this fixture by conftest.py


def arrays(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b), strict=True))


def render(pipe, emb, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    if "generator" not in kw:
        kw.setdefault("seed", 0)
    kw.setdefault("progress", False)
    return embeddings_to_images(pipe, emb, **kw)


def capture_class_labels(pipe, call):
    """Run `call()` and return the class_labels the UNet saw at its first step."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["class_labels"].detach().clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


# --- shapes, determinism ------------------------------------------------------------------------------------------


def test_batch_of_embeddings_gives_batch_of_images(pipe, embeds):
    images = render(pipe, embeds[0])
    assert len(images) == 2
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    wide = render(pipe, embeds[0][:1], height=32, width=64)
    assert len(wide) == 1 and wide[0].size == (64, 32)


def test_deterministic_and_embedding_dependent(pipe, embeds):
    a, b = embeds
    first = render(pipe, a, seed=3)
    assert same(first, render(pipe, a, seed=3))
    assert same(first, render(pipe, a, generator=torch.Generator().manual_seed(3)))
    assert not same(first, render(pipe, b, seed=3))
    # Same starting noise for both rows of one batch, so the difference comes from the embedding.
    twins = render(pipe, torch.stack([a[0], b[0]]), seed=3)
    assert not np.array_equal(*arrays(twins))


def test_tiny_pipeline_is_reproducible_from_seed(embeds):
    p1, p2 = tiny_unclip_pipeline(seed=5), tiny_unclip_pipeline(seed=5)
    for (name, x), (_, y) in zip(p1.unet.state_dict().items(), p2.unet.state_dict().items(), strict=True):
        assert_equal(y, x, name=name)
    assert not torch.equal(p1.vae.decoder.conv_out.weight, tiny_unclip_pipeline(seed=6).vae.decoder.conv_out.weight)
    state = torch.random.get_rng_state()
    tiny_unclip_pipeline(seed=5)
    assert torch.equal(state, torch.random.get_rng_state())


def test_tokenizer_handles_empty_and_short_english(pipe):
    tok = pipe.tokenizer
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    ids = tok("The cat and the dog, singing!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "the cat and the dog , singing !"
    pipe(prompt="a red apple", image_embeds=torch.zeros(1, D), num_inference_steps=1, output_type="pt")


def test_low_precision_pipeline_accepts_float32_embeddings(embeds):
    bf16 = tiny_unclip_pipeline(dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    assert bf16.image_normalizer.mean.dtype == torch.bfloat16
    images = render(bf16, embeds[0], negative_image_embeds=embeds[1][:1])
    assert [im.size for im in images] == [(64, 64)] * 2


# --- negative image embedding -------------------------------------------------------------------------------------


def test_without_negative_matches_stock_diffusers_exactly(pipe, embeds):
    stock = StableUnCLIPImg2ImgPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    emb = embeds[0]
    ours = pipe(
        prompt=["", ""],
        image_embeds=emb,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images
    ref = stock(
        prompt=["", ""],
        image_embeds=emb,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images
    assert_equal(ours, ref, name="images vs stock diffusers")


def test_negative_is_noised_like_the_positive(pipe, embeds):
    pos, neg = embeds

    def call():
        pipe(
            prompt=["", ""],
            image_embeds=pos,
            negative_image_embeds=neg,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(4),
            output_type="latent",
        )

    labels = capture_class_labels(pipe, call)
    assert labels.shape == (4, 2 * D)
    # The generator draws the positive's noise, then the negative's (both before the latents).
    g = torch.Generator().manual_seed(4)
    noise_pos = randn_tensor((2, D), generator=g, dtype=pos.dtype)
    noise_neg = randn_tensor((2, D), generator=g, dtype=pos.dtype)
    level = torch.tensor([0])
    expected_uncond = pipe.noise_image_embeddings(neg, noise_level=level, noise=noise_neg)
    expected_cond = pipe.noise_image_embeddings(pos, noise_level=level, noise=noise_pos)
    assert_equal(labels[:2], expected_uncond, name="unconditional class labels")
    assert_equal(labels[2:], expected_cond, name="conditional class labels")
    # Stock diffusers feeds all-zero class labels, noise-level half included; a zero negative is not that.
    stock_labels = capture_class_labels(
        pipe, lambda: pipe(prompt=["", ""], image_embeds=pos, num_inference_steps=1, output_type="latent")
    )
    assert torch.count_nonzero(stock_labels[:2]) == 0
    zero_neg = capture_class_labels(
        pipe,
        lambda: pipe(
            prompt=["", ""],
            image_embeds=pos,
            negative_image_embeds=torch.zeros(2, D),
            num_inference_steps=1,
            output_type="latent",
        ),
    )
    assert torch.count_nonzero(zero_neg[:2, D:]) > 0


def test_negative_changes_the_images(pipe, embeds, seed):
    pos, neg = embeds
    latents = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))

    def run(**kw):
        return pipe(
            prompt=["", ""],
            image_embeds=pos,
            latents=latents,
            num_inference_steps=STEPS,
            guidance_scale=7.0,
            output_type="np",
            **kw,
        ).images

    base = run()
    with_neg = run(negative_image_embeds=neg)
    assert np.abs(with_neg - base).max() > 1e-3
    assert not same(render(pipe, pos, negative_image_embeds=neg), render(pipe, pos, negative_image_embeds=-neg))


def test_single_negative_broadcasts_over_the_batch(pipe, embeds):
    pos, neg = embeds
    one = render(pipe, pos, negative_image_embeds=neg[:1])
    assert same(one, render(pipe, pos, negative_image_embeds=neg[:1].expand(2, D).clone()))


def test_negative_follows_num_images_per_prompt(pipe, embeds):
    pos, neg = embeds

    def call():
        out = pipe(
            prompt=["", ""],
            image_embeds=pos,
            negative_image_embeds=neg,
            num_images_per_prompt=2,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        )
        assert len(out.images) == 4

    labels = capture_class_labels(pipe, call)
    assert labels.shape == (8, 2 * D)
    uncond, cond = labels[:4], labels[4:]
    assert_equal(uncond[1], uncond[0], name="uncond, image 2 of prompt 1")
    assert_equal(uncond[3], uncond[2], name="uncond, image 2 of prompt 2")
    assert not torch.equal(uncond[0], uncond[2])
    assert_equal(cond[1], cond[0], name="cond, image 2 of prompt 1")
    assert not torch.equal(cond[0], cond[2])


def test_negative_with_image_input(pipe, seed):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    labels = capture_class_labels(
        pipe,
        lambda: pipe(image=image, negative_image_embeds=torch.ones(1, D), num_inference_steps=1, output_type="latent"),
    )
    assert labels.shape == (2, 2 * D) and torch.count_nonzero(labels[0]) > 0


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_negative_ignored_without_guidance(pipe, embeds, guidance):
    pos, neg = embeds
    plain = render(pipe, pos, guidance_scale=guidance)
    assert same(plain, render(pipe, pos, guidance_scale=guidance, negative_image_embeds=neg))


def test_negative_is_cleared_after_each_call(pipe, embeds):
    pos, neg = embeds
    with pytest.raises(ValueError):
        pipe(prompt=["", ""], image_embeds=pos, negative_image_embeds=neg, height=60, num_inference_steps=1)
    assert pipe._seed_negative_image_embeds is None
    render(pipe, pos, negative_image_embeds=neg)
    assert pipe._seed_negative_image_embeds is None


# --- wrapping an existing pipeline --------------------------------------------------------------------------------


def test_as_seed_pipeline_shares_modules(pipe, embeds):
    stock = StableUnCLIPImg2ImgPipeline(**pipe.components)
    seed = as_seed_pipeline(stock)
    assert type(seed) is SeedUnCLIPPipeline
    for name, module in stock.components.items():
        assert getattr(seed, name) is module, name
    assert as_seed_pipeline(seed) is seed
    also = SeedUnCLIPPipeline.from_pipe_components(seed)
    assert also is not seed and also.unet is seed.unet
    # A plain diffusers pipeline is wrapped on the fly when a negative is asked for.
    pos, neg = embeds
    assert same(render(stock, pos, negative_image_embeds=neg), render(pipe, pos, negative_image_embeds=neg))


def test_as_seed_pipeline_rejects_other_pipelines(pipe):
    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=pipe.feature_extractor,
        requires_safety_checker=False,
    )
    with pytest.raises(TypeError, match="expected a diffusers StableUnCLIPImg2ImgPipeline.*StableDiffusionPipeline"):
        as_seed_pipeline(sd)
    with pytest.raises(TypeError, match="expected a diffusers StableUnCLIPImg2ImgPipeline.*str"):
        SeedUnCLIPPipeline.from_pipe_components("stabilityai/stable-diffusion-2-1-unclip")
    with pytest.raises(TypeError, match="pipe must be a diffusers StableUnCLIPImg2ImgPipeline"):
        embeddings_to_images(sd, torch.zeros(1, D))


# --- bad inputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_embeds=torch.zeros(D)), r"image_embeds must have shape \(B, 32\), got \(32,\).*batch dimension"),
        (dict(image_embeds=torch.zeros(1, 1, D)), r"image_embeds must have shape \(B, 32\), got \(1, 1, 32\)"),
        (dict(image_embeds=torch.zeros(2, 16)), r"image_embeds must have shape \(B, 32\): .*embedding dim is 32"),
        (dict(image_embeds=torch.zeros(0, D)), r"image_embeds .*B >= 1"),
        (dict(image_embeds=torch.full((2, D), float("nan"))), "image_embeds contains NaN or inf"),
        (dict(image_embeds=torch.zeros(2, D, dtype=torch.long)), "image_embeds must be a floating-point tensor"),
        (dict(height=60), "height must be a positive multiple of 8"),
        (dict(width=36), "width must be a positive multiple of 8"),
        (
            dict(negative_image_embeds=torch.zeros(3, D)),
            r"negative_image_embeds must have shape \(2, 32\) or \(1, 32\).*got \(3, 32\)",
        ),
        (dict(negative_image_embeds=torch.zeros(2, D + 1)), r"negative_image_embeds .*embedding dim is 32"),
        (dict(negative_image_embeds=torch.zeros(D)), r"negative_image_embeds must have shape .*\(32,\)"),
        (dict(negative_image_embeds=torch.tensor([[float("inf")] * D])), "negative_image_embeds contains NaN"),
        (dict(seed=0, generator=torch.Generator()), "either seed or generator"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, match):
    kwargs = {"image_embeds": torch.zeros(2, D), **kwargs}
    with pytest.raises(ValueError, match=match):
        embeddings_to_images(pipe, kwargs.pop("image_embeds"), progress=False, **kwargs)


def test_non_tensor_embeddings_raise_type_error(pipe):
    with pytest.raises(TypeError, match=r"image_embeds must be a torch.Tensor of shape \(B, 32\), got ndarray"):
        embeddings_to_images(pipe, np.zeros((2, D), dtype=np.float32))
    with pytest.raises(TypeError, match=r"negative_image_embeds must be a torch.Tensor .*got list"):
        pipe(prompt="", image_embeds=torch.zeros(1, D), negative_image_embeds=[0.0] * D)


def test_pipeline_call_validates_negative(pipe):
    with pytest.raises(ValueError, match=r"negative_image_embeds must have shape \(2, 32\) or \(1, 32\)"):
        pipe(prompt=["", ""], image_embeds=torch.zeros(2, D), negative_image_embeds=torch.zeros(3, D))
    with pytest.raises(ValueError, match=r"negative_image_embeds .*embedding dim is 32"):
        pipe(prompt="", image_embeds=torch.zeros(1, D), negative_image_embeds=torch.zeros(1, 8))


def test_tiny_pipeline_rejects_odd_embed_dim():
    with pytest.raises(ValueError, match="embed_dim must be an even number"):
        tiny_unclip_pipeline(embed_dim=31)


# --- loading ------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(pipe, embeds, tmp_path):
    pipe.save_pretrained(tmp_path / "unclip")
    loaded = load_unclip_pipeline(tmp_path / "unclip", device="cpu")
    assert isinstance(loaded, SeedUnCLIPPipeline)
    pos, neg = embeds
    assert same(render(loaded, pos, negative_image_embeds=neg), render(pipe, pos, negative_image_embeds=neg))
    bf16 = load_unclip_pipeline(str(tmp_path / "unclip"), dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16


def test_load_errors(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*never downloads"):
        load_unclip_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unclip_pipeline("stabilityai/stable-diffusion-2-1-unclip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_unclip_pipeline(empty)

    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionPipeline' pipeline; expected one of"):
        load_unclip_pipeline(folder)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_unclip_pipeline(folder)
    # A stock diffusers folder (class name StableUnCLIPImg2ImgPipeline) with a component folder gone.
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableUnCLIPImg2ImgPipeline"}))
    (folder / "unet" / "config.json").rename(folder / "unet.json")
    for f in (folder / "unet").iterdir():
        f.unlink()
    (folder / "unet").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lacks the component folder\(s\) \['unet'\]"):
        load_unclip_pipeline(folder)


# ---------------------------------------------------------------- the faster decode path
def test_speed_up_pipeline_draws_the_stock_images_and_undoes(seed):
    """Fused q/k/v + SDPA + channels-last (no compile on the CPU) gives the stock pipeline's images to
    fp32 rounding; undo_speed_up leaves the modules as diffusers makes them (same state dict)."""
    from seed_fast.models.decoders.fast import speed_up_pipeline, undo_speed_up

    p = tiny_unclip_pipeline(embed_dim=D, sample_size=8, seed=3)
    emb = torch.randn(2, D, generator=torch.Generator().manual_seed(seed))
    keys = set(p.unet.state_dict())

    def draw():
        images = embeddings_to_images(p, emb, num_inference_steps=STEPS, seed=4, progress=False)
        return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])

    want = draw()
    assert speed_up_pipeline(p, compile_mode=None) is p
    assert any(getattr(m, "fused_projections", False) for m in p.unet.modules())
    assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    speed_up_pipeline(p, compile_mode=None)  # twice: still undoable to the stock modules
    got = draw()
    assert np.abs(got - want).max() <= 1 / 255  # 8-bit images: at most one level apart
    undo_speed_up(p)
    assert set(p.unet.state_dict()) == keys
    assert not any(getattr(m, "fused_projections", False) for m in p.unet.modules())
    assert_equal(torch.from_numpy(draw()), torch.from_numpy(want), name="after undo")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        speed_up_pipeline(p, compile_mode="fastest")
    with pytest.raises(TypeError, match="needs a diffusers pipeline with a UNet"):
        speed_up_pipeline(object())


def test_diffusion_pipeline_from_pretrained_returns_the_seed_unclip_pipeline(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is SeedUnCLIPPipeline and loaded.image_embedding_dim == D
