"""Codebook health utilities for vector quantizers.

Measuring a codebook (how many codes are used, how evenly) and repairing it (k-means initialization,
restarting dead codes). Plain PyTorch, no dependency on the rest of the package:

* :func:`codebook_usage` - per-code counts of a batch of code indices.
* :func:`codebook_perplexity` - ``exp(entropy)`` of the usage distribution (the "effective number" of codes).
* :func:`dead_codes` - codes used at most ``threshold`` times.
* :func:`codebook_stats` - the above summarized in a dict.
* :func:`kmeans_init` - Lloyd's k-means on encoder outputs, to initialize a codebook.
* :func:`restart_dead_codes` - in-place replacement of dead codebook rows by encoder outputs.

Randomness always comes from a private ``torch.Generator`` (on the CPU, whatever the data's device), so
results are reproducible given ``seed`` and the global RNG is never touched or consumed. With
``seed=None`` the generator is seeded non-deterministically.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
from torch import Tensor

from ...ops.codebook_lookup import codebook_lookup, squared_distances

__all__ = [
    "codebook_perplexity",
    "codebook_stats",
    "codebook_usage",
    "dead_codes",
    "kmeans_init",
    "restart_dead_codes",
]

# Upper bound on the number of elements of the (rows, codes, D) difference tensor built at once when
# computing exact squared distances (64 MiB in fp32); the code axis is split further to stay below it.
_DIFF_BUDGET = 1 << 24

_METRICS = ("l2", "cosine")
_INITS = ("random", "k-means++")


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------


def _check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_codebook_size(codebook_size: Any) -> int:
    return _check_positive_int(codebook_size, "codebook_size")


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or None, got bool")
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}") from None


def _make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()  # CPU: identical draws whatever device the data lives on
    if seed is None:
        g.seed()  # non-deterministic, does not touch the global RNG
    else:
        g.manual_seed(seed)
    return g


def _check_counts(counts: Any, name: str = "counts") -> Tensor:
    counts = _check_tensor(counts, name)
    if counts.dtype == torch.bool or counts.dtype.is_complex:
        raise TypeError(f"{name} must be an integer or floating tensor, got dtype {counts.dtype}")
    if counts.ndim != 1:
        raise ValueError(f"{name} must be 1-D (K,), got shape {tuple(counts.shape)}")
    if counts.dtype.is_floating_point and not bool(torch.isfinite(counts).all()):
        raise ValueError(f"{name} contains NaN/inf")
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError(f"{name} must be non-negative, got min {counts.min().item()}")
    return counts


def _check_rows(z: Any, name: str = "z") -> Tensor:
    """Validate a (..., D) floating tensor and return it flattened to (N, D) (a view when possible)."""
    z = _check_tensor(z, name)
    if not z.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dims (..., D), got shape {tuple(z.shape)}"
            + ("; use z[None] for a single vector" if z.ndim == 1 else "")
        )
    if z.shape[-1] == 0:
        raise ValueError(f"{name} has an empty feature dim D: shape {tuple(z.shape)}")
    rows = z.reshape(-1, z.shape[-1])
    if rows.shape[0] == 0:
        raise ValueError(f"{name} is empty (no rows): shape {tuple(z.shape)}")
    if not bool(torch.isfinite(rows).all()):
        bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN/inf in {bad.numel()} row(s) (flattened row indices, first ones: {bad[:5].tolist()})"
        )
    return rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _std(x: Tensor) -> float:
    """Standard deviation of all elements, 0.0 when it is undefined (a single element)."""
    if x.numel() < 2:
        return 0.0
    return float(x.std())


# ----------------------------------------------------------------------------------------------------------
# usage statistics
# ----------------------------------------------------------------------------------------------------------


def codebook_usage(indices: Tensor, codebook_size: int) -> Tensor:
    """Count how often each code appears.

    Args:
        indices: code indices, any shape, any integer dtype (not bool), values in ``[0, codebook_size)``.
            May be empty (all counts are then zero).
        codebook_size: number of codes K, ``>= 1``.

    Returns:
        int64 tensor (K,) on ``indices``' device: ``counts[k]`` = number of elements of ``indices`` equal to k.

    Raises:
        TypeError: ``indices`` is not a tensor or not of an integer dtype; ``codebook_size`` is not an int.
        ValueError: ``codebook_size < 1``; an index lies outside ``[0, codebook_size)``.
    """
    indices = _check_tensor(indices, "indices")
    k = _check_codebook_size(codebook_size)
    if not _is_integer_dtype(indices.dtype):
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return torch.zeros(k, dtype=torch.int64, device=indices.device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"indices must lie in [0, codebook_size) = [0, {k}), got values in [{lo}, {hi}]")
    return torch.bincount(flat, minlength=k)


def codebook_perplexity(indices_or_counts: Tensor, codebook_size: int | None = None) -> float:
    """Perplexity ``exp(H)`` of the code usage distribution, ``H = -sum_k p_k ln p_k`` (natural log).

    It is the effective number of codes in use: K for a uniform usage over K codes, 1 when a single code
    is used.

    Args:
        indices_or_counts: either code indices (any shape, integer dtype), in which case ``codebook_size``
            must be given; or, with ``codebook_size=None``, a counts vector (K,) of non-negative integers or
            floats (e.g. EMA cluster sizes), as returned by :func:`codebook_usage`.
        codebook_size: K when passing indices; ``None`` when passing counts.

    Returns:
        Python float in ``[1, K]`` (computed in float64).

    Raises:
        ValueError: empty indices, counts that are empty / sum to zero / negative / non-finite,
            counts not 1-D, ``codebook_size < 1``, indices out of range.
        TypeError: not a tensor; indices of a non-integer dtype.
    """
    x = _check_tensor(indices_or_counts, "indices_or_counts")
    if codebook_size is not None:
        if x.numel() == 0:
            raise ValueError("cannot compute the perplexity of empty indices (no codes observed)")
        counts = codebook_usage(x, codebook_size)
    else:
        if x.ndim != 1:
            raise ValueError(
                f"counts must be 1-D (K,), got shape {tuple(x.shape)}; to pass code indices, give codebook_size as well"
            )
        counts = _check_counts(x, "counts")
        if counts.numel() == 0:
            raise ValueError("cannot compute the perplexity of empty counts (K = 0)")
    c = counts.to(torch.float64)
    total = float(c.sum())
    if total <= 0:
        raise ValueError("cannot compute the perplexity: counts sum to zero (no codes observed)")
    p = c[c > 0] / total
    entropy = float(-(p * p.log()).sum())
    return math.exp(entropy)


def dead_codes(counts: Tensor, threshold: int = 0) -> Tensor:
    """Indices of the codes used at most ``threshold`` times.

    Args:
        counts: (K,) non-negative integer or floating counts (e.g. from :func:`codebook_usage`, or EMA sizes).
        threshold: a code is dead when ``counts[k] <= threshold`` (default 0: never used).

    Returns:
        int64 tensor (n_dead,) of code indices in increasing order, on ``counts``' device.

    Raises:
        TypeError: ``counts`` not a tensor / bool / complex; ``threshold`` not a real number.
        ValueError: ``counts`` not 1-D, negative, or with NaN/inf.
    """
    counts = _check_counts(counts)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    return torch.nonzero(counts <= threshold).flatten().to(torch.int64)


def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, float | int]:
    """Summary of the codebook usage of a batch of code indices.

    Args:
        indices: code indices, any shape, integer dtype, values in ``[0, codebook_size)``; not empty.
        codebook_size: number of codes K, ``>= 1``.

    Returns:
        dict with
            ``"used"`` (int): number of codes appearing at least once;
            ``"dead"`` (int): ``K - used``;
            ``"usage_fraction"`` (float): ``used / K``;
            ``"perplexity"`` (float): see :func:`codebook_perplexity`, in ``[1, used]``;
            ``"normalized_perplexity"`` (float): ``perplexity / K``, in ``(0, 1]``.

    Raises:
        The errors of :func:`codebook_usage`; ValueError for empty ``indices``.
    """
    indices = _check_tensor(indices, "indices")
    k = _check_codebook_size(codebook_size)
    if indices.numel() == 0:
        raise ValueError("cannot compute codebook stats of empty indices (no codes observed)")
    counts = codebook_usage(indices, k)
    used = int((counts > 0).sum())
    perplexity = codebook_perplexity(counts)
    return {
        "used": used,
        "dead": k - used,
        "usage_fraction": used / k,
        "perplexity": perplexity,
        "normalized_perplexity": perplexity / k,
    }


# ----------------------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------------------


def _sq_dist_block(xc: Tensor, centers: Tensor) -> Tensor:
    """Exact squared distances sum((x - c)^2) between rows (c, D) and centers (K, D) -> (c, K).

    The (c, k, D) difference tensor is bounded by ``_DIFF_BUDGET`` elements by splitting the code axis.
    """
    n, d = xc.shape
    k = centers.shape[0]
    step = max(1, _DIFF_BUDGET // max(1, n * d))
    if step >= k:
        return squared_distances(xc, centers)
    out = torch.empty(n, k, dtype=xc.dtype, device=xc.device)
    for k0 in range(0, k, step):
        out[:, k0 : k0 + step] = squared_distances(xc, centers[k0 : k0 + step])
    return out


def _assign(x: Tensor, centers: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest center of each row of x (N, D): (int64 assignments (N,), squared distances (N,)).

    Uses the fused `codebook_lookup` (never the full N x K matrix; ties to the lowest center index);
    the distance is then recomputed exactly from the chosen center. `chunk` bounds the rows per call.
    """
    n = x.shape[0]
    assign = torch.empty(n, dtype=torch.int64, device=x.device)
    mind = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, chunk):
        a, c = codebook_lookup(x[i : i + chunk], centers)
        assign[i : i + chunk] = a
        mind[i : i + chunk] = (x[i : i + chunk] - c).square().sum(-1)
    return assign, mind


