"""`seed-fast caption` and `seed-fast generate` on random tiny models and on a saved SeedLLM."""

import json

import pytest

pytest.importorskip("transformers")

from seed_fast.cli import main  # noqa: E402
from seed_fast.synthetic import sample_images  # noqa: E402


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, im in enumerate(sample_images(2, seed=3)[0]):
        paths.append(str(d / f"{i}.png"))
        im.save(paths[-1])
    return paths


def test_caption_and_question(image_files, capsys):
    assert main(["caption", *image_files, "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == image_files and all(isinstance(r["text"], str) for r in out)
    assert main(["caption", image_files[0], "--question", "what color?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(image_files[0] + ":")


def test_generate_tokens_only_and_images(tmp_path, capsys):
    assert main(["generate", "two red circles", "a blue square", "--out", str(tmp_path / "a"), "--tokens-only"]) == 0
    recs = json.loads((tmp_path / "a" / "codes.json").read_text())
    assert len(recs) == 2 and all(len(r["codes"]) == 32 for r in recs) and "image" not in recs[0]
    pytest.importorskip("diffusers")
    assert (
        main(["generate", "two red circles", "--out", str(tmp_path / "b"), "--steps", "2", "--sample", "--top-k", "20"])
        == 0
    )
    rec = json.loads((tmp_path / "b" / "codes.json").read_text())[0]
    assert (tmp_path / "b" / rec["image"]).exists()


def test_generate_on_the_embedded_model_with_guidance(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from PIL import Image

    from seed_fast.default_model import load_default

    texts = ["one red circle", "two blue squares"]
    out = tmp_path / "g"
    assert main(["generate", *texts, "--llm", "default", "--steps", "2", "--guidance", "2", "--out", str(out)]) == 0
    recs = json.loads((out / "codes.json").read_text())
    assert [r["text"] for r in recs] == texts
    size = load_default().decoder.image_size
    assert all(Image.open(out / r["image"]).size == (size, size) for r in recs)
    with pytest.raises(SystemExit, match="--lora cannot be combined with the embedded model"):
        main(["generate", "red", "--llm", "default", "--lora", str(tmp_path), "--out", str(out)])


def test_saved_model_and_errors(tmp_path, image_files, capsys):
    from seed_fast.models.llm.seed_llm import SeedLLM

    llm = SeedLLM.from_config("tiny-opt", seed=2)
    llm.save_pretrained(tmp_path / "m")
    assert main(["caption", image_files[0], "--llm", str(tmp_path / "m"), "--max-new-tokens", "3", "--json"]) == 0
    want = llm.caption([sample_images(2, seed=3)[0][0]], max_new_tokens=3)
    assert json.loads(capsys.readouterr().out)[0]["text"] == want[0]
    with pytest.raises(SystemExit, match="cannot load --llm"):
        main(["caption", image_files[0], "--llm", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--tokens-only"):
        main(["generate", "red", "--out", str(tmp_path / "o"), "--llm", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="no such image"):
        main(["caption", str(tmp_path / "nope.png")])
