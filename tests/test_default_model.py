"""The embedded default model's machinery: the recipe's stages on a tiny budget produce a folder that
loads, evaluates and runs the demo (report + grid); the caption parser; the checker's verdicts."""

import copy
import json
import random

import pytest
import torch

pytest.importorskip("diffusers")

from seed_fast.default_model import DefaultModelError, check_folder, load_default  # noqa: E402
from seed_fast.default_model import recipe as recipe_mod  # noqa: E402
from seed_fast.default_model.checker import HEADS, SceneChecker  # noqa: E402
from seed_fast.synthetic import make_scene, parse_caption  # noqa: E402


def test_caption_parser_reads_back_every_scene_and_refuses_the_rest():
    rng = random.Random(11)
    for _ in range(300):
        _, caption, facts = make_scene(rng, 64)
        assert parse_caption(caption) == facts
        assert parse_caption(caption.upper() + ".") == facts
    for bad in (
        "",
        "one red circles left of a blue square",
        "two red circle left of a blue square",
        "one pink circle left of a blue square",
        "one red circle right of a blue square",
        "four red circles left of a blue square",
        "one red circle left of a blue",
    ):
        assert parse_caption(bad) is None, bad


def test_checker_judges_every_object_fact():
    m = SceneChecker()
    facts = [{"left_color": "red", "left_shape": "circle", "count": 2, "right_color": "blue", "right_shape": "square"}]
    pred = m.predict(torch.rand(1, 3, 64, 64))[0]
    assert set(pred) == set(HEADS) and all(pred[k] in HEADS[k] for k in HEADS)
    row = m.judge(torch.rand(1, 3, 64, 64), facts)[0]
    assert row["objects_ok"] == all(row[k] for k in ("left_color", "left_shape", "right_color", "right_shape"))
    with pytest.raises(ValueError, match="2 images but 1 fact sets"):
        m.judge(torch.rand(2, 3, 32, 32), facts)


def _tiny_recipe(latent: bool = False):
    r = copy.deepcopy(recipe_mod.RECIPE) if latent else recipe_mod.with_pixel_decoder()
    r["data"] = {"kind": "synthetic", "n": 64, "val_n": 8, "image_size": 64, "seed": 0}
    for name in recipe_mod.stages_of(r):
        if name == "checker":
            continue
        r[name].update(steps=2, global_batch=8)
        r[name]["optim"]["warmup"] = 0
    r["llm"]["llm"].update(model="tiny-llama", eval_n=2)
    r["lora"]["llm"].update(eval_n=2)
    r["stage2"]["stage2"]["codebook_init"] = "uniform"  # k-means needs 4096 vectors: more than 2 tiny batches give
    r["decoder"]["decoder"]["image_size"] = 16
    if latent:
        r["vae"]["vae"]["image_size"] = 16
    r["checker"] = {"steps": 3, "batch": 8, "seed": 7}
    return r


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("recipe")
    recipe = _tiny_recipe()
    metrics = {name: recipe_mod.run_stage(name, work, recipe, progress=False) for name in recipe_mod.stages_of(recipe)}
    assert "vae" not in metrics  # --decoder pixel: version 6's decoder
    dest = recipe_mod.install(work, work / "model", metrics, recipe)
    return work, dest


def test_the_recipe_skips_finished_stages(tiny_model, capsys):
    work, _ = tiny_model
    again = recipe_mod.run_stage("stage1", work, _tiny_recipe(), progress=False)
    assert "done already" in capsys.readouterr().out and "seconds" in again


