"""Helpers of the training tests: configs (a base dict with overrides merged one level deep) and
training subprocesses (one process, or two gloo ranks under torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def merged(base: dict, **kw) -> dict:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}  # nested dicts copied
    for k, v in kw.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return data


def stage2_run(out, **kw) -> dict:
    """A 6-step stage II run on small synthetic data (checkpoints every 2 steps), with overrides."""
    return merged(
        {
            "stage": "stage2",
            "out": str(out),
            "steps": 6,
            "global_batch": 8,
            "ckpt_every": 2,
            "data": {"n": 64, "val_n": 16, "image_size": 64},
            "optim": {"lr": 1e-3, "warmup": 1},
            "llm": {"lora_dropout": 0.0, "eval_n": 8},
        },
        **kw,
    )


def spawn(args: list[str], **kw) -> subprocess.Popen:
    """`python <args>` with this checkout importable and one OpenMP thread per process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def train_args(stage: str, config, *extra: str, ranks: int = 1) -> list[str]:
    """The arguments of `python -m seed_fast.train` (under torchrun for ranks > 1)."""
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    return [*run, "-m", "seed_fast.train", stage, "--config", str(config), "--no-progress", *extra]
