"""ONNX export: every part traced, checked and run in onnxruntime, compared with torch.

The runtime (seed_fast.runtime, numpy + onnxruntime) is what deployment uses, so parity is checked
through it: codes identical, embeddings and logits within 1e-4 relative (fp32), greedy captions and
generated codes identical token for token, the denoising loop equal given the same noise.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from seed_fast import SeedLLM  # noqa: E402
from seed_fast.export import ExportError, export_onnx  # noqa: E402
from seed_fast.export.graphs import nearest_code  # noqa: E402
from seed_fast.models.decoders.image_decoder import mini_image_decoder  # noqa: E402
from seed_fast.ops import codebook_lookup_ref  # noqa: E402
from seed_fast.runtime import RuntimeInputError, SeedRuntime  # noqa: E402
from seed_fast.synthetic import sample_images  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402


def _assert_rel(a, b, tol: float, name: str) -> None:
    """Within tol of the largest magnitude of b, elementwise."""
    assert_close(a, b, atol=tol * float(torch.as_tensor(b).detach().abs().max()), rtol=0, name=name)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt"])
def exported(request, tmp_path_factory):
    llm = SeedLLM.from_config(request.param, seed=3, template="seed-opt")
    tok = llm.tokenizer
    dim = tok.decode(torch.zeros(1, tok.num_codes, dtype=torch.long)).shape[-1]
    dec = mini_image_decoder(embed_dim=dim, image_size=16, seed=5)
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    manifest = export_onnx(["all"], out, objects={"tokenizer": tok, "llm": llm, "decoder": dec}, progress=False)
    return llm, dec, SeedRuntime(out, providers=["CPUExecutionProvider"]), manifest, out


def test_manifest_lists_every_part_with_its_checks(exported):
    _, _, rt, manifest, out = exported
    assert set(manifest["parts"]) == {"tokenizer", "detokenizer", "llm", "decoder"}
    on_disk = json.loads((out / "seed_fast_onnx.json").read_text())
    assert on_disk["parts"] == manifest["parts"]
    for part, rep in manifest["reports"].items():
        for f in rep["files"]:
            assert (out / f).is_file(), (part, f)
    assert manifest["reports"]["tokenizer"]["parity"]["codes_equal"] == 1.0
    for part in ("detokenizer", "llm", "decoder"):
        assert manifest["reports"][part]["parity"]["max_rel_err"] <= 1e-4
    # the dynamo exporter where it was measured to give the same parity (with onnxscript installed)
    import importlib.util

    want = "dynamo" if importlib.util.find_spec("onnxscript") else "legacy"
    for part in ("tokenizer", "decoder"):
        assert manifest["reports"][part]["parity"]["exporter"] == want, part


def test_graphs_hold_standard_ops_only(exported):
    import onnx

    out = exported[4]
    for f in ("image_tokenizer.onnx", "image_detokenizer.onnx", "model.onnx", "decoder_unet.onnx"):
        domains = {n.domain for n in onnx.load(str(out / f), load_external_data=False).graph.node}
        assert domains <= {"", "ai.onnx"}, (f, domains)


def test_nearest_code_matches_reference_on_odd_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    for n, k, d, chunk in ((1, 1, 1, 256), (37, 300, 7, 64), (64, 1024, 32, 256), (5, 513, 16, 512)):
        z, book = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
        ref, _ = codebook_lookup_ref(z, book)
        got = nearest_code(z, book, chunk)
        assert_equal(got, ref, name=f"n={n} k={k} d={d} chunk={chunk}")
    # ties: the lowest index wins across chunk borders, as in the reference
    book = torch.zeros(600, 4)
    got = nearest_code(torch.ones(3, 4), book, 256)
    assert got.tolist() == [0, 0, 0]


def test_codes_identical_on_random_and_real_images(exported, seed):
    llm, _, rt, _, _ = exported
    tok = llm.tokenizer
    s = tok.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (4, 3, s, s), generator=g, dtype=torch.uint8)
    assert_equal(rt.encode(x.numpy()), tok.encode(x), name="codes of random images")
    scenes, _ = sample_images(3, seed=seed % 1000, size=s)
    assert_equal(rt.encode(scenes), tok.encode(scenes), name="codes of scenes")
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    real = [Image.fromarray(getattr(skimage, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    assert_equal(rt.encode(real), tok.encode(real), name="codes of photographs")
    # float input is accepted too (range-checked, converted to the graph's uint8)
    xf = x.float().numpy() / 255.0
    assert_equal(rt.encode(xf), tok.encode(x), name="codes of float images")


def test_embeddings_and_logits_within_1e4(exported, seed):
    llm, _, rt, _, _ = exported
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, llm.tokenizer.codebook_size, (5, 32), generator=g)
    _assert_rel(rt.decode(codes.numpy()), llm.tokenizer.decode(codes), 1e-4, "embeddings")
    # prefill logits of a left-padded batch, against the transformers model run directly
    rows = [[llm.text_tokenizer.bos_token_id] + torch.randint(4, 50, (n,), generator=g).tolist() for n in (3, 9)]
    ids, mask, pos = rt._prefill(rows, 1)
    logits, _ = rt._lm_step(ids, mask, pos, rt._past(len(rows)))
    with torch.no_grad():
        ref = llm.model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)
        ).logits[:, -1]
    _assert_rel(logits, ref, 1e-4, "prefill logits")


def test_greedy_captions_and_answers_identical_token_for_token(exported, seed):
    llm, _, rt, _, _ = exported
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, llm.tokenizer.codebook_size, (4, 32), generator=g)
    rows = [llm.encode_turn(llm.template.caption, codes[i : i + 1]) for i in range(4)]
    assert rt.generate_ids(rows, max_new_tokens=12) == llm.generate_ids(rows, max_new_tokens=12)
    assert rt.caption(codes=codes.numpy(), max_new_tokens=12) == llm.caption(codes=codes, max_new_tokens=12)
    qs = ["what color is the shape on the right?", "how many shapes are on the left?", "what shape", "color"]
    assert rt.answer(questions=qs, codes=codes.numpy(), max_new_tokens=6) == llm.answer(
        codes=codes, questions=qs, max_new_tokens=6
    )


def _one_program(tokenizer, model, images, questions, texts):
    """The same calls, whichever API drives them: the torch objects or the runtime."""
    codes = tokenizer.encode(images)
    return {
        "codes": codes,
        "embeddings": tokenizer.decode(codes),
        "captions": model.caption(images, max_new_tokens=8),
        "prompted": model.caption(images, "a photo of", max_new_tokens=8),
        "answers": model.answer(images, questions, max_new_tokens=6),
        "one question": model.answer(images, questions[0], max_new_tokens=4),
        "generated": model.generate_image_codes(texts),
    }


def test_one_program_drives_the_runtime_and_the_torch_api(exported, seed):
    """The runtime's methods carry the torch API's names and argument order: one function calls
    either and gets the same codes, embeddings, captions, answers and generated codes; the 0.1
    names still work and warn."""
    llm, _, rt, _, _ = exported
    scenes, _ = sample_images(3, seed=seed % 1000, size=llm.tokenizer.config.vision.image_size)
    qs = ["what color is the shape on the right?", "how many shapes?", "what shape is left?"]
    texts = ["one red circle left of a blue square"]
    want = _one_program(llm.tokenizer, llm, scenes, qs, texts)
    got = _one_program(rt, rt, scenes, qs, texts)
    assert_equal(got["codes"], want["codes"], name="codes")
    _assert_rel(got["embeddings"], want["embeddings"], 1e-4, "embeddings")
    for key in ("captions", "prompted", "answers", "one question"):
        assert got[key] == want[key], key
    assert_equal(got["generated"], want["generated"], name="generated codes")
    x = torch.rand(2, 3, llm.tokenizer.config.vision.image_size, llm.tokenizer.config.vision.image_size)
    assert llm.caption(x, max_new_tokens=4) == rt.caption(x.numpy(), max_new_tokens=4)  # a tensor of images
    with pytest.warns(DeprecationWarning, match="tokenize is now SeedRuntime.encode"):
        assert_equal(rt.tokenize(scenes), want["codes"], name="0.1 name")
    with pytest.warns(DeprecationWarning, match="generate_codes is now"):
        rt.generate_codes(texts)
    with pytest.raises(RuntimeInputError, match="give the questions"):
        rt.answer(scenes)


def test_llm_export_uses_optimums_layout(exported, seed):
    """model.onnx with optimum's names (past_key_values.i.key in, present.i.key out, every position's
    logits) and beside it what transformers reads: the LM's config.json, generation_config.json and
    the text tokenizer. A greedy loop written against those conventions alone (names from the
    files, tokens from AutoTokenizer) gives SeedLLM's greedy tokens; so does optimum's
    ORTModelForCausalLM where optimum installs."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    llm, _, _, manifest, out = exported
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == llm.model.config.model_type and cfg.vocab_size == llm.model.config.vocab_size
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == llm.text_tokenizer.eos_token_id
    tok = AutoTokenizer.from_pretrained(out)
    text = "a photo of"
    assert tok(text)["input_ids"] == llm.text_tokenizer(text)["input_ids"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    layers = cfg.num_hidden_layers
    assert names_in == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]
    assert names_out == ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    # greedy decoding as optimum runs it: empty past first, every position's logits, the last one used
    ids = np.array([tok(text)["input_ids"]], dtype=np.int64)
    info = manifest["parts"]["llm"]
    past = {n: np.zeros((1, info["kv_heads"], 0, info["head_dim"]), np.float32) for n in names_in[3:]}
    mask, new = np.ones_like(ids), []
    step_ids, pos = ids, np.arange(ids.shape[1])[None]
    for _ in range(6):
        outs = sess.run(None, {"input_ids": step_ids, "attention_mask": mask, "position_ids": pos, **past})
        assert outs[0].shape == (1, step_ids.shape[1], cfg.vocab_size)
        nxt = int(outs[0][0, -1].argmax())
        new.append(nxt)
        past = dict(zip(names_in[3:], outs[1:]))
        step_ids = np.array([[nxt]], dtype=np.int64)
        pos = np.array([[mask.shape[1]]])
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    want = llm.generate_ids([ids[0].tolist()], max_new_tokens=6, suppress_image_tokens=False, stop_ids=())[0]
    assert new == want
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError:  # optimum-onnx pins transformers < 4.58: checked where it installs
        return
    model = ORTModelForCausalLM.from_pretrained(out)
    got = model.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert got[0, ids.shape[1] :].tolist() == want


