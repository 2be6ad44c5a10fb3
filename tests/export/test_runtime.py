"""seed_fast.runtime without torch, its errors, the CLI, and the embedded model through ONNX."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from seed_fast import SeedLLM  # noqa: E402
from seed_fast.export import MANIFEST, export_onnx  # noqa: E402
from seed_fast.models.decoders.image_decoder import mini_image_decoder  # noqa: E402
from seed_fast.runtime import RuntimeInputError, SeedRuntime  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "peft", "triton"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    llm = SeedLLM.from_config("tiny-llama", seed=11, template="seed-opt")
    dec = mini_image_decoder(
        embed_dim=llm.tokenizer.decode(torch.zeros(1, 32, dtype=torch.long)).shape[-1], image_size=16
    )
    out = tmp_path_factory.mktemp("onnx-rt")
    export_onnx(["all"], out, objects={"tokenizer": llm.tokenizer, "llm": llm, "decoder": dec}, progress=False)
    return llm, out


def test_runtime_runs_with_torch_absent(tiny, tmp_path):
    llm, out = tiny
    s = llm.tokenizer.config.vision.image_size
    x = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8)
    np.save(tmp_path / "x.npy", x.numpy())
    want = {"codes": llm.tokenizer.encode(x).tolist()}
    want["captions"] = llm.caption(codes=torch.tensor(want["codes"]), max_new_tokens=6)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import json, numpy as np
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        from seed_fast.runtime import SeedRuntime, to_pil
        rt = SeedRuntime({str(out)!r}, providers=["CPUExecutionProvider"])
        codes = rt.encode(np.load({str(tmp_path / "x.npy")!r}))
        caps = rt.caption(codes=codes, max_new_tokens=6)
        img = rt.generate_images(["one red circle left of a blue square"], steps=2)
        to_pil(img)[0].save({str(tmp_path / "gen.png")!r})
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print(json.dumps({{"codes": codes.tolist(), "captions": caps}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == want
    assert (tmp_path / "gen.png").is_file()


def test_bad_input_gets_clear_errors(tiny, tmp_path):
    llm, out = tiny
    rt = SeedRuntime(out, providers=["CPUExecutionProvider"])
    s = llm.tokenizer.config.vision.image_size
    cases = [
        (lambda: rt.encode(np.zeros((3, s, s), np.uint8)), "batch dimension"),
        (lambda: rt.encode(np.zeros((1, s, s, 3), np.uint8)), "channels-last"),
        (lambda: rt.encode(np.zeros((1, 3, s, s), np.int32)), "uint8 or float"),
        (lambda: rt.encode(np.full((1, 3, s, s), 7.0, np.float32)), r"\[0, 1\]"),
        (lambda: rt.encode(np.full((1, 3, s, s), np.nan, np.float32)), "NaN"),
        (lambda: rt.encode([]), "empty"),
        (lambda: rt.encode(["/no/such/file.png"]), "no such file"),
        (lambda: rt.encode([Image.new("RGB", (0, 0))]), r"images\[0\] is empty \(0x0\)"),
        (lambda: rt.encode(np.zeros((1, 3, 0, 0), np.uint8)), "empty spatial size"),
        (lambda: rt.decode(np.zeros((2, 31), np.int64)), "exactly 32 codes"),
        (lambda: rt.decode(np.zeros((2, 32), np.float32)), "integers"),
        (lambda: rt.decode(np.full((1, 32), 10**6)), "must lie in"),
        (lambda: rt.caption(), "exactly one"),
        (lambda: rt.answer(questions=["a", "b"], codes=np.zeros((1, 32), np.int64)), "question"),
        (lambda: rt.generate_image_codes([""]), "non-empty"),
        (lambda: rt.generate_image_codes(["x"], cfg_scale=0.5), "cfg_scale"),
        (lambda: rt.generate_image_codes(["two <img_00003> circles"]), "an image token's text"),
        (lambda: rt.generate_image_codes(["red " * 5000]), "exceeds the model's .* positions"),
        (lambda: rt.caption(codes=np.zeros((1, 32), np.int64), prompt="red " * 5000), "exceeds the model's"),
        (lambda: rt.generate_image_codes(["x"], cfg_scale=float("nan")), "cfg_scale must be a finite number"),
        (lambda: rt.generate_image_codes(["x"], cfg_scale=float("inf")), "cfg_scale must be a finite number"),
        (lambda: rt.render(np.zeros((1, 5), np.float32)), "embeddings must be"),
        (lambda: rt.render(np.zeros((1, rt.parts["decoder"]["embed_dim"]), np.float32), steps=0), "steps"),
        (
            lambda: rt.render(
                np.zeros((1, rt.parts["decoder"]["embed_dim"]), np.float32), noise=np.zeros((2, 3, 16, 16))
            ),
            "noise",
        ),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeInputError, match=pattern):
            fn()
    with pytest.raises(RuntimeInputError, match=r"provider\(s\) \['NoSuchExecutionProvider'\] are not available"):
        SeedRuntime(out, providers=["CPUExecutionProvider", "NoSuchExecutionProvider"])
    with pytest.raises(RuntimeInputError, match="does not exist"):
        SeedRuntime(tmp_path / "nope")
    with pytest.raises(RuntimeInputError, match="export the model first"):
        SeedRuntime(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / MANIFEST).write_text((out / MANIFEST).read_text())
    with pytest.raises(RuntimeInputError, match="file is missing"):
        SeedRuntime(partial)
    only_tok = tmp_path / "only_tok"
    export_onnx(["tokenizer"], only_tok, objects={"tokenizer": llm.tokenizer}, progress=False)
    with pytest.raises(RuntimeInputError, match="no exported 'llm'"):
        SeedRuntime(only_tok).caption(codes=np.zeros((1, 32), np.int64))


def test_cli_export_and_ort_run(tmp_path):
    from seed_fast.cli import main

    ckpt = tmp_path / "ckpt"
    llm = SeedLLM.from_config("tiny-llama", seed=2, template="seed-opt")
    llm.save_pretrained(ckpt)
    out = tmp_path / "onnx"
    assert (
        main(
            [
                "export",
                "onnx",
                "--part",
                "tokenizer",
                "llm",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    man = json.loads((out / MANIFEST).read_text())
    assert set(man["parts"]) == {"tokenizer", "llm"}
    from seed_fast.synthetic import sample_images

    imgs, _ = sample_images(2, seed=1, size=64)
    paths = []
    for i, im in enumerate(imgs):
        paths.append(str(tmp_path / f"im{i}.png"))
        im.save(paths[-1])
    r = subprocess.run(
        [sys.executable, "-m", "seed_fast.runtime", "--model", str(out), *paths, "--question", "what color"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("codes ") == 2 and r.stdout.count("caption: ") == 2 and r.stdout.count("answer: ") == 2
    r = subprocess.run(
        [sys.executable, "-m", "seed_fast.runtime", "--model", str(tmp_path / "nope"), paths[0]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_tensorrt_without_tensorrt_says_how_to_install(tiny, tmp_path):
    from seed_fast.export import TensorRTError, build_engines
    from seed_fast.export.tensorrt_build import shape_profiles

    _, out = tiny
    man = json.loads((out / MANIFEST).read_text())
    prof = shape_profiles("llm", man["parts"]["llm"], max_batch=4, opt_batch=2, max_seq=128)
    h, hd = man["parts"]["llm"]["kv_heads"], man["parts"]["llm"]["head_dim"]
    assert prof["past_key_values.0.key"] == ((1, h, 0, hd), (2, h, 64, hd), (4, h, 128, hd))
    assert prof["input_ids"][2] == (4, 128)
    assert shape_profiles("decoder", man["parts"]["decoder"], max_batch=3)["sample"][2][0] == 6  # guidance doubles it
    with pytest.raises(TensorRTError, match="opt_batch"):
        shape_profiles("tokenizer", man["parts"]["tokenizer"], max_batch=2, opt_batch=4)
    with pytest.raises(TensorRTError, match="no seed_fast_onnx.json"):
        build_engines(tmp_path, tmp_path / "trt")
    with pytest.raises(TensorRTError, match="not in"):
        build_engines(out, tmp_path / "trt", parts=["vae"])
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(TensorRTError, match="pip install tensorrt"):
            build_engines(out, tmp_path / "trt")
    else:  # pragma: no cover - only where TensorRT is installed
        pytest.skip("tensorrt is installed: engines are built on a GPU machine (benchmarks/gpu_session.sh)")


def test_embedded_default_model_through_onnx(tmp_path, seed):
    from seed_fast.default_model import DEFAULT_DIR, load_default
    from seed_fast.default_model.demo import test_scenes

    if not (DEFAULT_DIR / "tokenizer" / "model.safetensors").is_file():
        pytest.skip("the embedded model is not installed")
    m = load_default()
    man = export_onnx(["all"], tmp_path, checkpoint=DEFAULT_DIR, progress=False)
    assert set(man["parts"]) == {"tokenizer", "detokenizer", "llm", "decoder"}
    rt = SeedRuntime(tmp_path, providers=["CPUExecutionProvider"])
    images, caps, _, qas = test_scenes(16)
    codes = rt.encode(images)
    assert_equal(codes, m.tokenizer.encode(images), name="codes")
    assert rt.caption(codes=codes) == m.llm.caption(codes=torch.from_numpy(codes))
    qs = [q for q, _ in qas]
    assert rt.answer(questions=qs, codes=codes) == m.llm.answer(codes=torch.from_numpy(codes), questions=qs)
    gen = rt.generate_image_codes(caps[:4])
    assert_equal(gen, m.llm.generate_image_codes(caps[:4]), name="generated codes")
    emb = rt.decode(gen)
    want = m.tokenizer.decode(torch.from_numpy(gen))
    assert_close(emb, want, atol=1e-4 * float(np.abs(emb).max()), rtol=0, name="embeddings")
    c, s = m.decoder.sample_channels, m.decoder.sample_size  # the latents of a latent decoder
    noise = np.random.default_rng(seed).standard_normal((4, c, s, s)).astype(np.float32)
    ref = m.decoder(
        torch.from_numpy(emb),
        num_inference_steps=5,
        guidance_scale=2.0,
        latents=torch.from_numpy(noise),
        output_type="np",
    ).images
    assert_close(rt.render(emb, steps=5, guidance=2.0, noise=noise), ref, atol=1e-4, rtol=0, name="images")


def test_runtime_draws_with_the_embedded_decoders_guidance_by_default():
    """The torch-free runtime cannot read the embedded model's generation.json, so it repeats the value:
    keep them equal."""
    import inspect

    from seed_fast.default_model import DEFAULT_DIR, GenerationConfig

    guidance = GenerationConfig.from_file(DEFAULT_DIR / "generation.json").decoder_guidance
    assert inspect.signature(SeedRuntime.render).parameters["guidance"].default == guidance


def test_the_runtime_reports_the_providers_it_runs_on(tiny):
    _, out = tiny
    rt = SeedRuntime(out, providers=["CPUExecutionProvider"])
    assert rt.active_providers == []  # nothing loaded yet
    rt.decode(np.zeros((1, 32), np.int64))
    assert rt.active_providers == ["CPUExecutionProvider"]
    assert rt.active_providers == list(rt.session("detokenizer").get_providers())


def test_the_runtime_refuses_what_the_torch_api_refuses_with_the_same_words(tiny):
    """Images and codes: the same bad input gets the same message from SeedTokenizer and SeedRuntime."""
    llm, out = tiny
    rt = SeedRuntime(out, providers=["CPUExecutionProvider"])
    tok = llm.tokenizer
    s = tok.config.vision.image_size
    images = [
        np.zeros((3, s, s), np.uint8),
        np.zeros((1, s, s, 3), np.uint8),
        np.zeros((0, 3, s, s), np.uint8),
        np.zeros((1, 3, 0, s), np.uint8),
        np.full((1, 3, s, s), 7.0, np.float32),
        np.full((1, 3, s, s), -0.5, np.float32),
        np.full((1, 3, s, s), np.nan, np.float32),
        [],
    ]
    codes = [
        np.zeros((2, 31), np.int64),
        np.zeros(32, np.int64),
        np.zeros((0, 32), np.int64),
        np.zeros((2, 32), np.float32),
        np.full((1, 32), 10**6),
        np.full((1, 32), -1),
    ]
    for bad, torch_call, rt_call in [
        *((x, tok.encode, rt.tokenize) for x in images),
        *((c, tok.decode, rt.embed) for c in codes),
    ]:
        with pytest.raises(ValueError) as want:
            torch_call(bad)
        with pytest.raises(RuntimeInputError) as got:
            rt_call(bad)
        assert str(got.value) == str(want.value), bad.shape if hasattr(bad, "shape") else bad


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"format": 1, "parts": {"tokenizer": "tok.onnx"}}', "must map each part to an object with a `file`"),
        ('{"format": 1, "parts": {"tokenizer": {}}}', "must map each part to an object with a `file`"),
    ],
)
def test_a_damaged_manifest_is_named_not_a_traceback(tmp_path, text, match):
    from seed_fast.cli import main

    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(RuntimeInputError, match=match):
        SeedRuntime(tmp_path)
    assert main(["ort-run", "--model", str(tmp_path), "x.png"]) == 2


def test_ort_run_names_an_unreadable_image(tiny, tmp_path, capsys):
    from seed_fast.cli import main

    _, out = tiny
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rt = SeedRuntime(out, providers=["CPUExecutionProvider"])
    with pytest.raises(RuntimeInputError, match=r"images\[0\]: cannot read .*bad.png.* as an image"):
        rt.encode([str(tmp_path / "bad.png")])
    capsys.readouterr()
    argv = ["ort-run", str(tmp_path / "bad.png"), "--model", str(out), "--providers", "CPUExecutionProvider"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "cannot read" in err, err
