"""The config's training and evaluation data: `make_source(cfg, split)` builds the dataset of
`cfg.data` (map-style sources from `data.py`, streaming ones from `streaming.py`) and its held-out
split."""

from __future__ import annotations

import glob
import json
from dataclasses import asdict

import torch

from .config import STREAMING_KINDS
from .data import FolderPairs, SyntheticPairs, TarShards
from .streaming import HFDatasetPairs, WebDatasetPairs, key_held_out


def make_source(cfg, split: str, head: int | None = None):
    """The config's dataset for split "train" or "val". Synthetic data has its own held-out pairs;
    folder / tar data takes `data.val_index` / `data.val_shards`, or holds out `data.val_fraction`
    of its samples (the same ones every run, never trained on); with none of them, "val" is the
    training data itself, so evaluation measures fit, not transfer.

    Streaming kinds (webdataset, hf) give an iterable dataset for "train", and a list of the first
    `head` (default `data.val_n`) samples of one unshuffled pass for "val" or when `head` is given."""
    d = cfg.data
    if d.kind in STREAMING_KINDS:
        return _streaming_source(cfg, split, head)
    if d.kind == "synthetic":
        qa = cfg.stage == "llm" and cfg.llm.mode == "instruct"
        return SyntheticPairs(d.n if split == "train" else d.val_n, seed=d.seed, size=d.image_size, split=split, qa=qa)
    if split == "val" and d.val_index:
        return FolderPairs(d.val_index)
    if split == "val" and d.val_shards:
        return TarShards(_expand(d.val_shards))
    full = FolderPairs(d.index) if d.kind == "folder" else TarShards(_expand(d.shards))
    if not d.val_fraction:
        return full
    held = held_out(len(full), d.val_fraction, d.seed)
    keep = [i for i in range(len(full)) if held[i] == (split == "val")]
    if not keep:
        raise ValueError(f"data.val_fraction {d.val_fraction} leaves the {split} split of {len(full)} samples empty")
    return torch.utils.data.Subset(full, keep)


def _streaming_source(cfg, split: str, head: int | None):
    d = cfg.data
    kw = {"seed": d.seed, "shuffle_buffer": d.shuffle_buffer}

    def build(own_val: bool, **more):
        if d.kind == "webdataset":
            return WebDatasetPairs(d.val_shards if own_val else d.shards, **kw, **more)
        return HFDatasetPairs(
            d.hf_dataset,
            name=d.hf_config,
            data_files=d.hf_data_files,
            split_name=d.hf_val_split if own_val else d.hf_split,
            image_column=d.image_column,
            caption_column=d.caption_column,
            revision=d.hf_revision,
            **kw,
            **more,
        )

    own_val = bool(d.val_shards if d.kind == "webdataset" else d.hf_val_split)

    def source():
        if split == "val" and own_val:
            return build(True)
        if d.val_fraction:
            return build(False, split=split, held_out=(d.val_fraction, d.seed))
        return build(False)

    if split == "train" and head is None:
        return source()
    n = d.val_n if head is None else head
    key = (json.dumps(asdict(d), sort_keys=True), split, n)
    if key not in _HEADS:  # evaluation takes the same samples every time: read them once
        while len(_HEADS) >= 4:
            _HEADS.pop(next(iter(_HEADS)))
        _HEADS[key] = source().head(n)
    return list(_HEADS[key])


_HEADS: dict = {}


def _expand(patterns: list[str]) -> list[str]:
    return sorted({p for pattern in patterns for p in (glob.glob(pattern) or [pattern])})


def held_out(n: int, fraction: float, seed: int) -> list[bool]:
    """Which of n samples a held-out split of `fraction` takes: a hash of (seed, position), so the
    choice depends on nothing else (not on the order samples are read in, the ranks or the workers)."""
    return [key_held_out(str(i), fraction, seed) for i in range(n)]
