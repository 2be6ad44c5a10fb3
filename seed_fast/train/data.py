"""Image-caption data for training: synthetic shapes, a folder with a caption index, tar shards
(webdataset and Hugging Face `datasets` streams are in `streaming.py`; `sources.py` picks the
config's).

These sources are map-style (random access by index), so one `ResumableBatches` can shuffle them
per epoch with a seed, split each global batch across ranks, and resume at an exact step. A sample that
cannot be read (corrupt image, missing caption, empty shard) comes back as None and is skipped and
counted by `collate`, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..images import to_rgb
from ..models.preprocess import images_to_tensor
from ..synthetic import make_question, make_scene

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Sample:
    image: Image.Image
    caption: str | None  # None for instruction rows that only hold a question and its answer
    key: str
    question: str | None = None
    answer: str | None = None


class SyntheticPairs(torch.utils.data.Dataset):
    """`n` deterministic synthetic pairs; sample i depends only on (seed, split, i). qa=True also
    gives each sample a question about its scene and the answer (instruction data)."""

    def __init__(self, n: int, *, seed: int = 0, size: int = 224, split: str = "train", qa: bool = False):
        if n < 1:
            raise ValueError(f"SyntheticPairs needs n >= 1, got {n}")
        if size < 48:
            raise ValueError(f"synthetic images need size >= 48 pixels, got {size}")
        self.n, self.seed, self.size, self.split, self.qa = n, seed, size, split, qa
        # different splits draw from disjoint seed streams, so held-out pairs are never trained on
        self._offset = {"train": 0, "val": 1 << 40, "test": 2 << 40}.get(split)
        if self._offset is None:
            raise ValueError(f"split must be train, val or test, got {split!r}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:

        rng = random.Random(self.seed * 1_000_003 + self._offset + i)
        image, caption, facts = make_scene(rng, self.size)
        question = answer = None
        if self.qa:
            question, answer = make_question(facts, random.Random(f"qa-{self.seed}-{self.split}-{i}"))
        return Sample(image, caption, f"{self.split}-{i}", question, answer)


def _open_image(data: bytes | Path) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError):  # ImageModeError is a ValueError
        return None


class FolderPairs(torch.utils.data.Dataset):
    """Images under `root` with captions from an index file: JSONL lines {"image": path, "caption":
    text} or a CSV with columns image, caption. Paths are relative to the index file's folder.
    Instruction data adds "question" and "answer" (the caption may then be left out)."""

    def __init__(self, index: str | Path):
        self.index = Path(index)
        if not self.index.is_file():
            raise FileNotFoundError(f"caption index not found: {self.index}")
        root = self.index.parent
        self.rows: list[tuple[Path, str | None, str | None, str | None]] = []
        self.bad_lines = 0
        if self.index.suffix.lower() == ".csv":
            with self.index.open(newline="") as f:
                reader = csv.DictReader(f)
                cols = set(reader.fieldnames or ())
                if "image" not in cols or not ("caption" in cols or {"question", "answer"} <= cols):
                    raise ValueError(
                        f"{self.index}: a CSV index needs the columns image and caption (or question, answer); "
                        f"got {reader.fieldnames}"
                    )
                for r in reader:
                    self.rows.append((root / r["image"], r.get("caption"), r.get("question"), r.get("answer")))
        else:
            for line in self.index.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    self.rows.append((root / r["image"], r.get("caption"), r.get("question"), r.get("answer")))
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.bad_lines += 1
        if not self.rows:
            raise ValueError(f"{self.index} lists no image-caption pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample | None:
        path, caption, question, answer = self.rows[i]
        caption = _text(caption)
        question, answer = _text(question), _text(answer)
        if question is None or answer is None:
            question = answer = None
        if caption is None and question is None:
            return None
        image = _open_image(path)
        return None if image is None else Sample(image, caption, str(path), question, answer)


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


class TarShards(torch.utils.data.Dataset):
    """webdataset-style shards: members `<key>.<jpg|png|...>` with `<key>.txt` (the caption) or
    `<key>.json` ({"caption": ...}). The member headers are scanned once (no image is decoded);
    samples are then read by offset. Shards that cannot be opened or hold no pairs are counted in
    `bad_shards`."""

    def __init__(self, shards: list[str | Path]):
        if not shards:
            raise ValueError("TarShards needs at least one shard")
        self.entries: list[tuple[Path, tarfile.TarInfo, tarfile.TarInfo | None]] = []
        self.bad_shards: list[str] = []
        for shard in map(Path, shards):
            try:
                with tarfile.open(shard) as tf:
                    members = {m.name: m for m in tf.getmembers() if m.isfile()}
            except (OSError, tarfile.TarError):
                self.bad_shards.append(str(shard))
                continue
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for name, m in members.items():
                key, _, ext = name.rpartition(".")
                groups.setdefault(key, {})[ext.lower()] = m
            before = len(self.entries)
            for key in sorted(groups):
                g = groups[key]
                img = next((g[e[1:]] for e in IMAGE_EXTS if e[1:] in g), None)
                if img is not None:
                    self.entries.append((shard, img, g.get("txt") or g.get("json")))
            if len(self.entries) == before:
                self.bad_shards.append(str(shard))
        if not self.entries:
            raise ValueError(
                f"no image-caption pairs in {len(shards)} shard(s) (unreadable or empty: {self.bad_shards})"
            )
        self._open: dict[Path, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: Path, member: tarfile.TarInfo) -> bytes:
        tf = self._open.get(shard)
        if tf is None:
            tf = self._open[shard] = tarfile.open(shard)
        f = tf.extractfile(member)
        return f.read() if f is not None else b""

    def __getitem__(self, i: int) -> Sample | None:
        shard, img, cap = self.entries[i]
        if cap is None:
            return None
        try:
            raw = self._read(shard, cap).decode("utf-8")
            caption = json.loads(raw).get("caption") if cap.name.endswith(".json") else raw
            data = self._read(shard, img)
        except (OSError, tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None
        image = _open_image(data)
        if image is None or not isinstance(caption, str) or not caption.strip():
            return None
        return Sample(image, caption.strip(), f"{shard.name}/{img.name}")

    def __getstate__(self):  # open tar handles do not cross into DataLoader workers
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, S, S) float in [0, 1]
    captions: list[str]
    keys: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.captions)


def make_collate(image_size: int):
    """Samples -> Batch; None samples (and rows without a caption) are dropped and counted in `skipped`."""

    def collate(samples: list[Sample | None]) -> Batch:

        good = [s for s in samples if s is not None and s.caption is not None]
        skipped = len(samples) - len(good)
        if not good:
            return Batch(torch.zeros(0, 3, image_size, image_size), [], [], skipped)
        pixels = images_to_tensor([s.image for s in good], image_size)
        return Batch(pixels, [s.caption for s in good], [s.key for s in good], skipped)

    return collate


@dataclass
class ResumableBatches:
    """Per-epoch seeded permutation of `n` indices cut into global batches; rank r of `world` takes
    its contiguous share of each global batch. `step` counts global batches since the start, so
    (epoch, position in epoch) follow from it and a resumed run sees exactly the same batches."""

    n: int
    global_batch: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle: bool = True
    step: int = 0
    _perm_epoch: int = field(default=-1, repr=False)
    _perm: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by the {self.world} ranks")
        if self.global_batch > self.n:
            raise ValueError(f"global batch {self.global_batch} is larger than the dataset ({self.n} samples)")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch  # the last partial batch is dropped

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """This rank's indices of the next global batch; advances `step`."""
        epoch, k = divmod(self.step, self.steps_per_epoch)
        glob = self._permutation(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        per = self.global_batch // self.world
        self.step += 1
        return glob[self.rank * per : (self.rank + 1) * per]

    def state_dict(self) -> dict:
        return {"step": self.step, "n": self.n, "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for k in ("n", "global_batch", "seed"):
            if state[k] != getattr(self, k):
                raise ValueError(f"cannot resume: the data order changed ({k} was {state[k]}, now {getattr(self, k)})")
        self.step = int(state["step"])


class BatchLoader:
    """Iterates batches from `ResumableBatches`, loading samples in `workers` processes (a
    DataLoader over the index lists, so worker seeding and prefetch are torch's).

    collate: an image size (the image-caption `make_collate`) or a collate function. A dataset
    with `by_epoch = True` is indexed by (epoch, i) pairs, so per-sample random choices can change
    from epoch to epoch and still repeat exactly on resume."""

    def __init__(self, dataset, order: ResumableBatches, collate, *, workers: int = 0, seed: int = 0):
        self.dataset, self.order, self.workers, self.seed = dataset, order, workers, seed
        self.collate = collate if callable(collate) else make_collate(int(collate))

    def take(self, steps: int):
        """The next `steps` batches (advances the order as they are produced)."""
        by_epoch = getattr(self.dataset, "by_epoch", False)
        index_lists = []
        for _ in range(steps):
            epoch = self.order.epoch
            idx = self.order.next_indices()
            index_lists.append([(epoch, i) for i in idx] if by_epoch else idx)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=index_lists,
            collate_fn=self.collate,
            num_workers=self.workers,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed + self.order.step),
        )
        yield from loader


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    random.seed(s)
    try:
        import numpy as np

        np.random.seed(s)
    except ImportError:
        pass
