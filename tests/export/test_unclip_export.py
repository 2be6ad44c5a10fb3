"""Stable unCLIP (SEED's released decoder) through ONNX: UNet + VAE graphs and the pipeline's loop in
numpy give diffusers' images, given the same starting latents and embedding noise."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from seed_fast.export import export_onnx  # noqa: E402
from seed_fast.export.to_onnx import MANIFEST  # noqa: E402
from seed_fast.models.decoders.unclip import tiny_unclip_pipeline  # noqa: E402
from seed_fast.runtime import RuntimeInputError, SeedRuntime, timestep_embedding  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    pipe = tiny_unclip_pipeline(embed_dim=32, sample_size=8, seed=4)
    pipe.save_pretrained(root / "model" / "decoder")
    man = export_onnx(["decoder"], root / "onnx", checkpoint=root / "model", progress=False)
    return pipe, root / "onnx", man


def test_the_manifest_describes_the_unclip_tail(exported):
    _, folder, man = exported
    info = man["parts"]["decoder"]
    assert info["kind"] == "unclip" and info["embed_dim"] == 32 and info["image_size"] == 64
    for f in (info["file"], info["vae_file"], info["prompt_file"]):
        assert (folder / f).is_file()
    rep = man["reports"]["decoder"]["parity"]
    assert rep["decoder_unet_max_rel_err"] < 1e-4 and rep["decoder_vae_max_rel_err"] < 1e-4
    assert json.loads((folder / MANIFEST).read_text())["parts"]["decoder"]["kind"] == "unclip"


def test_noise_level_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    for dim in (32, 33, 1024):
        t = torch.tensor([0, 1, 250, 999])
        want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
        # arguments up to 999 radians: one float32 ulp there is 6e-5, and numpy's and torch's sin / cos
        # may round differently
        assert_close(timestep_embedding(t.numpy(), dim), want, atol=1e-4, rtol=0, name=f"dim {dim}")
        assert_equal(
            timestep_embedding(np.zeros(2), dim),
            get_timestep_embedding(torch.zeros(2), dim, flip_sin_to_cos=True, downscale_freq_shift=0),
            name=f"dim {dim}, t = 0",
        )


@pytest.mark.parametrize("guidance,level", [(1.0, 0), (3.0, 0), (4.0, 300)])
def test_runtime_images_equal_the_diffusers_pipeline(exported, guidance, level, seed):
    pipe, folder, _ = exported
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(3, 32, generator=g)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    want = pipe(
        prompt=[""] * 3,
        image_embeds=emb,
        latents=latents.clone(),
        num_inference_steps=4,
        guidance_scale=guidance,
        noise_level=level,
        generator=torch.Generator().manual_seed(seed + 1),
        output_type="np",
    ).images
    embed_noise = torch.randn(3, 32, generator=torch.Generator().manual_seed(seed + 1)).numpy()  # diffusers' one draw
    rt = SeedRuntime(folder)
    got = rt.render(
        emb.numpy(), steps=4, guidance=guidance, noise=latents.numpy(), embed_noise=embed_noise, noise_level=level
    )
    assert got.shape == (3, 64, 64, 3)
    assert_close(got, want, atol=2e-4, rtol=0, name="images")
    # a different embedding gives a different image: the comparison is not between two constants
    other = rt.render(
        emb.numpy() * -1, steps=4, guidance=guidance, noise=latents.numpy(), embed_noise=embed_noise, noise_level=level
    )
    assert np.abs(other - got).max() > 1e-3


def test_unclip_runtime_errors_are_clear(exported):
    _, folder, _ = exported
    rt = SeedRuntime(folder)
    with pytest.raises(RuntimeInputError, match=r"embeddings must be \(B, 32\)"):
        rt.render(np.zeros((2, 31), np.float32))
    with pytest.raises(RuntimeInputError, match="noise_level"):
        rt.render(np.zeros((1, 32), np.float32), steps=2, noise_level=5000)
    with pytest.raises(RuntimeInputError, match="embed_noise must have shape"):
        rt.render(np.zeros((2, 32), np.float32), steps=2, embed_noise=np.zeros((1, 32)))
    with pytest.raises(RuntimeInputError, match="negative must have shape"):
        rt.render(np.zeros((2, 32), np.float32), steps=2, guidance=2.0, negative=np.zeros((1, 32)))
    img = rt.render(np.zeros((1, 32), np.float32), steps=2, guidance=2.0, negative=np.ones((1, 32), np.float32), seed=3)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_tensorrt_profiles_cover_both_unclip_graphs(exported):
    """Every input of both files has a (min, opt, max) profile, and the graphs run at its extremes."""
    import onnxruntime as ort

    from seed_fast.export.tensorrt_build import shape_profiles

    _, folder, man = exported
    info = man["parts"]["decoder"]
    for name, fname in (("decoder", info["file"]), ("decoder_vae", info["vae_file"])):
        prof = shape_profiles(name, info, max_batch=3, opt_batch=2)
        sess = ort.InferenceSession(str(folder / fname), providers=["CPUExecutionProvider"])
        assert {i.name for i in sess.get_inputs()} == set(prof)
        for k in (0, 2):  # min and max shapes
            feed = {
                n: (np.zeros(shape[k], np.int64) if n == "timestep" else np.zeros(shape[k], np.float32))
                for n, shape in prof.items()
            }
            out = sess.run(None, feed)[0]
            assert out.shape[0] == next(iter(prof.values()))[k][0]
    assert shape_profiles("decoder", info, max_batch=3)["class_labels"][2] == (6, 64)  # guidance doubles the batch
