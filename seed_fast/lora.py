"""Put seed_fast's fused LoRA into a peft model, reversibly.

`apply_fused_lora(model)` replaces the `forward` of every peft LoRA `Linear` (on the instance, not
the class) with one that calls `seed_fast.ops.lora_linear`; the parameters, their names, the state
dict and peft's save / load / merge stay exactly peft's. Cases the fused op does not cover fall back
to peft's own forward, per call: adapters disabled or merged, several active adapters, DoRA or
other variants, fan_in_fan_out weights, a LoRA bias, base and adapter dtypes that differ.
Mixed-adapter batches (`adapter_names=[...]`) go through `lora_linear_multi` when every adapter in
the batch has the same rank, else through peft.
`remove_fused_lora(model)` restores peft's forward.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from .ops.lora_linear import IMPLS, lora_linear, lora_linear_multi

_FLAG = "_seed_fast_fused_lora"
_IMPL = "_seed_fast_lora_impl"


def _peft_lora_linear_cls():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as e:
        raise ImportError("seed_fast.lora needs peft: pip install 'seed_fast[llm]'") from e
    return Linear


def _plain_adapter(layer, name: str) -> bool:
    """Vanilla LoRA on an nn.Linear base with matching dtypes: what lora_linear computes."""
    if name not in layer.lora_A:
        return False
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return False
    if getattr(layer, "fan_in_fan_out", False) or getattr(layer, "lora_bias", {}).get(name, False):
        return False
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return False
    a = layer.lora_A[name].weight
    return a.dtype == base.weight.dtype and layer.lora_B[name].weight.dtype == a.dtype


def _dropout_p(layer, name: str) -> float:
    drop = layer.lora_dropout[name]
    return float(drop.p) if isinstance(drop, nn.Dropout) and layer.training else 0.0


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = getattr(type(self), "forward")
    adapter_names = kwargs.get("adapter_names")
    if args or self.disable_adapters or self.merged or (set(kwargs) - {"adapter_names"}):
        return peft_forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    if adapter_names is not None:
        out = _mixed_forward(self, x, adapter_names, base)
        return out if out is not None else peft_forward(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or not _plain_adapter(self, active[0]) or x.dtype != base.weight.dtype:
        return peft_forward(self, x, *args, **kwargs)
    name = active[0]
    return lora_linear(
        x,
        base.weight,
        base.bias,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        self.scaling[name],
        dropout_p=_dropout_p(self, name),
        impl=getattr(self, _IMPL, "auto"),
    )


def _mixed_forward(self, x, adapter_names, base):
    """lora_linear_multi for an inference batch mixing adapters ("__base__" = none); None = fall back."""
    if self.training or x.dtype != base.weight.dtype or len(adapter_names) != x.shape[0]:
        return None
    names = sorted({n for n in adapter_names if n != "__base__"})
    if not all(_plain_adapter(self, n) for n in names):
        return None
    if any(n not in self.lora_A for n in names):
        return None
    ranks = {self.lora_A[n].weight.shape[0] for n in names}
    if len(ranks) > 1:
        return None
    if not names:
        return base(x)
    a_stack, b_stack, scalings = _stacks(self, tuple(names), x.device)
    ids = _adapter_ids(tuple(adapter_names), tuple(names), x.device)
    # ids come from names this layer holds, so they are in range: no check (and no host sync)
    return lora_linear_multi(x, base.weight, base.bias, a_stack, b_stack, ids, scalings, check_ids=False)


@functools.lru_cache(maxsize=32)
def _adapter_ids(adapter_names: tuple, names: tuple, device: torch.device) -> torch.Tensor:
    """Each row's adapter index (-1 = base only), built once per batch and shared by every layer."""
    pos = {n: i for i, n in enumerate(names)}
    return torch.tensor([pos.get(n, -1) for n in adapter_names], device=device)


def _stacks(layer, names: tuple, device: torch.device):
    """(A stack, B stack, scalings) of `names`, rebuilt only when an adapter weight changed
    (in-place updates bump a tensor's version; re-assignment changes its storage)."""
    weights = [t for n in names for t in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    scal = [float(layer.scaling[n]) for n in names]
    if torch.is_grad_enabled() and any(t.requires_grad for t in weights):  # gradients must reach the adapters
        a = torch.stack([layer.lora_A[n].weight for n in names])
        b = torch.stack([layer.lora_B[n].weight for n in names])
        return a, b, torch.tensor(scal, dtype=torch.float32, device=device)
    key = (names, tuple((t.data_ptr(), t._version) for t in weights), tuple(scal))
    hit = getattr(layer, "_seed_fast_stacks", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = (
            torch.stack([layer.lora_A[n].weight for n in names]),
            torch.stack([layer.lora_B[n].weight for n in names]),
            torch.tensor(scal, dtype=torch.float32, device=device),
        )
    layer._seed_fast_stacks = (key, value)
    return value


def apply_fused_lora(model: nn.Module, *, impl: str = "auto") -> int:
    """Route every peft LoRA Linear in `model` through seed_fast's fused op (`impl` as in
    `lora_linear`). Returns how many layers were switched (0 if the model has no peft LoRA Linear)."""

    if impl not in IMPLS:
        raise ValueError(f"apply_fused_lora: unknown impl {impl!r}; choose from {IMPLS}")
    cls = _peft_lora_linear_cls()
    n = 0
    for module in model.modules():
        if isinstance(module, cls):
            if not getattr(module, _FLAG, False):
                module.forward = types.MethodType(_fused_forward, module)
                setattr(module, _FLAG, True)
                n += 1
            setattr(module, _IMPL, impl)
    return n


def remove_fused_lora(model: nn.Module) -> int:
    """Undo `apply_fused_lora`: peft's own forward again. Returns how many layers were restored."""
    n = 0
    for module in model.modules():
        if getattr(module, _FLAG, False):
            del module.forward  # the instance attribute; the class's (peft's) forward shows through
            delattr(module, _FLAG)
            delattr(module, _IMPL)
            n += 1
    return n


def fused_lora_layers(model: nn.Module) -> list[str]:
    """Names of the modules currently using the fused forward."""
    return [name for name, m in model.named_modules() if getattr(m, _FLAG, False)]
