"""The training loop shared by every stage: torch.distributed (torchrun) or one process, DDP,
AdamW + warm-up / cosine, metrics to JSONL (+ PNG), atomic checkpoints and exact resume.

A run folder holds:
  config.json           the config the run started with
  metrics.jsonl         one line per logged step / evaluation (rank 0)
  checkpoints/step_N/   state.pt (model, optimizer, scheduler, step), rng_rank{r}.pt per rank,
                        manifest.json (every file's size and sha256, written last)
  checkpoints/latest    the name of the newest complete checkpoint (written last, by rename)
A checkpoint folder is written under a temporary name and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never half of one. `--resume` takes the
newest checkpoint whose files match its manifest, whatever `latest` says (missing, stale, or naming a
damaged folder), so it never starts over while an intact checkpoint exists; pruning goes by step
number and never removes the checkpoint just written.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig
from .data import BatchLoader, ResumableBatches
from .stages import TASKS
from .streaming import StreamingLoader
from .task import Task


# ---------------------------------------------------------------------------- distributed
class Dist:
    """Rank / world from torchrun's environment; one process when it is absent."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        self.started = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over ranks (for logging)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def sum_int(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.started and dist.is_initialized():
            if sys.exc_info()[0] is None:
                # on success: every rank gets here before the group goes, and no collective's work
                # object (gloo keeps tensors in them) is left for interpreter shutdown to free: that
                # aborted ("terminate called without an active exception") in about half the runs
                # of the 2-rank FSDP test. After an error a barrier could wait on a dead rank.
                dist.barrier()
            dist.destroy_process_group()
            gc.collect()


# ---------------------------------------------------------------------------- schedule
def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup, cfg.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# ---------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


MANIFEST = "manifest.json"  # each file of a checkpoint with its size and sha256, written last


