"""seed_fast's Q-Former path inside transformers' BLIP-2 and InstructBLIP models: one call, one undo.

    from seed_fast.integrations import apply_seed_fast_to_blip2, revert_seed_fast_blip2

    model = Blip2ForConditionalGeneration.from_pretrained("Salesforce/blip2-opt-2.7b")
    apply_seed_fast_to_blip2(model)   # returns the same model, patched in place
    ...
    revert_seed_fast_blip2(model)     # exactly the original behaviour again

Accepted: any model of the Blip2*, InstructBlip* and InstructBlipVideo* families (Blip2Model,
Blip2ForConditionalGeneration, Blip2QFormerModel, Blip2VisionModel, ..., InstructBlipForConditionalGeneration,
InstructBlipQFormerModel, ...); anything else is a TypeError.

What changes, on these instances only (transformers' classes are not touched):
  Q-Former attention: each `*QFormerMultiHeadAttention` gets a forward that runs
    `seed_fast.ops.qformer_attention` (its measured `impl="auto"` dispatch, or `attn_impl`) on a key padding
    mask, with the self-attention's Q, K, V projections as one matmul and the cross-attention's K, V as one
    (concatenated weights cached until a weight's version or storage changes).
  Vision tower: transformers >= 5 already runs Blip2 / InstructBLIP vision attention through SDPA when the
    vision config's `attn_implementation` is "sdpa" (the default); `vision_sdpa=True` switches a tower loaded
    with "eager" to "sdpa" through `set_attn_implementation` instead of re-implementing it. Other choices
    (flash, flex, a kernel) are kept.

A call takes the original forward when the fast path would not give the same result (each such call
is recorded as ("blip2_qformer_attention", "original: <why>") under `seed_fast.ops.record_dispatch`):
attention weights requested (`output_attentions`, argument or config); training with attention dropout
p > 0; a mask that is not one key padding row per sample (rows that differ, additive values other than
0 and the dtype's minimum, a sample with no key to attend, a BlockMask); keyword arguments other than
the output flags (a head mask, packed-sequence metadata); a cross-attention whose image batch differs
from the query batch; a padded mask while a CUDA graph is captured or torch.compile traces (the mask is
checked with one host sync per Q-Former forward and mask).

Fused weights are cached only where no gradient flows to them (inference, frozen Q-Former); with
gradients the concatenation is part of the graph. The cache sees in-place updates (optimizer steps,
`load_state_dict`, `param.copy_`) and new storage (`.to()`, `.half()`), not writes through `param.data`
(which bypass the version counter): revert and apply again after those. It holds one extra copy of the
Q/K/V weights.
"""

from __future__ import annotations

import importlib
import inspect
import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seed_fast.ops import dispatch_log as _dispatch_log
from seed_fast.ops import qformer_attention
from seed_fast.ops.qformer_attention import IMPLS as _ATTN_IMPLS

__all__ = ["apply_seed_fast_to_blip2", "revert_seed_fast_blip2"]

# (module, class-name prefix): <prefix>PreTrainedModel, QFormerMultiHeadAttention, QFormerModel, VisionModel
_FAMILIES = (
    ("transformers.models.blip_2.modeling_blip_2", "Blip2"),
    ("transformers.models.instructblip.modeling_instructblip", "InstructBlip"),
    ("transformers.models.instructblipvideo.modeling_instructblipvideo", "InstructBlipVideo"),
)
# keyword arguments that reach the attention without changing its result
_NEUTRAL_KWARGS = frozenset({"output_attentions", "output_hidden_states", "return_dict", "use_cache"})
_PATCH_ATTR = "_seed_fast_blip2"  # on the model passed to apply: its _Patch
_ATTN_ATTR = "_seed_fast_blip2_attn"  # on each patched attention module: its _AttnState
_OP = "blip2_qformer_attention"