def test_generated_codes_identical_with_and_without_guidance(exported):
    llm, _, rt, _, _ = exported
    texts = ["one red circle left of a blue square", "three green triangles left of a yellow circle"]
    assert_equal(rt.generate_image_codes(texts), llm.generate_image_codes(texts), name="greedy codes")
    assert_equal(
        rt.generate_image_codes(texts, cfg_scale=3.0),
        llm.generate_image_codes(texts, cfg_scale=3.0),
        name="guided codes",
    )


def test_denoising_loop_matches_the_pipeline_given_the_same_noise(exported, seed):
    llm, dec, rt, _, _ = exported
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(2, dec.image_embedding_dim, generator=g)
    noise = torch.randn(2, 3, 16, 16, generator=g)
    for guidance in (1.0, 2.5):
        ref = dec(emb, num_inference_steps=7, guidance_scale=guidance, latents=noise, output_type="np").images
        got = rt.render(emb.numpy(), steps=7, guidance=guidance, noise=noise.numpy())
        assert got.shape == (2, 16, 16, 3)
        assert_close(got, ref, atol=1e-4, rtol=0, name=f"images, guidance {guidance}")


def test_patch_decoder_exports_and_renders_like_the_pipeline(tmp_path, seed):
    """A patch-2 decoder (space-to-depth around the UNet) exports with pixel-space inputs, and the
    numpy loop draws what the pipeline draws from the same noise."""
    dec = mini_image_decoder(embed_dim=12, image_size=16, seed=seed % 1000, channels=(16, 32), patch=2)
    m = export_onnx(["decoder"], tmp_path, objects={"decoder": dec}, progress=False)
    assert m["parts"]["decoder"]["in_channels"] == 3 and m["parts"]["decoder"]["image_size"] == 16
    _renders_like_the_pipeline(dec, tmp_path, seed, (2, 3, 16, 16))


