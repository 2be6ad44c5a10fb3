"""Reading checkpoints safely and translating between key layouts.

Layouts:
  ours      `vision.*`, `ln_vision.*`, `qformer.*`, `quantizer.*`, `detokenizer.*`, `reconstructor.*`
  official  the released `seed_quantizer.pt` plus BLIP-2's `eva_vit_g.pth` (SEED_SPEC.md section 2)
  hf        transformers' BLIP-2 (`Blip2QFormerModel`, optionally under `qformer.`, `query_tokens`,
            and `vision_model.*` of `Blip2Model` / `Blip2ForConditionalGeneration`)

Files load with `torch.load(weights_only=True)` or safetensors; anything that is not a flat mapping
of names to tensors is refused.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, not a state dict, or wrong keys / shapes."""


@dataclass
class LoadReport:
    """What a load did with each key."""

    missing: list[str] = field(default_factory=list)  # model keys no file provided
    unexpected: list[str] = field(default_factory=list)  # file keys with no place in the model
    ignored: list[str] = field(default_factory=list)  # file keys known to be unused at inference
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"
    loaded: int = 0

    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 8) -> str:
        def few(keys):
            more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = [f"{self.loaded} tensors loaded"]
        for name in ("missing", "unexpected", "mismatched", "ignored"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name}: {few(keys)}")
        return "; ".join(parts)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors file or a torch file, without running pickled code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file (or use from_pretrained for a folder)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    with open(path, "rb") as f:
        head = f.read(4)
    mmap = head.startswith(b"PK")  # torch's zip format can be memory-mapped instead of read whole
    if mmap:  # a truncated zip loses its central directory
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is corrupt or truncated (incomplete zip archive)")
    elif not head.startswith(b"\x80"):  # nor the legacy pickle format
        raise CheckpointError(f"{path} is corrupt or truncated: neither a torch checkpoint nor safetensors")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        # Why it failed is read from the file, not from torch's wording (which changes between releases):
        # an intact file whose pickle names objects beyond tensors was refused by the weights-only unpickler.
        odd = [n for n in _pickled_globals(path) or [] if not n.startswith(_STATE_DICT_MODULES)]
        if odd:
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors (it names {', '.join(sorted(set(odd))[:5])}), "
                "so it is not a plain state dict; refusing to unpickle it (re-save it with "
                "torch.save(model.state_dict()) or as safetensors)"
            ) from None
        raise CheckpointError(
            f"{path} is corrupt or truncated, or not a torch checkpoint ({type(e).__name__})"
        ) from None
    return _as_flat_state_dict(obj, path)


# modules whose globals a plain state dict's pickle names (tensors, storages, OrderedDict)
_STATE_DICT_MODULES = ("torch.", "collections.OrderedDict", "builtins.")


def _pickled_globals(path: Path) -> list[str] | None:
    """The `module.name` globals a torch file's pickles name, without running them; None when the file
    is not intact (a damaged zip, a pickle that does not parse)."""
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if z.testzip() is not None:
                    return None
                pkl = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if len(pkl) != 1:
                    return None
                streams = [z.read(pkl[0])]
                count = 1
        else:  # the legacy format: magic number, protocol, system info, then the object
            streams = [path.read_bytes()]
            count = 4
        names: list[str] = []
        buf = io.BytesIO(streams[0])
        for _ in range(count):
            strings: list[str] = []
            for op, arg, _pos in pickletools.genops(buf):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # pickletools raises ValueError and others on a damaged stream
        return None
    return names


