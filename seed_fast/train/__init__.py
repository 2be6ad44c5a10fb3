"""Training: `seed-fast train STAGE --config FILE`, one process or under torchrun (the stages:
`seed_fast.train.config.STAGES`, each trained by its Task in `seed_fast.train.stages`).

python -m seed_fast.train stage2 --config run.json
torchrun --nproc-per-node 4 -m seed_fast.train stage2 --config run.json
"""

from __future__ import annotations

import argparse
import sys

from .config import STAGES, ConfigError, TrainConfig
from .loop import train

__all__ = ["ConfigError", "TrainConfig", "add_train_args", "main", "run_from_args"]


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", required=True, metavar="FILE", help="JSON or TOML training config")
    p.add_argument("--out", help="run folder (overrides the config's `out`)")
    p.add_argument("--steps", type=int, help="total steps (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop early, no final save
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args) -> int:
    import json

    try:
        cfg = TrainConfig.from_file(args.config)
        data = cfg.to_dict()
        if args.out:
            data["out"] = args.out
        if args.steps is not None:  # 0 too: the config's check refuses it, never ignores it
            data["steps"] = args.steps
        if data["stage"] != args.stage:
            raise ConfigError(f"the command says {args.stage} but {args.config} has stage {data['stage']!r}")
        cfg = TrainConfig.from_dict(data)
    except ConfigError as e:
        print(f"seed-fast train: bad config: {e}", file=sys.stderr)
        return 2

    try:
        last = train(cfg, resume=args.resume, progress=not args.no_progress, stop_after=args.stop_after)
    except (FileExistsError, ConfigError) as e:
        print(f"seed-fast train: {e}", file=sys.stderr)
        return 2
    if last:
        print(json.dumps(last))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seed_fast.train", description="train a SEED stage")
    add_train_args(p)
    return run_from_args(p.parse_args(argv))