def _step_of(folder: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", folder.name)
    return int(m.group(1)) if m else -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is intact: its manifest lists
    every file with its size and checksum (folders from before manifests: every zip entry's CRC)."""
    if not (folder / "state.pt").is_file():
        return "no state.pt"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, (size, digest) in sorted(files.items()):
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size or _sha256(f) != digest:
                return f"{name} does not match its size and checksum (truncated or changed)"
        return None
    for f in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                if z.testzip() is not None:
                    return f"{f.name} is damaged"
        except (zipfile.BadZipFile, OSError):
            return f"{f.name} is damaged or truncated"
    return None


def checkpoints_newest_first(run: Path) -> list[Path]:
    """The run's checkpoint folders by step number, the newest first."""
    ck = run / "checkpoints"
    found = [p for p in ck.glob("step_*") if p.is_dir() and _step_of(p) >= 0] if ck.is_dir() else []
    return sorted(found, key=_step_of, reverse=True)


def latest_checkpoint(run: Path, *, say=None) -> Path | None:
    """The newest intact checkpoint: the `step_*` folder of the highest step whose files match its
    manifest, whatever `latest` says (it may be missing, stale after a kill between the folder's
    rename and its own update, or name a removed folder). `say` receives a line for each folder
    passed over."""
    for folder in checkpoints_newest_first(run):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if say is not None:
            say(f"seed-fast train: skipping {folder.name}: {problem}")
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run: Path, step: int, state: dict, d: Dist, keep: int) -> Path:
    """Every rank saves its RNG; rank 0 the rest. Temporary folder, then rename, then `latest`."""
    ck = run / "checkpoints"
    final, tmp = ck / f"step_{step:08d}", ck / f".tmp_step_{step:08d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.main:
        torch.save(state, tmp / "state.pt")
    d.barrier()
    if d.main:
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = [f.stat().st_size, _sha256(f)]
        _atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(ck / "latest", final.name)
        # prune by step number, never the checkpoint just written
        older = [p for p in checkpoints_newest_first(run) if p != final]
        for old in older[max(0, keep - 1) :]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


# ---------------------------------------------------------------------------- the loop
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has oneDNN's bf16 kernels (AVX-512 BF16 or AMX): bf16 autocast is fast there and
    far slower than fp32 elsewhere."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None, stop_after: int | None = None
) -> dict:
    """Run (or resume) `cfg`. Returns the last logged metrics (rank 0) or {}.
    stop_after: stop once this many steps are done in this call (without a final checkpoint)."""
    d = Dist()
    run = Path(cfg.out)
    trackers = None
    try:
        if d.main:
            run.mkdir(parents=True, exist_ok=True)
            if not resume and checkpoints_newest_first(run):
                raise FileExistsError(
                    f"{run} already holds a run: pass --resume to continue it, or choose another --out"
                )
            _atomic_write_text(run / "config.json", json.dumps(cfg.to_dict(), indent=1))
            if not resume:
                (run / "metrics.jsonl").unlink(missing_ok=True)
        d.barrier()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        random.seed(cfg.seed)
        task = TASKS[cfg.stage](cfg, d.device)
        fsdp = d.world > 1 and cfg.strategy == "fsdp"
        if fsdp:
            task.shard()
        params = task.trainable_parameters()
        opt = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        step = 0
        ck = latest_checkpoint(run, say=print if d.main else None) if resume else None
        if resume and ck is None:
            if d.main:
                print(f"seed-fast train: no intact checkpoint in {run}; starting from step 0")
            _truncate_metrics(run / "metrics.jsonl", 0, d)  # the steps will be logged again
        if ck is not None:
            if d.main:
                print(f"seed-fast train: resuming from {ck.name}")
            state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
            was = state.get("strategy", "ddp")
            if was != ("fsdp" if fsdp else "ddp"):
                raise ValueError(
                    f"{ck} was written by a {was} run; resume it with the same strategy (the optimizer state differs)"
                )
            task.load_full_state(state["model"], state["optimizer"], opt)
            sched.load_state_dict(state["scheduler"])
            step = int(state["step"])
            rng = ck / f"rng_rank{d.rank}.pt"
            if rng.exists():
                _set_rng_state(torch.load(rng, weights_only=True))
            _truncate_metrics(run / "metrics.jsonl", step, d)
        trackers = Trackers(run, cfg, step) if d.main else None
        module = task.module
        if d.world > 1 and not fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        show = d.main if progress is None else (progress and d.main)
        task.progress = show
        ds = task.dataset()
        if getattr(ds, "streaming", False):
            loader = StreamingLoader(
                ds,
                global_batch=cfg.global_batch,
                rank=d.rank,
                world=d.world,
                step=step,
                collate=task.collate(),
                workers=task.workers,
                seed=cfg.seed,
            )
            if step and d.main:
                print(
                    f"seed-fast train: streaming data: each data worker first reads past (without decoding) "
                    f"the samples of the {step} steps already trained on"
                )
        else:
            order = ResumableBatches(
                len(ds), cfg.global_batch, seed=cfg.data.seed, rank=d.rank, world=d.world, step=step
            )
            loader = BatchLoader(ds, order, task.collate(), workers=task.workers, seed=cfg.seed)
        todo = cfg.steps - step if stop_after is None else min(cfg.steps - step, stop_after)
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.stage}", unit="step")
        if cfg.precision == "bf16" and d.device.type == "cpu" and d.main and not cpu_has_fast_bf16():
            warnings.warn(
                "precision bf16 on a CPU without oneDNN's bf16 kernels (no AVX-512 BF16 / AMX): autocast "
                "falls back to slow paths (an LLM step measured about 25x slower than fp32 on an AVX2 CPU); "
                "consider precision fp32",
                stacklevel=2,
            )
        amp = torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
        last: dict = {}
        t0 = time.perf_counter()
        skipped_total = 0
        for batch in loader.take(todo):
            if step == 0:
                task.on_first_batch(batch)
            module.train()
            with amp:
                out = module(batch)
            out["loss"].backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            task.on_step_end(step, batch, out)
            skipped_total += d.sum_int(batch.skipped)
            if step % cfg.log_every == 0 or step == cfg.steps:
                parts = d.mean({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
                last = {
                    "step": step,
                    "lr": sched.get_last_lr()[0],
                    **parts,
                    "skipped": skipped_total,
                    "time_s": round(time.perf_counter() - t0, 3),
                }
                _log(run, last, d, trackers)
                if bar is not None:
                    bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                _evaluate(task, run, step, d, trackers)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                model_state, optim_state = task.full_state(opt)
                save_checkpoint(
                    run,
                    step,
                    {
                        "model": model_state,
                        "optimizer": optim_state,
                        "scheduler": sched.state_dict(),
                        "step": step,
                        "strategy": "fsdp" if fsdp else "ddp",
                    },
                    d,
                    cfg.keep_checkpoints,
                )
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if step == cfg.steps:
            ev = _evaluate(task, run, step, d, trackers)
            last.update(ev)
            if d.main or task.sharded:  # a sharded model is gathered for export by every rank
                task.export(run)
            if d.main:
                plot_metrics(run)
        return last if d.main else {}
    finally:
        if trackers is not None:
            trackers.close()
        d.close()


class Trackers:
    """The experiment trackers of `cfg.report_to` besides metrics.jsonl, on rank 0: TensorBoard
    (`<out>/tensorboard`; "auto" takes it when installed) and Weights & Biases (only when asked
    for; `wandb` reads its own settings, e.g. WANDB_MODE=offline). A resumed run drops the
    TensorBoard events logged after its checkpoint, as metrics.jsonl drops those lines; it continues
    the same W&B run (its id is kept in `<out>/wandb_run_id`), where W&B keeps the first value of a
    step logged twice."""

    def __init__(self, run: Path, cfg: TrainConfig, step: int):
        import importlib.util

        asked = set(cfg.report_to)
        self.tb = self.wandb = None
        if "tensorboard" in asked or ("auto" in asked and importlib.util.find_spec("tensorboard") is not None):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=step + 1 if step else None)
        if "wandb" in asked:
            import secrets

            import wandb

            # one W&B run per run folder: a resumed run continues it under the id kept in the folder
            id_file = run / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            if not run_id:
                run_id = secrets.token_hex(6)
                _atomic_write_text(id_file, run_id + "\n")
            self.wandb = wandb.init(
                project="seed_fast", name=run.name, dir=str(run), config=cfg.to_dict(), id=run_id, resume="allow"
            )

    def log(self, record: dict) -> None:
        step = int(record["step"])
        prefix = "eval/" if record.get("eval") else "train/"
        scalars = {
            prefix + k: float(v)
            for k, v in record.items()
            if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _log(run: Path, record: dict, d: Dist, trackers: Trackers | None = None) -> None:
    if d.main:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if trackers is not None:
            trackers.log(record)


def _evaluate(task: Task, run: Path, step: int, d: Dist, trackers: Trackers | None = None) -> dict:
    if not d.main and not task.sharded:  # a sharded model's forward needs every rank
        d.barrier()
        return {}
    task.module.eval()
    with torch.no_grad():
        metrics = task.evaluate()
    if metrics:
        _log(run, {"step": step, "eval": True, **metrics}, d, trackers)
    d.barrier()
    return metrics if d.main else {}


def _truncate_metrics(path: Path, step: int, d: Dist) -> None:
    """Drop log lines past the checkpoint being resumed (they will be produced again)."""
    if not d.main or not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(run: str | Path) -> list[dict]:
    p = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def plot_metrics(run: Path) -> Path | None:
    """metrics.png: every logged scalar against the step (skipped, with a warning, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            f"{run}/metrics.png not drawn: matplotlib is not installed (pip install matplotlib); "
            "the numbers are in metrics.jsonl",
            stacklevel=2,
        )
        return None
    rows = read_metrics(run)
    train_rows = [r for r in rows if not r.get("eval")]
    keys = [k for k in (train_rows[0] if train_rows else {}) if k not in ("step", "time_s", "skipped")]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot([r["step"] for r in train_rows], [r[k] for r in train_rows])
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    out = run / "metrics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