def _as_flat_state_dict(obj, path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    # LAVIS-style wrappers: {"model": state_dict, ...}
    for wrapper in ("model", "state_dict", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    bad = [
        f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)
    ]
    if bad:
        raise CheckpointError(
            f"{path} is not a plain tensor state dict: entries that are not tensors: {', '.join(bad[:8])}"
        )
    if not obj:
        raise CheckpointError(f"{path} holds an empty state dict")
    return obj


# ---------------------------------------------------------------------------------------------
# Key translation. A rule is (source, target): an exact key, or a prefix when it ends with ".".

_OFFICIAL_RULES = [
    ("query_tokens", "qformer.query_tokens"),
    ("ln_vision.", "ln_vision."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.norm."),
    ("Qformer.bert.encoder.layer.", "qformer.layers."),
    ("quantize.embedding.weight", "quantizer.codebook.weight"),
    ("encode_task_layer.", "quantizer.encode_task_layer."),
    ("decode_task_layer.", "quantizer.decode_task_layer."),
    ("pos_embed", "reconstructor.pos_embed"),
    ("blocks.", "reconstructor.blocks."),
    ("pos_embed_image", "detokenizer.pos_embed_image"),
    ("blocks_image.", "detokenizer.blocks_image."),
    ("image_down.", "detokenizer.image_down."),
    ("distill_image_proj.", "detokenizer.distill_image_proj."),
    ("visual_encoder.", "vision."),  # a quantizer file saved together with its ViT
]

# Keys of the released files that inference does not use (stage-I text branch, buffers).
_OFFICIAL_IGNORED = [
    r"Qformer\.bert\.embeddings\.position_ids$",
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"Qformer\.cls\.",
    r"(vision_proj|text_proj|itm_head)\.",
    r"temp$",
]

# EVA checkpoint keys beyond BLIP-2's 39 blocks / without a place in the no-final-norm ViT.
_VIT_IGNORED = [r"(norm|fc_norm|head|lm_head|rel_pos_bias)\."]

_HF_QFORMER_RULES = [
    ("query_tokens", "qformer.query_tokens"),
    ("qformer.layernorm.", "qformer.norm."),
    ("qformer.encoder.layer.", "qformer.layers."),
    ("vision_model.embeddings.class_embedding", "vision.cls_token"),
    ("vision_model.embeddings.position_embedding", "vision.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "vision.patch_embed.proj."),
    ("vision_model.encoder.layers.", "vision.blocks."),
    ("vision_model.post_layernorm.", "ln_vision."),
]
# Inside layers: HF's names for the same modules.
_HF_INNER = [
    (re.compile(r"\.(attention|crossattention)\.attention\."), r".\1.self."),
    (re.compile(r"\.self_attn\.projection\."), ".attn.proj."),
    (re.compile(r"\.self_attn\."), ".attn."),
    (re.compile(r"\.layer_norm1\."), ".norm1."),
    (re.compile(r"\.layer_norm2\."), ".norm2."),
]
_HF_IGNORED = [
    r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"qformer\.embeddings\.",
    r"(language_model|language_projection|text_projection|vision_projection|itm_head|lm_head)\.",
    r"embeddings\.(word_embeddings|position_embeddings|position_ids|LayerNorm)",
]


def _apply_rules(key: str, rules) -> str | None:
    for src, dst in rules:
        if src.endswith("."):
            if key.startswith(src):
                return dst + key[len(src) :]
        elif key == src:
            return dst
    return None


def _matches(key: str, patterns) -> bool:
    return any(re.match(p, key) for p in patterns)


def official_to_ours(quantizer_sd: dict, vit_sd: dict | None, vit_depth: int) -> tuple[dict, list[str], list[str]]:
    """Translate released files to our names. Returns (mapped, unknown_keys, ignored_keys)."""
    mapped, unknown, ignored = {}, [], []
    for key, value in quantizer_sd.items():
        if _matches(key, _OFFICIAL_IGNORED):
            ignored.append(key)
            continue
        target = _apply_rules(key, _OFFICIAL_RULES)
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    for key, value in (vit_sd or {}).items():
        m = re.match(r"blocks\.(\d+)\.", key)
        if _matches(key, _VIT_IGNORED) or (m and int(m.group(1)) >= vit_depth):
            ignored.append("[vit] " + key)
            continue
        mapped["vision." + key] = value
    return mapped, unknown, ignored


def ours_to_official(sd: dict) -> tuple[dict, dict]:
    """Our state dict -> (quantizer file dict, ViT file dict) with the released key names."""
    inverse = [(dst, src) for src, dst in _OFFICIAL_RULES if src != "visual_encoder."]
    quant, vit = {}, {}
    for key, value in sd.items():
        if key.startswith("vision."):
            vit[key[len("vision.") :]] = value
            continue
        target = _apply_rules(key, inverse)
        if target is None:
            raise CheckpointError(f"{key} has no name in the released layout (only the 'mlp' de-tokenizer has one)")
        quant[target] = value
    return quant, vit


def hf_to_ours(sd: dict) -> tuple[dict, list[str], list[str]]:
    """transformers BLIP-2 names -> ours. Accepts a bare `Blip2QFormerModel` state dict too."""
    if any(k.startswith(("encoder.layer.", "layernorm.")) for k in sd):
        sd = {("qformer." + k if not k.startswith("query_tokens") else k): v for k, v in sd.items()}
    mapped, unknown, ignored = {}, [], []
    for key, value in sd.items():
        if _matches(key, _HF_IGNORED):
            ignored.append(key)
            continue
        target = _apply_rules(key, _HF_QFORMER_RULES)
        if target is None:
            unknown.append(key)
            continue
        for pattern, repl in _HF_INNER:
            target = pattern.sub(repl, target)
        if target in ("vision.cls_token",) or target.startswith("vision.pos_embed"):
            value = value.reshape(1, -1, value.shape[-1])
        if target.startswith("vision.blocks.") and target.endswith(".attn.qkv.bias"):
            # transformers 5 folds EVA's q_bias / v_bias into one qkv bias. A key bias adds q.b_k to every
            # score of a query row, which softmax ignores, so dropping its k part is exact.
            q_bias, _, v_bias = value.chunk(3)
            stem = target[: -len("qkv.bias")]
            mapped[stem + "q_bias"], mapped[stem + "v_bias"] = q_bias, v_bias
            continue
        mapped[target] = value
    return mapped, unknown, ignored


def ours_to_hf_qformer(sd: dict) -> dict:
    """Our Q-Former weights -> a state dict for transformers' `Blip2QFormerModel` (plus `query_tokens`)."""
    out = {}
    for key, value in sd.items():
        if key == "qformer.query_tokens":
            out["query_tokens"] = value
        elif key.startswith("qformer.norm."):
            out["layernorm." + key[len("qformer.norm.") :]] = value
        elif key.startswith("qformer.layers."):
            inner = "encoder.layer." + key[len("qformer.layers.") :]
            out[re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", inner)] = value
    return out


def load_into(
    model: torch.nn.Module, mapped: dict, *, strict: bool, report: LoadReport, allow_missing=()
) -> LoadReport:
    """Copy `mapped` into `model`, filling `report`; raise CheckpointError when strict and anything is off.

    allow_missing: prefixes of model keys that may stay at their initial values (heads a file lacks).
    """
    own = model.state_dict()
    to_load, non_finite = {}, []
    for key, value in mapped.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        elif own[key].is_floating_point() != value.is_floating_point():
            # an integer tensor where the model holds floats (or the reverse) is not these weights
            report.mismatched.append(f"{key}: file {value.dtype} vs model {own[key].dtype}")
        else:
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                non_finite.append(key)
            to_load[key] = value
    if non_finite:  # never useful, and otherwise blamed on the input at the first forward
        shown = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
        raise CheckpointError(f"checkpoint weights hold NaN or inf values: {shown}")
    report.missing.extend(k for k in own if k not in mapped and not k.startswith(tuple(allow_missing)))
    if strict and not report.ok():
        raise CheckpointError("checkpoint does not match the model: " + report.summary())
    with torch.no_grad():
        for key, value in to_load.items():
            own[key].copy_(value.to(own[key].dtype))
    report.loaded = len(to_load)
    return report
