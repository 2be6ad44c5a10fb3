"""What the frozen-LM connectors (Flamingo, VW-LMM) share: the frozen LM, the image features they
read, and loading a trained connector's folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..llm.seed_llm import SeedLLM
from ..preprocess import normalize
from ..seed.tokenizer import SeedTokenizer

IGNORE = -100  # label of the tokens without a loss (prompt, image, padding)


def load_frozen_lm(folder: str, *, dtype=torch.float32):
    """A SeedLLM (or transformers causal-LM) folder -> the SeedLLM with any LoRA merged, frozen, eval."""
    llm = SeedLLM.from_pretrained(folder, dtype=dtype)
    llm.tokenizer = llm.diffusion = None
    llm.merge_lora()
    llm.model.requires_grad_(False).eval()
    return llm


def media_features(tok, pixels: torch.Tensor, media: str) -> torch.Tensor:
    """pixels (B, 3, S, S) in [0, 1] -> the frozen media features the connector reads, float32."""
    x = normalize(pixels.to(tok.device), tok.config.image_mean, tok.config.image_std).to(tok.dtype)
    if media == "vit":
        return tok.image_features(x).float()
    if media == "qformer":
        return tok.causal_embeddings(x).float()
    raise ValueError(f"media must be 'vit' or 'qformer', got {media!r}")


def open_connector_run(folder: str | Path, stage: str, weights: str):
    """A frozen-LM connector stage's export (`run/<stage>` or the run folder itself) -> (its folder,
    meta, the frozen SeedLLM, the frozen SeedTokenizer it read its media from). Names what is missing."""
    root = Path(folder)
    if (root / stage).is_dir():
        root = root / stage
    need = [f for f in (weights, "config.json") if not (root / f).is_file()]
    if need:
        raise FileNotFoundError(f"{str(root)!r} is not a {stage} stage output: missing {need}")
    meta = json.loads((root / "config.json").read_text())
    llm = load_frozen_lm(meta["lm"])
    tok = SeedTokenizer.from_pretrained(meta["vit_from"]).float().eval().requires_grad_(False)
    return root, meta, llm, tok


def load_exact(module: nn.Module, path: Path, what: str) -> None:
    """Load a safetensors file into `module`, refusing any missing or unexpected key."""
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path.parent}: {what} weights do not fit its config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
