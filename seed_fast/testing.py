"""Test helpers shared by the test suite and by users checking their own kernels."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "") -> None:
    """Like torch.testing.assert_close, but the message says how many elements mismatch, where the
    worst one is, and the relative error there."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: result has {int((~torch.isfinite(a)).sum())} non-finite value(s)")
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        worst = int((err - bound).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        rel = float(err.flatten()[worst] / e.abs().flatten()[worst].clamp_min(1e-30))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements exceed atol={atol:g} rtol={rtol:g}; worst at {idx}: "
            f"got {float(a.flatten()[worst]):.6g}, expected {float(e.flatten()[worst]):.6g} "
            f"(abs err {float(err.flatten()[worst]):.3g}, rel err {rel:.3g}); max abs err {float(err.max()):.3g}"
        )


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a scale-aware error used for dtype-relative tolerances)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))
