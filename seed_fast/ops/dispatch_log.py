"""Which backend each op call used: the regression guard's evidence that a fast path ran.

    from seed_fast.ops import record_dispatch
    with record_dispatch() as log:
        tok.encode(images)
    log  # [("qformer_attention", "sdpa"), ..., ("codebook_lookup", "cpu")]

Costs one truth test per op call when nothing records. Calls replayed from a CUDA graph or inside a
compiled region are not seen (no Python runs there).
"""

from __future__ import annotations

from contextlib import contextmanager

_logs: list[list[tuple[str, str]]] = []


@contextmanager
def record_dispatch():
    log: list[tuple[str, str]] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def note(op: str, impl: str) -> None:
    for log in _logs:
        log.append((op, impl))
