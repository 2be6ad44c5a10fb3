"""Whether the Triton backends can run on given tensors: shared by every op's dispatch."""

from __future__ import annotations

import os

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_reasons(device: torch.device, dtypes: set) -> list[str]:
    """Why a Triton kernel cannot run on tensors of `dtypes` on `device`; empty when it can.
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (testing; no bfloat16 there)."""
    reasons = []
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else on import
        reasons.append(f"triton unavailable: {type(e).__name__}: {e}")
    if device.type == "cpu":
        if not triton_interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the interpreter, for testing)")
        if torch.bfloat16 in dtypes:
            reasons.append("the Triton interpreter has no bfloat16")
    elif device.type != "cuda":
        reasons.append(f"tensors are on {device}")
    return reasons