def _renders_like_the_pipeline(dec, folder, seed: int, noise_shape: tuple) -> SeedRuntime:
    """The runtime's numpy loop over the exported files draws what the pipeline draws from the same
    noise (guided, 5 DDIM steps); returns the runtime."""
    rt = SeedRuntime(folder, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    emb, noise = torch.randn(2, dec.image_embedding_dim, generator=g), torch.randn(*noise_shape, generator=g)
    ref = dec(emb, num_inference_steps=5, guidance_scale=2.0, latents=noise, output_type="np").images
    got = rt.render(emb.numpy(), steps=5, guidance=2.0, noise=noise.numpy())
    assert got.shape == (2, dec.image_size, dec.image_size, 3)
    assert_close(got, ref, atol=1e-4, rtol=0, name="images")
    return rt


def test_latent_decoder_exports_its_autoencoder_and_renders_like_the_pipeline(tmp_path, seed):
    """A latent decoder (UNet on autoencoder latents) exports the UNet at latent shape plus
    decoder_vae.onnx, and the numpy loop then the autoencoder draw what the pipeline draws."""
    from seed_fast.models.decoders.image_decoder import mini_autoencoder

    vae = mini_autoencoder(16, (8, 16), latent_channels=4, seed=seed % 1000)
    vae.register_to_config(scaling_factor=1.3)
    dec = mini_image_decoder(embed_dim=12, image_size=16, seed=seed % 1000, channels=(16, 32), vae=vae)
    m = export_onnx(["decoder"], tmp_path, objects={"decoder": dec}, progress=False)
    info = m["parts"]["decoder"]
    assert (info["in_channels"], info["latent_size"], info["image_size"], info["vae_file"]) == (
        4,
        8,
        16,
        "decoder_vae.onnx",
    )
    assert info["vae_scaling_factor"] == pytest.approx(1.3) and (tmp_path / "decoder_vae.onnx").is_file()
    assert m["reports"]["decoder"]["parity"]["decoder_vae_max_rel_err"] < 1e-4
    rt = _renders_like_the_pipeline(dec, tmp_path, seed, (2, 4, 8, 8))
    with pytest.raises(RuntimeInputError, match=r"noise must have shape \(2, 4, 8, 8\)"):
        rt.render(np.zeros((2, 12), np.float32), noise=np.zeros((2, 3, 16, 16), np.float32))


def test_text_to_image_end_to_end(exported):
    _, _, rt, _, _ = exported
    imgs = rt.generate_images(["two blue squares left of a red circle"], steps=3, seed=1)
    assert imgs.shape == (1, 16, 16, 3) and imgs.dtype == np.float32
    assert 0.0 <= imgs.min() and imgs.max() <= 1.0 and imgs.std() > 0


def test_external_data_and_fp16(tmp_path):
    llm = SeedLLM.from_config("tiny-llama", seed=4)
    m = export_onnx(
        ["llm", "detokenizer"],
        tmp_path,
        objects={"tokenizer": llm.tokenizer, "llm": llm},
        external_data=True,
        progress=False,
    )
    assert (tmp_path / "model.onnx.data").is_file() and (tmp_path / "image_detokenizer.onnx.data").is_file()
    assert "model.onnx.data" in m["reports"]["llm"]["files"]
    rt = SeedRuntime(tmp_path, providers=["CPUExecutionProvider"])
    codes = torch.randint(0, llm.tokenizer.codebook_size, (2, 32))
    assert rt.caption(codes=codes.numpy(), max_new_tokens=5) == llm.caption(codes=codes, max_new_tokens=5)
    # fp16: checked against torch at fp16's tolerance, runs on the CPU provider
    llm16 = SeedLLM.from_config("tiny-llama", seed=4)
    m16 = export_onnx(
        ["llm", "tokenizer"],
        tmp_path / "fp16",
        objects={"tokenizer": llm16.tokenizer, "llm": llm16},
        fp16=True,
        progress=False,
    )
    assert m16["fp16"] and m16["parts"]["llm"]["kv_dtype"] == "float16"
    assert m16["reports"]["llm"]["parity"]["max_rel_err"] <= 2e-2
    rt16 = SeedRuntime(tmp_path / "fp16", providers=["CPUExecutionProvider"])
    assert len(rt16.caption(codes=codes.numpy(), max_new_tokens=3)) == 2


def test_lora_is_merged_into_the_exported_weights(tmp_path, seed):
    llm = SeedLLM.from_config("tiny-llama", seed=6)
    llm.add_lora(True, fused=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero adapter, so merging changes the logits
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    codes = torch.randint(0, llm.tokenizer.codebook_size, (2, 32), generator=g)
    rows = [llm.encode_turn(llm.template.caption, codes[i : i + 1]) for i in range(2)]
    want = llm.generate_ids(rows, max_new_tokens=8)
    export_onnx(["llm"], tmp_path, objects={"llm": llm}, progress=False)
    assert not llm.has_lora
    assert SeedRuntime(tmp_path, providers=["CPUExecutionProvider"]).generate_ids(rows, max_new_tokens=8) == want


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(ExportError, match="unknown part"):
        export_onnx(["vae"], tmp_path, progress=False)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(["tokenizer"], tmp_path, opset=11, progress=False)
    with pytest.raises(ExportError, match="not a folder"):
        export_onnx(["tokenizer"], tmp_path, checkpoint=tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no SeedTokenizer folder"):
        export_onnx(["tokenizer"], tmp_path / "out", checkpoint=tmp_path / "empty", progress=False)
    with pytest.raises(ExportError, match="no SeedLLM folder"):
        export_onnx(["llm"], tmp_path / "out", checkpoint=tmp_path / "empty", progress=False)
    with pytest.raises(ExportError, match="image_dtype"):
        from seed_fast import SeedTokenizer

        export_onnx(
            ["tokenizer"],
            tmp_path / "out",
            objects={"tokenizer": SeedTokenizer.from_config("tiny")},
            image_dtype="int16",
            progress=False,
        )