def _classes():
    """{"pretrained": (...), "attention": (...), "qformer": (...), "vision": (...)} over the families."""
    out = {"pretrained": [], "attention": [], "qformer": [], "vision": []}
    for module_name, prefix in _FAMILIES:
        mod = importlib.import_module(module_name)
        out["pretrained"].append(getattr(mod, f"{prefix}PreTrainedModel"))
        out["attention"].append(getattr(mod, f"{prefix}QFormerMultiHeadAttention"))
        out["qformer"].append(getattr(mod, f"{prefix}QFormerModel"))
        out["vision"].append(getattr(mod, f"{prefix}VisionModel"))
    return {k: tuple(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- masks
class _MaskMemo:
    """The key padding mask made from each attention-mask tensor, shared by the attention modules of one
    Q-Former and cleared around its forward: the 12 layers receive the same mask object, so it is
    converted and checked once per forward."""

    def __init__(self):
        self.entries: dict[str, tuple] = {}

    def clear(self, *_):
        self.entries.clear()

    def key_padding(self, mask, kind: str, batch: int, lk: int):
        """(keep (batch, lk) bool or None, why the fast path cannot take this mask or None)."""
        if mask is None:
            return None, None
        version = _version(mask)
        hit = self.entries.get(kind)
        if hit is not None and hit[0] is mask and hit[1] == version:
            return hit[2], hit[3]
        keep, why = _key_padding(mask, batch, lk)
        self.entries[kind] = (mask, version, keep, why)
        return keep, why


def _version(t):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _key_padding(mask, batch: int, lk: int):
    """transformers' masks as seed_fast's key padding mask, where that is the same attention.

    4D (b, 1, Lq, Lk) bool (True = attend, the SDPA format) or additive float (0 / the dtype's minimum,
    the eager format), b in {1, batch}, with every query row equal; 2D (b, Lk) padding masks (flash
    attention's format, nonzero = attend, values 0 / 1). Every sample must keep at least one key: eager
    attention averages all values in a row with none, seed_fast's op gives zeros.
    """
    if not isinstance(mask, torch.Tensor):
        return None, f"a {type(mask).__name__} mask"
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None, "a mask cannot be checked inside torch.compile or CUDA graph capture"
    shape = tuple(mask.shape)
    if mask.dim() == 4 and shape[1] == 1 and shape[3] == lk and shape[0] in (1, batch):
        row = mask[:, 0, 0, :]  # (b, Lk)
        ok = (mask == row[:, None, None, :]).all() if shape[2] > 1 else None
        if mask.dtype == torch.bool:
            keep = row
        elif mask.is_floating_point():
            keep = row == 0
            binary = ((row == 0) | (row <= torch.finfo(row.dtype).min)).all()
            ok = binary if ok is None else ok & binary
        else:
            return None, f"a {mask.dtype} 4D mask"
    elif mask.dim() == 2 and shape[1] == lk and shape[0] in (1, batch):
        keep = mask != 0 if mask.dtype != torch.bool else mask
        ok = None if mask.dtype == torch.bool else ((mask == 0) | (mask == 1)).all()
    else:
        return None, f"a mask of shape {shape}"
    some_key = keep.any(-1).all()
    ok = some_key if ok is None else ok & some_key
    if not bool(ok):  # one host sync per mask and forward
        if not bool(some_key):
            return None, "a mask that leaves a sample no key to attend"
        return None, "a mask that is not one key padding row per sample"
    return keep.expand(batch, lk), None


# ------------------------------------------------------------------------------------------- weights
def _fused(state, slot: str, linears):
    """(weight, bias) of the linears stacked along the output dim, cached while their tensors are unchanged."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears] if linears[0].bias is not None else []
    params = weights + biases
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return torch.cat(weights), (torch.cat(biases) if biases else None)
    try:  # cheap identity of the current values: in-place version and storage address of every tensor
        key = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params) + (weights[0].get_device(),)
    except RuntimeError:  # inference tensors have no version counter: nothing to key a cache on
        return torch.cat(weights), (torch.cat(biases) if biases else None)
    hit = state.fused.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
        w = torch.cat([x.detach() for x in weights])
        b = torch.cat([x.detach() for x in biases]) if biases else None
    # holding the source tensors keeps their storage (and so the addresses in the key) from being reused
    state.fused[slot] = (key, w, b, tuple(p.detach() for p in params))
    return w, b


def _fusable(*linears) -> bool:
    """Bare nn.Linear layers (not LoRA / quantized layers, no hooks: the weight is all their forward
    uses), all with or all without a bias."""
    return all(
        type(m) is nn.Linear
        and not (m._forward_hooks or m._forward_pre_hooks)
        and (m.bias is None) == (linears[0].bias is None)
        for m in linears
    )


# ------------------------------------------------------------------------------------------- forward
@dataclass
class _AttnState:
    original: object  # the forward in place before the patch (bound method or a wrapper's callable)
    target: str  # the attribute patched: "forward", or "_old_forward" under an accelerate hook
    previous: object  # that attribute's instance value before the patch (_MISSING: none)
    attn_impl: str
    fuse: bool
    scale: float
    masks: _MaskMemo
    fused: dict = field(default_factory=dict)


_MISSING = object()


def _why_original(module, hidden_states, encoder_hidden_states, kwargs):
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        return "attention weights requested"
    if module.training and getattr(module, "attention_dropout", 0.0) > 0:
        return f"attention dropout p={module.attention_dropout} in training"
    for name, value in kwargs.items():
        if name not in _NEUTRAL_KWARGS and value is not None and value is not False:
            return f"argument {name!r}"
    if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != hidden_states.shape[0]:
        return "image batch differs from the query batch"
    return None


def _qformer_attention_forward(
    self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, **kwargs
):
    """Drop-in for `Blip2QFormerMultiHeadAttention.forward`: returns (attn_output (B, Lq, D), None)."""
    state = self.__dict__[_ATTN_ATTR]
    cross = encoder_hidden_states is not None
    why = _why_original(self, hidden_states, encoder_hidden_states, kwargs)
    keep = None
    if why is None:
        context = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
        keep, why = state.masks.key_padding(mask, "cross" if cross else "self", context.shape[0], context.shape[1])
    if why is not None:
        if _dispatch_log._logs:
            _dispatch_log.note(_OP, f"original: {why}")
        return state.original(
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            **kwargs,
        )

    b, lq = hidden_states.shape[:2]
    h, dh = self.num_attention_heads, self.attention_head_size
    if cross:
        lk = encoder_hidden_states.shape[1]
        q = self.query(hidden_states).view(b, lq, h, dh)
        if state.fuse and _fusable(self.key, self.value):
            w, bias = _fused(state, "kv", (self.key, self.value))
            k, v = F.linear(encoder_hidden_states, w, bias).view(b, lk, 2, h, dh).unbind(2)  # (B, Lk, H, Dh) each
        else:
            k = self.key(encoder_hidden_states).view(b, lk, h, dh)
            v = self.value(encoder_hidden_states).view(b, lk, h, dh)
    elif state.fuse and _fusable(self.query, self.key, self.value):
        w, bias = _fused(state, "qkv", (self.query, self.key, self.value))
        q, k, v = F.linear(hidden_states, w, bias).view(b, lq, 3, h, dh).unbind(2)  # (B, L, H, Dh) each
    else:
        q = self.query(hidden_states).view(b, lq, h, dh)
        k = self.key(hidden_states).view(b, lq, h, dh)
        v = self.value(hidden_states).view(b, lq, h, dh)
    out = qformer_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        key_padding_mask=keep,
        scale=state.scale,
        impl=state.attn_impl,
    )  # (B, H, Lq, Dh)
    return out.transpose(1, 2).reshape(b, lq, h * dh), None


# ------------------------------------------------------------------------------------------- apply / revert
@dataclass
class _Patch:
    options: dict
    attention: list  # patched attention modules
    hooks: list  # RemovableHandles of the mask memos' clearing hooks
    vision: list  # (vision model, implementation before, implementation set)


def _check_model(model, fn_name: str):
    classes = _classes()
    if not isinstance(model, classes["pretrained"]):
        accepted = ", ".join(c.__name__ for c in classes["pretrained"])
        raise TypeError(
            f"{fn_name}: expected a transformers BLIP-2 / InstructBLIP model (a subclass of {accepted}, such as "
            "Blip2ForConditionalGeneration, Blip2Model, Blip2QFormerModel or InstructBlipForConditionalGeneration), "
            f"got {type(model).__module__}.{type(model).__qualname__}"
        )
    return classes


def _check_layout(module) -> None:
    """The patched forward relies on this transformers layout (>= 5: mask arguments by name, **kwargs)."""
    params = list(inspect.signature(type(module).forward).parameters)
    expected = ["self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "kwargs"]
    missing = [
        a for a in ("query", "key", "value", "num_attention_heads", "attention_head_size") if not hasattr(module, a)
    ]
    if params != expected or missing:
        import transformers

        raise RuntimeError(
            f"apply_seed_fast_to_blip2: {type(module).__name__} in transformers {transformers.__version__} has "
            f"forward{tuple(params[1:])} and lacks {missing}; the patch supports the layout of transformers >= 5 "
            f"(forward{tuple(expected[1:])})"
        )


def apply_seed_fast_to_blip2(
    model: nn.Module, *, attn_impl: str = "auto", fuse_projections: bool = True, vision_sdpa: bool = True
) -> nn.Module:
    """Put seed_fast's Q-Former attention (and SDPA in the vision tower) into a BLIP-2 / InstructBLIP model.

    model: a transformers Blip2* / InstructBlip* / InstructBlipVideo* model (TypeError otherwise).
    attn_impl: `seed_fast.ops.qformer_attention`'s impl: "auto" (measured dispatch), "sdpa", "triton", ...
    fuse_projections: one matmul for the self-attention's Q, K, V and one for the cross-attention's K, V.
    vision_sdpa: switch a vision tower whose attention implementation is "eager" to transformers' "sdpa".
    Patches in place and returns `model`. Applying again with the same options does nothing; with other
    options it raises (revert first). See the module docstring for when a call takes the original path.
    """
    classes = _check_model(model, "apply_seed_fast_to_blip2")
    if attn_impl not in _ATTN_IMPLS:
        raise ValueError(f"apply_seed_fast_to_blip2: unknown attn_impl {attn_impl!r}; choose from {_ATTN_IMPLS}")
    options = {"attn_impl": attn_impl, "fuse_projections": bool(fuse_projections), "vision_sdpa": bool(vision_sdpa)}
    done = model.__dict__.get(_PATCH_ATTR)
    if done is not None:
        if done.options == options:
            return model
        raise ValueError(
            f"apply_seed_fast_to_blip2: this model is already patched with {done.options}; "
            f"call revert_seed_fast_blip2(model) before applying {options}"
        )
    for name, sub in model.named_modules():
        if sub is not model and (_PATCH_ATTR in sub.__dict__ or _ATTN_ATTR in sub.__dict__):
            raise ValueError(
                f"apply_seed_fast_to_blip2: the submodule {name!r} ({type(sub).__name__}) is already patched "
                "through another apply_seed_fast_to_blip2 call; revert that model first"
            )

    attention = [m for m in model.modules() if isinstance(m, classes["attention"])]
    for m in attention:
        _check_layout(m)
    patch = _Patch(options=options, attention=[], hooks=[], vision=[])
    memos = {}
    for qformer in (m for m in model.modules() if isinstance(m, classes["qformer"])):
        memo = _MaskMemo()
        patch.hooks.append(qformer.register_forward_pre_hook(memo.clear))
        patch.hooks.append(qformer.register_forward_hook(memo.clear, always_call=True))
        for m in qformer.modules():
            memos[id(m)] = memo
    for m in attention:
        # under an accelerate hook (device_map), `forward` is the hook's wrapper, which calls `_old_forward`
        target = "_old_forward" if "_old_forward" in m.__dict__ and hasattr(m, "_hf_hook") else "forward"
        head_dim = m.attention_head_size
        m.__dict__[_ATTN_ATTR] = _AttnState(
            original=getattr(m, target),
            target=target,
            previous=m.__dict__.get(target, _MISSING),
            attn_impl=attn_impl,
            fuse=options["fuse_projections"],
            scale=float(getattr(m, "scaling", 1.0 / math.sqrt(head_dim))),
            masks=memos.get(id(m)) or _MaskMemo(),
        )
        setattr(m, target, types.MethodType(_qformer_attention_forward, m))
        patch.attention.append(m)
    if vision_sdpa:
        for vm in (m for m in model.modules() if isinstance(m, classes["vision"])):
            before = vm.config._attn_implementation
            if before == "eager":
                vm.set_attn_implementation("sdpa")
                patch.vision.append((vm, before, vm.config._attn_implementation))
    model.__dict__[_PATCH_ATTR] = patch
    return model


def revert_seed_fast_blip2(model: nn.Module) -> nn.Module:
    """Undo `apply_seed_fast_to_blip2(model)`: the original forwards, hooks and attention implementations
    (a vision implementation changed by the user since is left as they set it). A model that is not
    patched is returned unchanged. Returns `model`."""
    _check_model(model, "revert_seed_fast_blip2")
    patch = model.__dict__.pop(_PATCH_ATTR, None)
    if patch is None:
        return model
    for m in patch.attention:
        state = m.__dict__.pop(_ATTN_ATTR)
        ours = m.__dict__.get(state.target)
        if isinstance(ours, types.MethodType) and ours.__func__ is _qformer_attention_forward:
            if state.previous is _MISSING:
                del m.__dict__[state.target]
            else:
                m.__dict__[state.target] = state.previous
    for handle in patch.hooks:
        handle.remove()
    for vm, before, ours in patch.vision:
        if vm.config._attn_implementation == ours:
            vm.set_attn_implementation(before)
    return model
