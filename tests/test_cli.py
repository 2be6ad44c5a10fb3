"""The `seed-fast` command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seed_fast import SeedTokenizer
from seed_fast.cli import main
from seed_fast.testing import assert_close, assert_equal


@pytest.fixture
def image_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate([(224, 224), (100, 60)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def checkpoint(tmp_path):
    tok = SeedTokenizer.from_config("tiny", seed=3, init="unit")
    tok.save_pretrained(tmp_path / "ckpt")
    return tok, str(tmp_path / "ckpt")


def test_tokenize_json_and_detokenize(image_files, checkpoint, tmp_path, capsys):
    tok, ckpt = checkpoint
    assert main(["tokenize", *image_files, "--checkpoint", ckpt, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["image"] for d in data] == image_files
    expect = tok.encode([Image.open(p) for p in image_files])
    assert [d["codes"] for d in data] == expect.tolist()

    codes_file = tmp_path / "codes.json"
    codes_file.write_text(json.dumps(data))
    out = tmp_path / "emb.npy"
    assert main(["detokenize", "--codes-file", str(codes_file), "--checkpoint", ckpt, "--out", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (2, tok.config.detokenizer.out_dim)
    assert_equal(emb, tok.decode(expect), name="detokenized embeddings")


def test_tokenize_text_output_and_detokenize_args(image_files, checkpoint, capsys):
    tok, ckpt = checkpoint
    assert main(["tokenize", image_files[0], "--checkpoint", ckpt]) == 0
    line = capsys.readouterr().out.strip()
    codes = [int(x) for x in line.split(":", 1)[1].split()]
    assert len(codes) == 32
    assert main(["detokenize", ",".join(map(str, codes)), "--checkpoint", ckpt]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["shape"] == [1, tok.config.detokenizer.out_dim]
    assert_close(got["embeddings"], tok.decode([codes]), atol=1e-6, rtol=1e-5, name="printed embeddings")


def test_cli_errors(image_files, checkpoint, tmp_path):
    _, ckpt = checkpoint
    with pytest.raises(SystemExit, match="no such image"):
        main(["tokenize", str(tmp_path / "missing.png"), "--checkpoint", ckpt])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="cannot read"):
        main(["tokenize", str(tmp_path / "bad.png"), "--checkpoint", ckpt])
    with pytest.raises(SystemExit, match="exactly 32 codes"):
        main(["detokenize", "1,2,3", "--checkpoint", ckpt])
    with pytest.raises(SystemExit, match="must be integers"):
        main(["detokenize", "1,x,3", "--checkpoint", ckpt])


def test_console_script_runs(image_files):
    out = subprocess.run(
        [sys.executable, "-m", "seed_fast.cli", "tokenize", image_files[0], "--json", "--config", "tiny"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "RANDOM weights" in out.stderr
    assert len(json.loads(out.stdout)[0]["codes"]) == 32


def test_every_command_defaults_to_the_embedded_model_and_warns_on_unlike_images(tmp_path, capsys):
    """tokenize, detokenize, caption and generate default to the embedded model (as demo, eval and
    export do) and take the same --checkpoint model folder; images unlike its training scenes
    (here a photograph-like noise image) get a warning naming the way out, its own scenes none."""
    import numpy as np
    from PIL import Image

    from seed_fast.default_model import DEFAULT_DIR, load_default
    from seed_fast.synthetic import sample_images

    m = load_default()
    scene = tmp_path / "scene.png"
    sample_images(1, seed=5, size=m.tokenizer.config.vision.image_size)[0][0].save(scene)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    assert main(["tokenize", str(scene), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["codes"] == m.tokenizer.encode([Image.open(scene)])[0].tolist()
    assert "warning" not in err and "RANDOM" not in err
    assert main(["tokenize", str(noise), "--checkpoint", str(DEFAULT_DIR), "--json"]) == 0  # the model folder
    assert "RANDOM" not in capsys.readouterr().err  # a given folder: no warning about the embedded model
    assert main(["tokenize", str(noise)]) == 0
    assert "1 of 1 image(s) look unlike the embedded model's training scenes" in capsys.readouterr().err
    assert main(["caption", str(noise), str(scene), "--max-new-tokens", "2"]) == 0
    assert "1 of 2 image(s) look unlike" in capsys.readouterr().err
    assert main(["detokenize", " ".join(["1"] * 32)]) == 0
    emb = json.loads(capsys.readouterr().out)["embeddings"]
    assert len(emb[0]) == m.tokenizer.decode([[1] * 32]).shape[-1]
    with pytest.raises(SystemExit, match="--checkpoint cannot be combined with --config"):
        main(["tokenize", str(scene), "--config", "tiny", "--checkpoint", str(DEFAULT_DIR)])
    with pytest.raises(SystemExit, match="give one of --checkpoint, --llm, --preset"):
        main(["caption", str(scene), "--llm", "default", "--preset", "tiny-llama"])


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_a_wrong_or_partial_checkpoint_is_a_clear_error(command, tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        main([command, "--checkpoint", str(tmp_path / "nope")])
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "recipe.json").write_text("{}")
    with pytest.raises(
        SystemExit,
        match=r"not a complete seed_fast model folder: "
        r"missing \['llm', 'decoder', 'itc', 'checker.safetensors', 'generation.json'\]",
    ):
        main([command, "--checkpoint", str(tmp_path)])


@pytest.mark.parametrize("command", ["demo", "eval"])
@pytest.mark.parametrize("value", ["0.5", "x"])
@pytest.mark.parametrize("flag", ["--cfg-scale", "--guidance"])
def test_a_bad_guidance_scale_is_refused_before_loading(command, value, flag, capsys):
    with pytest.raises(SystemExit):
        main([command, flag, value, "--checkpoint", "/nonexistent"])
    err = capsys.readouterr().err
    assert flag in err and ("must be a finite number >= 1" in err or "not a number" in err)


@pytest.mark.parametrize("extra, overwrite", [([], False), (["--overwrite"], True)])
def test_demo_keeps_an_earlier_report_unless_told_to_overwrite(tmp_path, monkeypatch, extra, overwrite):
    """`seed-fast demo --out DIR` passes --overwrite on (run_demo's own test shows what each setting does)."""
    import seed_fast.cli as cli
    import seed_fast.default_model.demo as demo

    seen = []
    monkeypatch.setattr(cli, "_load_model", lambda args: type("M", (), {"folder": "m"})())
    monkeypatch.setattr(demo, "run_demo", lambda m, out, **kw: seen.append((out, kw["overwrite"])))
    assert main(["demo", "--out", str(tmp_path / "d"), "--num-images", "1", *extra]) == 0
    assert seen == [(str(tmp_path / "d"), overwrite)]
