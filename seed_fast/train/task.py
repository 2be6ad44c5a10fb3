"""What a training stage gives the loop (`Task`), and the starting models several stages share."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import SeedTokenizer
from ..models.related.connector import load_frozen_lm
from .config import ConfigError, TrainConfig
from .data import make_collate
from .sources import make_source


def load_tokenizer(cfg: TrainConfig):
    """The run's starting SeedTokenizer: a checkpoint folder, or a preset with seeded random weights."""
    if Path(cfg.tokenizer).is_dir():
        return SeedTokenizer.from_pretrained(cfg.tokenizer)
    try:
        return SeedTokenizer.from_config(cfg.tokenizer, seed=cfg.seed, init="unit")
    except ValueError as e:
        raise ConfigError(f"tokenizer: {e} (or give a SeedTokenizer checkpoint folder)") from None


def frozen_lm_and_tokenizer(section: str, lm: str, vit_from: str, device):
    """A connector stage's frozen parts: (LM folder, tokenizer folder, SeedLLM, SeedTokenizer); a
    missing folder is named by its config key."""
    for what, path in ((f"{section}.lm", lm), (f"{section}.vit_from", vit_from)):
        if path is None or not Path(path).is_dir():
            raise ConfigError(f"{what}: no such folder {path!r}")
    llm = load_frozen_lm(lm)
    llm.model.to(device)
    tok = SeedTokenizer.from_pretrained(vit_from).float().to(device).eval().requires_grad_(False)
    return lm, vit_from, llm, tok


class Task:
    """What a stage provides to the loop: `module` (forward(batch) -> dict with "loss" and scalar
    parts), and which of its state is checkpointed (`keeps(key)`; the frozen rest is rebuilt from
    the config)."""

    cfg: TrainConfig
    module: torch.nn.Module
    image_size: int
    progress: bool = True  # the loop sets it: progress bars (rank 0) for work such as caching

    def keeps(self, key: str) -> bool:
        raise NotImplementedError

    def dataset(self):
        return make_source(self.cfg, "train")

    def collate(self):
        """samples -> the batch `module` takes (default: images and captions)."""
        return make_collate(self.image_size)

    @property
    def workers(self) -> int:
        return self.cfg.data.workers

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.module.state_dict().items() if self.keeps(k)}

    def load_state_dict(self, state: dict) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{self.cfg.stage} checkpoint does not match the model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.module.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ FSDP (strategy "fsdp")
    sharded: bool = False  # set by shard(): evaluation and export then run on every rank

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The submodules that become their own FSDP units (the root is sharded as well)."""
        raise ConfigError(
            f"strategy 'fsdp' is supported for the llm stage; {self.cfg.stage} trains the tokenizer "
            "(small enough to replicate): use ddp"
        )

    def shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for unit in self.fsdp_units():
            fully_shard(unit)
        fully_shard(self.module)
        self.sharded = True

    def full_state(self, opt) -> tuple[dict, dict]:
        """(kept model state, optimizer state) gathered in full on rank 0 (FSDP: a collective)."""
        if not self.sharded:
            return self.state_dict(), opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = {k: v for k, v in get_model_state_dict(self.module, options=o).items() if self.keeps(k)}
        return model, get_optimizer_state_dict(self.module, opt, options=o)

    def load_full_state(self, model: dict, optim: dict, opt) -> None:
        if not self.sharded:
            self.load_state_dict(model)
            opt.load_state_dict(optim)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        want = {k for k in self.module.state_dict() if self.keeps(k)}
        missing, unexpected = sorted(want - set(model)), sorted(set(model) - want)
        if missing or unexpected:
            raise ValueError(
                f"{self.cfg.stage} checkpoint does not match the model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        o = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.module, model, options=o)
        set_optimizer_state_dict(self.module, opt, optim, options=StateDictOptions(full_state_dict=True))

    def on_step_end(self, step: int, batch, out: dict) -> None:  # e.g. dead-code restarts
        pass

    def on_first_batch(self, batch) -> None:  # e.g. k-means codebook init
        pass

    def evaluate(self) -> dict[str, float]:
        return {}

    def export(self, run: Path) -> None:  # final weights in the project's own format
        pass
