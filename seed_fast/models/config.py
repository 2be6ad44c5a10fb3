"""Dataclass configs and named presets for the SEED tokenizer.

`seed-tokenizer-2` is the released architecture (SEED_SPEC.md section 1); `tiny` keeps the same
structure (EVA-style ViT, 32-query causal Q-Former with cross-attention every 2nd layer, quantizer,
timm-block de-tokenizer) at small widths for tests and the CPU demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """EVA-CLIP ViT as used by BLIP-2 (no final norm; `ln_vision` follows in the tokenizer)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_hidden: int = 6144
    ln_eps: float = 1e-6

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former (BERT-base layout) with causal self-attention among the queries."""

    num_queries: int = 32
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    cross_attention_freq: int = 2
    ln_eps: float = 1e-12
    # None follows upstream: causal exactly when there are 32 queries.
    causal: bool | None = None

    @property
    def is_causal(self) -> bool:
        return self.num_queries == 32 if self.causal is None else self.causal


@dataclass
class QuantizerConfig:
    """`encode_task_layer` -> nearest code (squared L2) -> `decode_task_layer`."""

    codebook_size: int = 8192
    code_dim: int = 32
    beta: float = 0.25


@dataclass
class DetokenizerConfig:
    """Codes -> generation embedding.

    kind:
      "mlp"              released v2 head: `blocks_image` + `image_down` MLP -> flatten ->
                         `distill_image_proj` -> (B, out_dim)
      "reverse_qformer"  a reverse Q-Former with `rq_queries` learned queries cross-attending to the
                         decoded 32 embeddings -> Linear(hidden, out_dim); 1 query gives (B, out_dim),
                         more give (B, rq_queries, out_dim) (SEED v1: 77 x 768).
    """

    kind: str = "mlp"
    depth: int = 4
    heads: int = 12
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    down_dims: tuple[int, ...] = (256, 128, 32)
    out_dim: int = 1024
    # training-only head that reconstructs the causal embeddings (`pos_embed` + `blocks`)
    reconstruction_blocks: bool = True
    rq_queries: int = 1
    rq_layers: int = 4
    rq_cross_attention_freq: int = 1


@dataclass
class TokenizerConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    detokenizer: DetokenizerConfig = field(default_factory=DetokenizerConfig)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        # Accept nested dicts (from config.json) as well as dataclasses.
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, f"{name}"))
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.validate()

    def validate(self) -> None:
        v, q, z, d = self.vision, self.qformer, self.quantizer, self.detokenizer
        problems = []
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                problems.append(f"{name} must be an object of fields, got {type(section).__name__}")
            else:
                problems += _field_problems(section, name)
        if problems:  # the checks below assume the right types
            raise ValueError("invalid TokenizerConfig: " + "; ".join(problems))
        if v.image_size % v.patch_size:
            problems.append(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.width % v.heads:
            problems.append(f"vision.width {v.width} is not divisible by vision.heads {v.heads}")
        if q.hidden % q.heads:
            problems.append(f"qformer.hidden {q.hidden} is not divisible by qformer.heads {q.heads}")
        if q.cross_attention_freq < 1:
            problems.append("qformer.cross_attention_freq must be >= 1")
        if z.codebook_size < 1 or z.code_dim < 1:
            problems.append("quantizer.codebook_size and code_dim must be >= 1")
        if d.kind not in ("mlp", "reverse_qformer"):
            problems.append(f"detokenizer.kind must be 'mlp' or 'reverse_qformer', got {d.kind!r}")
        if q.hidden % d.heads:
            problems.append(f"qformer.hidden {q.hidden} is not divisible by detokenizer.heads {d.heads}")
        if d.kind == "mlp" and not d.down_dims:
            problems.append("detokenizer.down_dims must not be empty for kind 'mlp'")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            problems.append("image_mean and image_std need 3 values")
        if problems:
            raise ValueError("invalid TokenizerConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        return _from_dict(cls, data, "config")

    def replace(self, **changes: Any) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)


_SECTIONS = {
    "vision": VisionConfig,
    "qformer": QFormerConfig,
    "quantizer": QuantizerConfig,
    "detokenizer": DetokenizerConfig,
}


# integer fields that may be 0 (everything else counted must be >= 1)
_MAY_BE_ZERO = {("detokenizer", "depth")}
# float fields that may be 0 (the others must be > 0)
_FLOAT_MAY_BE_ZERO = {("quantizer", "beta")}


def _field_problems(section, where: str) -> list[str]:
    """Each field of a config section against its annotation: the type, and the range a size has."""
    import math
    import typing

    hints = typing.get_type_hints(type(section))
    problems = []
    for f in dataclasses.fields(section):
        value, kind, name = getattr(section, f.name), hints[f.name], f"{where}.{f.name}"
        if kind is int:
            low = 0 if (where, f.name) in _MAY_BE_ZERO else 1
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be an integer, got {value!r}")
            elif value < low:
                problems.append(f"{name} must be >= {low}, got {value}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
            elif value < 0 or (value == 0 and (where, f.name) not in _FLOAT_MAY_BE_ZERO):
                problems.append(f"{name} must be > 0, got {value}")
        elif kind is bool and not isinstance(value, bool):
            problems.append(f"{name} must be true or false, got {value!r}")
        elif kind == (bool | None) and value is not None and not isinstance(value, bool):
            problems.append(f"{name} must be true, false or null, got {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"{name} must be a string, got {value!r}")
        elif kind == tuple[int, ...] and not (
            isinstance(value, tuple) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)
        ):
            problems.append(f"{name} must be a list of integers >= 1, got {value!r}")
    return problems


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) in {where}: {unknown}; known: {sorted(known)}")
    kwargs = dict(data)
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    return cls(**kwargs)


def _seed_tokenizer_2() -> TokenizerConfig:
    return TokenizerConfig(name="seed-tokenizer-2")


def _tiny() -> TokenizerConfig:
    return TokenizerConfig(
        name="tiny",
        vision=VisionConfig(width=96, depth=2, heads=4, mlp_hidden=256),
        qformer=QFormerConfig(hidden=64, layers=4, heads=4, ffn=128),
        quantizer=QuantizerConfig(codebook_size=512, code_dim=8),
        detokenizer=DetokenizerConfig(depth=2, heads=4, down_dims=(32, 16, 4), out_dim=64),
    )


def _mini() -> TokenizerConfig:
    """The embedded default model's size: 64 px images in 8 px patches (65 tokens), 32 causal
    queries, 1024 codes of 16 dims (the embedded model's stage II widens the codebook to 4096 through
    `stage2.codebook_size`), a 256-d generation embedding (stage I's image-feature width). A few MB;
    trains on CPU."""
    return TokenizerConfig(
        name="mini",
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_hidden=384),
        qformer=QFormerConfig(hidden=128, layers=4, heads=4, ffn=256),
        quantizer=QuantizerConfig(codebook_size=1024, code_dim=16),
        detokenizer=DetokenizerConfig(depth=2, heads=4, down_dims=(64, 32, 8), out_dim=256),
    )


def _seed_tokenizer_2_rq1() -> TokenizerConfig:
    cfg = _seed_tokenizer_2()
    cfg.name = "seed-tokenizer-2-rq1"
    cfg.detokenizer = DetokenizerConfig(kind="reverse_qformer", rq_queries=1, rq_layers=4, out_dim=1024)
    return cfg


def _seed_v1() -> TokenizerConfig:
    cfg = _seed_tokenizer_2()
    cfg.name = "seed-v1"
    cfg.detokenizer = DetokenizerConfig(kind="reverse_qformer", rq_queries=77, rq_layers=4, out_dim=768)
    return cfg


PRESETS = {
    "seed-tokenizer-2": _seed_tokenizer_2,
    "seed-tokenizer-2-rq1": _seed_tokenizer_2_rq1,
    "seed-v1": _seed_v1,
    "tiny": _tiny,
    "mini": _mini,
}


def get_config(name_or_config: str | TokenizerConfig | dict) -> TokenizerConfig:
    """A preset by name, a dict (config.json contents) or a TokenizerConfig (copied)."""
    if isinstance(name_or_config, TokenizerConfig):
        return TokenizerConfig.from_dict(name_or_config.to_dict())
    if isinstance(name_or_config, dict):
        return TokenizerConfig.from_dict(name_or_config)
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name_or_config!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name_or_config]()
    raise TypeError(f"expected a preset name, dict or TokenizerConfig, got {type(name_or_config).__name__}")
