"""Test helpers shared by the test suite and by users checking their own kernels.

`assert_close` and `assert_equal` take torch tensors, numpy arrays or nested lists, and say on
failure how many elements are off, where, and by how much."""

from __future__ import annotations

import torch


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.tensor(x)  # numpy arrays (copied: they may be read-only), lists, Python numbers


def _index(flat: int, shape) -> tuple[int, ...]:
    if not shape:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def _prefix(name: str) -> str:
    return f"{name}: " if name else ""


def _check_shape(a: torch.Tensor, e: torch.Tensor, name: str) -> None:
    if a.shape != e.shape:
        raise AssertionError(f"{_prefix(name)}shape {tuple(a.shape)} != expected {tuple(e.shape)}")


def assert_close(actual, expected, *, atol: float, rtol: float, name: str = "") -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, computed in float64. Like
    torch.testing.assert_close, but the message says how many elements mismatch, where the worst
    one is, and the relative error there. A non-finite value must be matched exactly (inf by the
    same inf; NaN never matches)."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    _check_shape(a, e, name)
    a, e = a.double(), e.double()
    atol, rtol = float(atol), float(rtol)
    finite = torch.isfinite(a) & torch.isfinite(e)
    odd = ~finite & (a != e)
    if odd.any():
        first = int(odd.flatten().nonzero()[0])
        raise AssertionError(
            f"{_prefix(name)}{int(odd.sum())}/{a.numel()} element(s) non-finite where the other side differs; first at "
            f"{_index(first, a.shape)}: got {float(a.flatten()[first]):.6g}, expected {float(e.flatten()[first]):.6g}"
        )
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = atol + rtol * torch.where(finite, e.abs(), torch.zeros_like(e))
    bad = err > bound
    if bad.any():
        worst = int((err - bound).flatten().argmax())
        rel = float(err.flatten()[worst] / e.abs().flatten()[worst].clamp_min(1e-30))
        raise AssertionError(
            f"{_prefix(name)}{int(bad.sum())}/{a.numel()} elements exceed atol={atol:g} rtol={rtol:g}; worst at "
            f"{_index(worst, a.shape)}: got {float(a.flatten()[worst]):.6g}, expected {float(e.flatten()[worst]):.6g} "
            f"(abs err {float(err.flatten()[worst]):.3g}, rel err {rel:.3g}); max abs err {float(err.max()):.3g}"
        )


def assert_equal(actual, expected, *, name: str = "", show: int = 5) -> None:
    """Exact equality of shapes and values (as torch.equal: dtypes may differ, NaN never equals).
    The message says how many elements differ and lists the first `show` of them."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    _check_shape(a, e, name)
    diff = a != e
    if diff.any():
        where = diff.flatten().nonzero().flatten()[:show].tolist()
        items = "; ".join(
            f"{_index(i, a.shape)}: got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}" for i in where
        )
        more = " ..." if int(diff.sum()) > show else ""
        raise AssertionError(f"{_prefix(name)}{int(diff.sum())}/{a.numel()} elements differ; {items}{more}")


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a scale-aware error used for dtype-relative tolerances)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))