def _normalize_rows(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _kmeanspp(x: Tensor, k: int, g: torch.Generator, chunk: int) -> Tensor:
    """Greedy k-means++ seeding of k centers from the rows of x (N, D), N >= k.

    The first center is a uniformly random row; each next one is the best (lowest resulting potential
    sum_i min_j |x_i - c_j|^2) of ``2 + floor(ln k)`` candidates drawn with probability proportional to the
    squared distance to the nearest center chosen so far (as in scikit-learn's greedy variant).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[int(torch.randint(n, (1,), generator=g))]
    _, mind = _assign(x, centers[:1], chunk)
    for j in range(1, k):
        cum = torch.cumsum(mind.to(torch.float64), 0)
        total = float(cum[-1])
        u = torch.rand(trials, generator=g, dtype=torch.float64)
        if total > 0:
            cand = torch.searchsorted(cum, (u * total).to(x.device), right=True).clamp_(max=n - 1)
        else:  # every row coincides with a chosen center: fall back to uniform picks
            cand = (u * n).long().clamp_(max=n - 1).to(x.device)
        cand_x = x[cand]  # (trials, D)
        pot = torch.zeros(trials, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            d = _sq_dist_block(x[i : i + chunk], cand_x)  # (c, trials)
            pot += torch.minimum(d, mind[i : i + chunk, None]).sum(0, dtype=torch.float64)
        best = int(pot.argmin())
        centers[j] = cand_x[best]
        for i in range(0, n, chunk):
            d = _sq_dist_block(x[i : i + chunk], cand_x[best : best + 1]).squeeze(1)
            torch.minimum(mind[i : i + chunk], d, out=mind[i : i + chunk])
    return centers


def kmeans_init(
    z: Tensor,
    codebook_size: int,
    *,
    iters: int = 10,
    seed: int | None = None,
    metric: str = "l2",
    chunk: int = 4096,
    init: str = "random",
) -> Tensor:
    """Lloyd's k-means on the rows of z, to initialize a codebook of ``codebook_size`` codes.

    Initial centers: with ``init="random"`` (the default) a random sample of K distinct rows; with
    ``init="k-means++"`` greedy k-means++ (D^2 sampling, best of ``2 + floor(ln K)`` candidates per center),
    which costs about ``K * (2 + ln K)`` extra passes over the data but avoids the poor local minima random
    seeding often lands in on clustered data (two centers sharing one cluster while another center spans two
    clusters), which Lloyd's iterations cannot undo. If N < K, whatever ``init``, the K initial centers are
    rows sampled with replacement (every row at least once, the other K - N uniformly) plus gaussian noise
    of std ``1e-3 * z.std()`` (``1e-3`` if z is constant) so that they differ; with rows further apart
    than that noise, the result then has every row as a center (exactly) and K - N jittered copies.

    Each iteration assigns every row to its nearest center, then moves each center to the mean of its rows;
    a center left without rows is re-seeded from a random data row (distinct rows while there are enough;
    plus the same small noise when N < K). Iterations stop early once the assignment no longer changes.

    Distances are exact ``sum((z - c)^2)`` (no ``|z|^2 - 2 z.c + |c|^2`` expansion), in fp32 (fp64 if z is
    fp64), computed ``chunk`` rows at a time so the N x K matrix is never held at once; ties go to the
    lowest center index.

    ``metric="cosine"``: spherical k-means. Rows of z are L2-normalized (all-zero rows are refused) and
    centers are re-normalized after every update (a center whose rows sum to zero keeps its previous
    value), so the returned rows have unit norm.

    Deterministic given ``seed`` on the CPU; on CUDA the per-cluster sums use ``index_add_``, which is
    bitwise reproducible only under ``torch.use_deterministic_algorithms(True)``.

    Args:
        z: (..., D) floating tensor (fp16/bf16/fp32/fp64), finite; leading dims are flattened to N rows.
        codebook_size: number of centers K, ``>= 1``.
        iters: maximum number of Lloyd iterations, ``>= 1``.
        seed: seed of the private generator; ``None`` for a non-deterministic seed.
        metric: ``"l2"`` or ``"cosine"``.
        chunk: rows per distance block, ``>= 1``.
        init: ``"random"`` or ``"k-means++"``.

    Returns:
        (K, D) tensor of centers, in z's dtype and on z's device.

    Raises:
        TypeError: z not a floating tensor; non-int ``codebook_size`` / ``iters`` / ``chunk`` / ``seed``.
        ValueError: z with fewer than 2 dims, empty, D == 0, or with NaN/inf; all-zero rows of z with
            ``metric="cosine"``; ``codebook_size``, ``iters`` or ``chunk`` < 1; unknown ``metric`` or ``init``.
    """
    x = _check_rows(z)
    k = _check_codebook_size(codebook_size)
    iters = _check_positive_int(iters, "iters")
    chunk = _check_positive_int(chunk, "chunk")
    seed = _check_seed(seed)
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {_METRICS}")
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {_INITS}")

    g = _make_generator(seed)
    dev = x.device
    x = x.to(_compute_dtype(z.dtype))
    if metric == "cosine":
        zero = (x == 0).all(dim=1)
        if bool(zero.any()):
            raise ValueError(
                f"z has {int(zero.sum())} all-zero row(s) (first ones: {zero.nonzero().flatten()[:5].tolist()}), "
                "which have no direction for metric='cosine'; drop them first"
            )
        x = _normalize_rows(x)
    n = x.shape[0]
    small = n < k
    jitter = 0.0
    if small:
        s = _std(x)
        jitter = 1e-3 * (s if s > 0 and math.isfinite(s) else 1.0)

    def noise(m: int) -> Tensor:
        return jitter * torch.randn(m, x.shape[1], generator=g, dtype=x.dtype).to(dev)

    def random_rows(m: int) -> Tensor:
        if m <= n:
            return torch.randperm(n, generator=g)[:m].to(dev)
        return torch.randint(n, (m,), generator=g).to(dev)

    if small:  # every row once, the other K - N drawn with replacement, in random order; plus jitter
        pick = torch.cat([torch.arange(n), torch.randint(n, (k - n,), generator=g)])
        pick = pick[torch.randperm(k, generator=g)]
        centers = x[pick.to(dev)] + noise(k)
    elif init == "k-means++":
        centers = _kmeanspp(x, k, g, chunk)
    else:
        centers = x[random_rows(k)].clone()
    if metric == "cosine":
        centers = _normalize_rows(centers)

    prev = None
    for _ in range(iters):
        assign, _ = _assign(x, centers, chunk)
        if prev is not None and torch.equal(assign, prev):
            break
        prev = assign
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        live = counts > 0
        new = sums / counts.clamp(min=1).to(x.dtype)[:, None]
        if metric == "cosine":
            norms = new.norm(dim=1, keepdim=True)
            ok = live & (norms.squeeze(1) > 0)
            new = torch.where(ok[:, None], new / norms.clamp(min=torch.finfo(x.dtype).tiny), centers)
        centers = torch.where(live[:, None], new, centers)
        empty = (~live).nonzero().flatten()
        if empty.numel():
            reseed = x[random_rows(empty.numel())]
            if small:
                reseed = reseed + noise(empty.numel())
                if metric == "cosine":
                    reseed = _normalize_rows(reseed)
            centers[empty] = reseed
            prev = None  # the centers moved: do not stop on an unchanged assignment next time
    return centers.to(z.dtype)


# ----------------------------------------------------------------------------------------------------------
# dead-code restart
# ----------------------------------------------------------------------------------------------------------


def restart_dead_codes(
    codebook: Tensor,
    counts: Tensor,
    z: Tensor,
    *,
    threshold: int = 0,
    seed: int | None = None,
    noise: float = 0.0,
) -> Tensor:
    """Replace, in place, every dead code (``counts[k] <= threshold``) by a random row of z.

    Each dead row becomes a randomly chosen row of z (distinct rows while z has at least as many rows as
    there are dead codes, otherwise drawn with replacement), plus, if ``noise > 0``, gaussian noise of std
    ``noise * z.std()``. Live rows are left untouched. Runs under ``torch.no_grad()``, so it works on an
    ``nn.Parameter`` (pass ``embedding.weight`` for an ``nn.Embedding``).

    Args:
        codebook: (K, D) floating tensor, modified in place.
        counts: (K,) non-negative usage counts (integer, or float such as EMA cluster sizes).
        z: (..., D) floating tensor of encoder outputs, finite and non-empty; leading dims are flattened.
            May be on another device or of another dtype than ``codebook``; chosen rows are converted.
        threshold: a code is dead when ``counts[k] <= threshold``.
        seed: seed of the private generator; ``None`` for a non-deterministic seed.
        noise: relative noise scale, ``>= 0``.

    Returns:
        int64 tensor (n_dead,) of the restarted code indices, increasing, on ``codebook``'s device.

    Raises:
        TypeError: non-tensor arguments; non-floating ``codebook`` or ``z``; bad ``threshold`` / ``seed``.
        ValueError: ``codebook`` not 2-D or with K == 0; ``counts`` not of shape (K,), negative or non-finite;
            z with fewer than 2 dims, a last dim != D, no rows, or NaN/inf; negative or non-finite ``noise``.
    """
    codebook = _check_tensor(codebook, "codebook")
    if not codebook.dtype.is_floating_point:
        raise TypeError(f"codebook must be a floating-point tensor, got dtype {codebook.dtype}")
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    k, d = codebook.shape
    if k == 0:
        raise ValueError("codebook has no rows (codebook_size K = 0)")
    counts = _check_counts(counts)
    if counts.shape[0] != k:
        raise ValueError(f"counts must have shape (K,) = ({k},) to match codebook, got {tuple(counts.shape)}")
    z = _check_tensor(z, "z")
    if z.ndim >= 1 and z.shape[-1] != d:
        raise ValueError(f"z's last dim must equal the codebook dim D = {d}, got z of shape {tuple(z.shape)}")
    rows = _check_rows(z)
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise TypeError(f"noise must be a number, got {type(noise).__name__}")
    noise = float(noise)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    seed = _check_seed(seed)

    dead = dead_codes(counts, threshold).to(codebook.device)
    m = dead.numel()
    if m == 0:
        return dead
    g = _make_generator(seed)
    n = rows.shape[0]
    pick = torch.randperm(n, generator=g)[:m] if m <= n else torch.randint(n, (m,), generator=g)
    new = rows[pick.to(rows.device)].to(device=codebook.device, dtype=_compute_dtype(rows.dtype))
    if noise > 0:
        scale = noise * _std(rows.to(_compute_dtype(rows.dtype)))
        new = new + scale * torch.randn(m, d, generator=g, dtype=new.dtype).to(codebook.device)
    with torch.no_grad():
        codebook.index_copy_(0, dead, new.to(codebook.dtype))
    return dead