def test_the_recipe_runs_its_two_branches_at_once_and_installs(tmp_path):
    """--jobs 2: stage I and II here, then (llm, lora, checker) and (vae, decoder) as two processes of one
    thread each, on the recipe file given (it holds a vae stage); the installed folder is a latent decoder's."""
    recipe = recipe_mod.for_this_machine("fp32", _tiny_recipe(latent=True))
    (tmp_path / "tiny.json").write_text(json.dumps(recipe))
    work, dest = tmp_path / "work", tmp_path / "model"
    assert (
        recipe_mod.main(
            [
                "--work",
                str(work),
                "--recipe",
                str(tmp_path / "tiny.json"),
                "--jobs",
                "2",
                "--no-progress",
                "--install",
                "--dest",
                str(dest),
            ]
        )
        == 0
    )
    assert all((work / n / "DONE").is_file() for n in recipe_mod.ORDER)
    logs = sorted(p.name for p in (work / "logs").iterdir())
    assert logs == ["llm_lora_checker.log", "vae_decoder.log"]
    assert json.loads((work / "recipe.json").read_text()) == recipe  # what the two processes ran
    shipped = json.loads((dest / "recipe.json").read_text())
    assert shipped["metrics"]["run"]["jobs"] == 2 and shipped["metrics"]["run"]["wall_seconds"] > 0
    assert set(recipe_mod.ORDER) <= set(shipped["metrics"])
    m = load_default(dest)
    assert m.decoder.vae is not None and m.decoder.image_size == 16


def test_a_failing_branch_stops_the_recipe_and_names_its_log(tmp_path):
    recipe = recipe_mod.for_this_machine("fp32", _tiny_recipe(latent=True))
    recipe["decoder"]["decoder"]["channels"] = [12]  # refused when the decoder stage reads its config
    (tmp_path / "bad.json").write_text(json.dumps(recipe))
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match=r"vae -> decoder failed .*vae_decoder\.log(.|\n)*decoder.channels"):
        recipe_mod.main(["--work", str(work), "--recipe", str(tmp_path / "bad.json"), "--jobs", "2", "--no-progress"])
    assert (work / "vae" / "DONE").is_file() and not (work / "decoder" / "DONE").exists()
    with pytest.raises(SystemExit):
        recipe_mod.main(["--work", str(work), "--recipe", str(tmp_path / "missing.json")])
    del recipe["lora"]
    (tmp_path / "nolora.json").write_text(json.dumps(recipe))
    with pytest.raises(SystemExit):
        recipe_mod.main(["--work", str(work), "--recipe", str(tmp_path / "nolora.json")])


