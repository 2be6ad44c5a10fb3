"""A user's mistake on the command line ends in one line naming it (exit status 1 or 2), never a traceback."""

import json
import re

import pytest

from seed_fast.cli import main
from seed_fast.synthetic import sample_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    sample_images(1, seed=1)[0][0].save(d / "ok.png")
    (d / "bad.png").write_bytes(b"not an image")
    (d / "codes.json").write_text("{not json")
    from seed_fast import SeedTokenizer

    SeedTokenizer.from_config("tiny", seed=1).save_pretrained(d / "typo")
    cfg = json.loads((d / "typo" / "config.json").read_text())
    cfg["config"]["qformer"]["heads"] = "8"  # a hand edit that quoted a number
    (d / "typo" / "config.json").write_text(json.dumps(cfg))
    return d


CASES = [
    (["tokenize", "{d}/ok.png", "--checkpoint", "{d}/nope"], "no tokenizer folder"),
    (["tokenize", "{d}/ok.png", "--official", "{d}/nope.pt", "{d}/nope.pth"], "checkpoint not found"),
    (["tokenize", "{d}/ok.png", "--config", "nosuch"], "unknown tokenizer preset 'nosuch'"),
    (["tokenize", "{d}/ok.png", "--config", "tiny", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["tokenize", "{d}/ok.png", "--config", "tiny", "--device", "cuda:7"], "--device: cuda:7"),
    (["tokenize", "{d}/ok.png", "--config", "tiny", "--device", "toaster"], "--device: not a torch device"),
    (["tokenize", "{d}/bad.png", "--config", "tiny"], "cannot read .*bad.png as an image"),
    (["tokenize", "{d}/ok.png", "--checkpoint", "{d}/typo"], "qformer.heads must be an integer, got '8'"),
    (["detokenize", "--codes-file", "{d}/nope.json", "--config", "tiny"], "nope.json"),
    (["caption", "{d}/ok.png", "--preset", "nosuch"], "unknown LM preset 'nosuch'"),
    (["caption", "{d}/ok.png", "--template", "nosuch"], "unknown prompt template 'nosuch'"),
    (["caption", "{d}/ok.png", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["generate", "red", "--steps", "0", "--out", "{d}/g"], "--steps: must be >= 1, got 0"),
    (["generate", "red", "--num-beams", "x", "--out", "{d}/g"], "--num-beams: not an integer: 'x'"),
    (["eval", "--n", "0"], "--n: must be >= 1, got 0"),
    (["demo", "--num-images", "-1"], "--num-images: must be >= 0"),
    (["demo", "--num-images", "0", "--out", "{d}/demo"], "nothing to show"),
    (["demo", "{d}/bad.png", "--num-images", "1", "--out", "{d}/demo"], "cannot identify image file"),
    (["train", "stage2", "--config", "{d}/nope.json"], "config file not found"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:3]) for a, _ in CASES])
def test_user_errors_are_one_line(files, capsys, argv, message):
    argv = [a.format(d=files) for a in argv]
    try:
        code = main(argv)
        text = capsys.readouterr().err
    except SystemExit as e:
        code = e.code
        text = e.code if isinstance(e.code, str) else capsys.readouterr().err
    assert code not in (0, None), f"{argv} succeeded"
    assert "Traceback" not in text
    assert re.search(message, text), text


def test_tracebacks_on_request(files, monkeypatch):
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        main(["tokenize", f"{files}/ok.png", "--config", "nosuch", "--debug"])
    monkeypatch.setenv("SEED_FAST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        main(["tokenize", f"{files}/ok.png", "--config", "nosuch"])


def test_a_good_image_still_works(files, capsys):
    assert main(["tokenize", f"{files}/ok.png", "--config", "tiny", "--json"]) == 0
    assert '"codes": [' in capsys.readouterr().out


def test_cuda_on_a_cpu_build_of_torch_is_one_line(files, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit) as e:
        main(["tokenize", f"{files}/ok.png", "--config", "tiny", "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "--device: cuda: this torch is a CPU build; use --device cpu" in err, err
