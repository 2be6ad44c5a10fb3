"""Hugging Face conventions: models load by Hub id from a local Hugging Face cache (HF_HUB_OFFLINE=1,
the real huggingface_hub), with transformers' loading arguments, and the Auto classes know them."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")
pytest.importorskip("transformers")

from seed_fast import SeedTokenizer  # noqa: E402
from seed_fast.models.llm.seed_llm import SeedLLM  # noqa: E402
from seed_fast.testing import assert_equal  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def _cached_repo(cache: Path, repo_id: str, save, revisions: dict[str, str]) -> None:
    """A model repository laid out as huggingface_hub keeps it in its cache (refs -> snapshots)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for ref, commit in revisions.items():
        save(repo / "snapshots" / commit, ref)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    tok = SeedTokenizer.from_config("tiny", seed=0)
    old = SeedTokenizer.from_config("tiny", seed=1)
    _cached_repo(
        cache,
        "seed-org/tiny-tok",
        lambda d, ref: (tok if ref == "main" else old).save_pretrained(d),
        {"main": COMMIT, "v1": OLD},
    )
    llm = SeedLLM.from_config("tiny-llama", seed=7)
    _cached_repo(cache, "seed-org/tiny-llm", lambda d, ref: llm.save_pretrained(d), {"main": COMMIT})
    if importlib.util.find_spec("diffusers") is not None:
        from seed_fast.models.decoders.unclip import tiny_unclip_pipeline

        dim = llm.tokenizer.config.detokenizer.out_dim
        pipe = tiny_unclip_pipeline(embed_dim=dim, seed=0)
        _cached_repo(cache, "seed-org/tiny-unclip", lambda d, ref: pipe.save_pretrained(d), {"main": COMMIT})
    return cache, tok, old, llm


_SCRIPT = r"""
import json, sys, torch
from seed_fast import SeedLLM, SeedTokenizer
from transformers import AutoConfig, AutoModel
out = {}
tok = SeedTokenizer.from_pretrained("seed-org/tiny-tok")
out["tok_sum"] = float(sum(p.double().sum() for p in tok.parameters()))
old = SeedTokenizer.from_pretrained("seed-org/tiny-tok", revision="v1", torch_dtype="float16", device_map="auto")
out["old_dtype"] = str(old.dtype)
out["old_sum"] = float(sum(p.double().sum() for p in old.parameters()))
cfg = AutoConfig.from_pretrained("seed-org/tiny-tok")
out["auto_config"] = [type(cfg).__name__, cfg.model_type, cfg.tokenizer_config().name]
model = AutoModel.from_pretrained("seed-org/tiny-tok")
out["auto_model"] = type(model).__name__
llm = SeedLLM.from_pretrained("seed-org/tiny-llm", torch_dtype=torch.float64)
out["llm"] = [type(llm.model).__name__, str(llm.model.dtype), llm.tokenizer is not None, llm.vocab.num_codes]
try:
    import diffusers  # noqa: F401
    drawn = SeedLLM.from_pretrained("seed-org/tiny-llm", diffusion="seed-org/tiny-unclip")
    out["diffusion"] = type(drawn.diffusion).__name__
except ImportError:
    out["diffusion"] = None
for name, call in (("missing", lambda: SeedTokenizer.from_pretrained("seed-org/not-there")),
                   ("push", lambda: tok.push_to_hub("seed-org/new-repo"))):
    try:
        call()
        out[name] = "no error"
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def test_models_load_by_hub_id_from_the_cache_offline(hub_cache):
    cache, tok, old, llm = hub_cache
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    env.pop("HF_TOKEN", None)
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["tok_sum"] == pytest.approx(float(sum(p.double().sum() for p in tok.parameters())), rel=1e-12)
    want_old = float(sum(p.half().double().sum() for p in old.parameters()))  # revision v1, in fp16
    assert out["old_sum"] == pytest.approx(want_old, rel=1e-9)
    assert out["old_dtype"] == "torch.float16"  # revision v1, cast as asked
    assert out["auto_config"] == ["SeedTokenizerConfig", "seed_tokenizer", tok.config.name]
    assert out["auto_model"] == "SeedTokenizer"
    assert out["llm"] == [type(llm.model).__name__, "torch.float64", True, llm.vocab.num_codes]
    if importlib.util.find_spec("diffusers") is not None:
        assert out["diffusion"] == "SeedUnCLIPPipeline"  # the diffusion pipeline by its Hub id too
    assert out["missing"][0] == "FileNotFoundError" and "could not be fetched" in out["missing"][1]
    assert out["push"] != "no error" and "offline" in (out["push"][0] + out["push"][1]).lower(), out["push"]


def test_loading_arguments_behave_as_in_transformers(tmp_path, seed):
    tok = SeedTokenizer.from_config("tiny", seed=seed % 1000)
    folder = tok.save_pretrained(tmp_path / "tok")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model_type"] == "seed_tokenizer"
    again = SeedTokenizer.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map="cpu")
    assert again.dtype == torch.bfloat16 and again.device.type == "cpu"
    assert SeedTokenizer.from_pretrained(folder, dtype="auto").dtype == torch.float32
    nested = tok.save_pretrained(tmp_path / "repo" / "tokenizer")
    sub = SeedTokenizer.from_pretrained(nested.parent, subfolder="tokenizer")
    assert_equal(sub.quantizer.codebook.weight, tok.quantizer.codebook.weight, name="subfolder")
    for kwargs, error, match in (
        (dict(device_map={"vision": "cpu"}), ValueError, "per-module device_map"),
        (dict(torch_dtype="float16", dtype="float32"), ValueError, "disagree"),
        (dict(torch_dtype="float17"), ValueError, "unknown dtype"),
        (dict(device="cpu", device_map="cpu"), ValueError, "not both"),
        (dict(colour="red"), TypeError, "unexpected arguments"),
    ):
        with pytest.raises(error, match=match):
            SeedTokenizer.from_pretrained(folder, **kwargs)
    with pytest.raises(FileNotFoundError, match="no tokenizer folder at"):
        SeedTokenizer.from_pretrained(tmp_path / "missing")