def test_the_recipe_has_the_vae_stage_and_the_pixel_option_drops_it(monkeypatch):
    """Version 7: RECIPE trains a latent decoder on the vae stage's autoencoder, two jobs on a CPU-only
    machine; --decoder pixel (with_pixel_decoder) is version 6's decoder, one job."""
    recipe = recipe_mod.RECIPE
    pixel = recipe_mod.with_pixel_decoder()
    assert recipe_mod.stages_of(recipe) == list(recipe_mod.ORDER) and "vae" not in pixel
    assert recipe["vae"]["vae"]["channels"] == [32, 64] and recipe["vae"]["vae"]["image_size"] == 32
    assert recipe_mod.with_latent_decoder(pixel) == recipe and "vae" in recipe_mod.RECIPE  # a copy each time
    assert recipe_mod.branches_of(pixel) == [("llm", "lora", "checker"), ("decoder",)]
    assert recipe_mod.branches_of(recipe) == [("llm", "lora", "checker"), ("vae", "decoder")]
    from pathlib import Path

    cfg = recipe_mod.stage_config("decoder", Path("/w"))
    assert (
        cfg["decoder"]["vae"] == "/w/vae/vae"
        and "vae" not in recipe_mod.stage_config("decoder", Path("/w"), pixel)["decoder"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipe_mod._default_jobs(recipe) == (2 if (__import__("os").cpu_count() or 1) >= 2 else 1)
    assert recipe_mod._default_jobs(pixel) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert recipe_mod._default_jobs(recipe) == 1


def test_the_decoder_option_adds_or_drops_the_vae_stage_of_a_recipe_file(tmp_path, monkeypatch):
    """--decoder pixel on a file with a vae stage runs without it; --decoder latent adds it to one without;
    with neither, the file is run as it is."""
    ran = []
    monkeypatch.setattr(recipe_mod, "run_stage", lambda name, work, recipe, progress: ran.append((name, recipe)) or {})
    recipe = recipe_mod.for_this_machine("fp32", _tiny_recipe(latent=True))
    pixel = recipe_mod.with_pixel_decoder(recipe)
    (tmp_path / "latent.json").write_text(json.dumps(recipe))
    (tmp_path / "pixel.json").write_text(json.dumps(pixel))
    added = recipe_mod.with_latent_decoder(pixel)  # RECIPE's vae stage
    assert added["vae"] == recipe_mod.RECIPE["vae"] and added["decoder"] == pixel["decoder"]
    for file, option, expect in [
        ("latent.json", "pixel", pixel),
        ("pixel.json", "latent", added),
        ("pixel.json", None, pixel),
        ("latent.json", None, recipe),
    ]:
        ran.clear()
        argv = ["--work", str(tmp_path / "w"), "--recipe", str(tmp_path / file), "--jobs", "1", "--no-progress"]
        assert recipe_mod.main(argv + (["--decoder", option] if option else [])) == 0
        assert [n for n, _ in ran] == recipe_mod.stages_of(expect) and all(r == expect for _, r in ran), (file, option)


def test_the_recipe_picks_fp32_where_bf16_is_slow(monkeypatch):
    before = copy.deepcopy(recipe_mod.RECIPE)
    bf16_stages = {k for k, v in before.items() if isinstance(v, dict) and v.get("precision") == "bf16"}
    assert bf16_stages == {"llm", "lora", "decoder"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for fast, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(recipe_mod, "cpu_has_fast_bf16", lambda fast=fast: fast)
        r = recipe_mod.for_this_machine("auto")
        assert {r[k]["precision"] for k in bf16_stages} == {want}
        assert "precision" not in r["stage1"] and "precision" not in r["stage2"]
    assert {recipe_mod.for_this_machine("fp32")[k]["precision"] for k in bf16_stages} == {"fp32"}
    assert {recipe_mod.for_this_machine("bf16")[k]["precision"] for k in bf16_stages} == {"bf16"}
    assert recipe_mod.RECIPE == before  # a copy: the module's recipe is left alone
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        recipe_mod.for_this_machine("fp16")


def test_both_llm_stages_share_one_code_cache(tiny_model):
    work, _ = tiny_model
    shared = work / "codes" / "train.pt"
    assert shared.is_file() and not (work / "llm" / "codes").exists() and not (work / "lora" / "codes").exists()
    # written by the LLM stage, only read by the LoRA stage that ran after it
    assert shared.stat().st_mtime <= (work / "llm" / "DONE").stat().st_mtime


def test_the_installed_folder_loads_evaluates_and_demos(tiny_model, tmp_path):
    from seed_fast.default_model.demo import evaluate, run_demo

    _, dest = tiny_model
    m = load_default(dest)
    assert m.tokenizer.config.name == "mini" and m.decoder.image_size == 16
    for f in dest.rglob("*.safetensors"):  # shipped in half precision
        from safetensors.torch import load_file

        assert all(v.dtype != torch.float32 for v in load_file(str(f)).values()), f
    for cfg in (dest / "llm").rglob("adapter_config.json"):  # no path of the training machine ships
        assert json.loads(cfg.read_text())["base_model_name_or_path"] is None
        assert not (cfg.parent / "README.md").exists()
    metrics = evaluate(m, 4, n_gen=2, steps=2, progress=False)
    assert (metrics["n"], metrics["n_generation"]) == (4, 2)
    for key, n in (
        ("retrieval_i2t_r1", 4),
        ("caption_objects_ok", 4),
        ("answer_exact", 4),
        ("generation_objects_ok", 2),
        ("reconstruction_objects_ok", 2),
    ):  # each a count of scenes over the scenes evaluated
        hits = metrics[key] * n
        assert 0 <= round(hits) <= n and hits == pytest.approx(round(hits)), (key, metrics[key])
    assert metrics["code_cfg_scale"] == 2.0 and metrics["decoder_guidance"] == 1.5
    seen_g, render = [], m.render

    def spy_render(*args, **kwargs):  # the decoder's guidance reaches the pipeline, the default included
        seen_g.append(kwargs.get("guidance"))
        return render(*args, **kwargs)

    m.render = spy_render
    try:
        evaluate(m, 2, steps=1, guidance=1.25, progress=False)
    finally:
        m.render = render
    assert seen_g == [1.25, 1.25]
    seen, original = [], m.llm.generate_image_embeddings

    def spy(*args, **kwargs):  # the scale reaches the LLM's code generation
        seen.append(kwargs.get("cfg_scale"))
        return original(*args, **kwargs)

    m.llm.generate_image_embeddings = spy
    try:
        assert evaluate(m, 2, steps=1, cfg_scale=1.5, progress=False)["code_cfg_scale"] == 1.5
    finally:
        m.llm.generate_image_embeddings = original
    assert seen == [1.5]
    with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
        evaluate(m, 2, steps=1, cfg_scale=0.5, progress=False)
    with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
        run_demo(m, tmp_path / "bad", cfg_scale=0.0, progress=False)
    with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
        run_demo(m, tmp_path / "bad", cfg_scale=float("nan"), progress=False)
    assert not (tmp_path / "bad").exists()
    out = run_demo(m, tmp_path / "demo", n_images=2, eval_n=4, steps=2, progress=False)
    assert (tmp_path / "demo" / "report.html").read_text().count("<img") >= 2 + 2 + 4
    assert (tmp_path / "demo" / "grid.png").stat().st_size > 0 and "generation_objects_ok" in out
    # a second run keeps the first report and writes beside it; --overwrite replaces it
    first = {f: (tmp_path / "demo" / f).read_bytes() for f in ("report.html", "grid.png", "metrics.json")}
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    run_demo(m, tmp_path / "demo", n_images=1, eval_n=2, steps=1, progress=False)
    assert {f: (tmp_path / "demo" / f).read_bytes() for f in first} == first
    assert (tmp_path / "demo-2" / "report.html").is_file()
    run_demo(m, tmp_path / "demo", n_images=1, eval_n=2, steps=1, progress=False, overwrite=True)
    assert (tmp_path / "demo" / "report.html").read_bytes() != first["report.html"]
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine" and not (tmp_path / "demo-3").exists()


def test_partial_folders_are_refused(tiny_model, tmp_path):
    import shutil

    _, dest = tiny_model
    part = tmp_path / "partial"
    shutil.copytree(dest, part)
    shutil.rmtree(part / "decoder")
    with pytest.raises(DefaultModelError, match=r"missing \['decoder'\]"):
        check_folder(part)
    with pytest.raises(DefaultModelError, match="not a folder"):
        load_default(tmp_path / "absent")


def test_install_replaces_only_an_earlier_model_folder(tiny_model, tmp_path):
    work, dest = tiny_model
    metrics = json.loads((dest / "recipe.json").read_text())["metrics"]
    recipe = _tiny_recipe()
    # a folder with the user's own files is left as it is
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DefaultModelError, match=r"holds files a model folder does not \(notes.txt\)"):
        recipe_mod.install(work, mine, metrics, recipe)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "mine.tmp").exists()
    # and the command line says so before it trains anything
    with pytest.raises(SystemExit):
        recipe_mod.main(["--work", str(work), "--install", "--dest", str(mine), "--no-progress"])
    assert (mine / "notes.txt").read_text() == "keep me"
    # an earlier model folder is replaced; so is an empty folder
    again = recipe_mod.install(work, tmp_path / "model", metrics, recipe)
    (again / "recipe.json").write_text("{}")
    recipe_mod.install(work, again, metrics, recipe)
    assert json.loads((again / "recipe.json").read_text())["metrics"] == metrics
    assert not (tmp_path / "model.old").exists() and not (tmp_path / "model.tmp").exists()
    (tmp_path / "empty").mkdir()
    recipe_mod.install(work, tmp_path / "empty", metrics, recipe)
    assert (tmp_path / "empty" / "recipe.json").is_file()
