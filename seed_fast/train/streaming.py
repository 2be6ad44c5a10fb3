"""Streaming training data: webdataset shards (local, `pipe:` commands, http(s) URLs) and Hugging
Face `datasets` streams.

Neither source is indexed before step 1: samples are read in stream order, one epoch after
another, split between ranks and DataLoader workers, and shuffled through a buffer. The order
depends only on the seed, the number of ranks and the number of workers, so a resumed run
fast-forwards each worker past the samples it already gave (they are read again, not decoded) and
then produces the same batches the interrupted run would have.

The split: stream part p of P (P = ranks x workers) takes every P-th shard when there are at least
P shards (the shard order is reshuffled every epoch), otherwise every P-th sample of all of them.
A held-out split (`val_fraction`) is chosen by a hash of each sample's key (webdataset) or of its
image bytes (datasets), so it does not depend on the order samples arrive in.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch

from ..images import to_rgb
from .data import IMAGE_EXTS, Sample, _open_image, _seed_worker, _text, make_collate


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this data source needs the {module!r} package: pip install 'seed_fast[data]' (or pip install {module})"
        ) from e


def key_held_out(key: str, fraction: float, seed: int) -> bool:
    """True for the share `fraction` of keys that form the held-out split (a hash of seed and key)."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=4).digest(), "big")
    return h < int(fraction * 2**32)


class StreamingPairs(torch.utils.data.IterableDataset):
    """Base of the streaming sources. A subclass gives `records(epoch, part, parts)` (raw,
    undecoded records of one stream part, shuffled), `key(record)` and `decode(record)`.

    `split`: "all", "train" (drop the held-out share) or "val" (keep only it), with
    `held_out` = (fraction, seed). The loader sets `rank`, `world`, `batch` (samples per rank and
    step) and `start` (batches this rank has already trained on) through `configure`."""

    streaming = True

    def __init__(self, *, seed: int = 0, shuffle_buffer: int = 1000, split: str = "all", held_out=None):
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be all, train or val, got {split!r}")
        if split != "all" and not held_out:
            raise ValueError(f"split {split!r} needs held_out=(fraction, seed)")
        self.seed, self.shuffle_buffer, self.split, self.held_out = seed, shuffle_buffer, split, held_out
        self.rank, self.world, self.batch, self.start, self.endless = 0, 1, 1, 0, True

    def configure(self, *, rank: int = 0, world: int = 1, batch: int = 1, start: int = 0, endless: bool = True):
        self.rank, self.world, self.batch, self.start, self.endless = rank, world, batch, start, endless
        return self

    # -- subclass API
    def records(self, epoch: int, part: int, parts: int) -> Iterator[dict]:
        raise NotImplementedError

    def key(self, record: dict) -> str:
        raise NotImplementedError

    def decode(self, record: dict) -> Sample | None:
        raise NotImplementedError

    # --
    def _keeps(self, record: dict) -> bool:
        if self.split == "all":
            return True
        return key_held_out(self.key(record), *self.held_out) == (self.split == "val")

    def __iter__(self) -> Iterator[Sample | None]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # A DataLoader takes batch b from worker b % nw. A resumed loader starts again at worker
        # 0, so worker w continues the stream of the worker that batch `start + w` belonged to,
        # past the batches that worker had already given.
        role = (wid + self.start) % nw
        done = max(0, -(-(self.start - role) // nw))
        skip = done * self.batch
        part, parts = self.rank * nw + role, self.world * nw
        epoch = 0
        while True:
            seen = 0
            for rec in self.records(epoch, part, parts):
                if not self._keeps(rec):
                    continue
                seen += 1
                if skip:
                    skip -= 1
                    continue
                yield self.decode(rec)
            if not seen:
                raise ValueError(
                    f"{type(self).__name__}: stream part {part} of {parts} (rank {self.rank}, worker {role}) "
                    f"holds no samples: check the source, or use fewer ranks x data.workers"
                )
            if not self.endless:
                return
            epoch += 1

    def head(self, n: int) -> list[Sample | None]:
        """The first `n` samples of one unshuffled pass (for evaluation: the same ones every time)."""
        was = self.shuffle_buffer, self.rank, self.world, self.batch, self.start, self.endless
        try:
            self.shuffle_buffer = 0
            self.configure(endless=False)
            return list(islice(iter(self), n))
        finally:
            self.shuffle_buffer, self.rank, self.world, self.batch, self.start, self.endless = was


def _shard_share(shards: list, epoch: int, part: int, parts: int, seed: int, shuffle: bool):
    """(shards this part reads, sample stride or None) for one epoch."""
    shards = list(shards)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(shards)
    if len(shards) >= parts:
        return shards[part::parts], None
    return shards, (part, parts)


def _local_path(url: str) -> str | None:
    """The file a shard URL names, or None for a pipe: / remote URL."""
    if url.startswith("file:"):
        return re.sub(r"^file://?", "", url)
    return None if ":" in url.split("/")[0] else url


class WebDatasetPairs(StreamingPairs):
    """webdataset shards: `<key>.<jpg|png|...>` with `<key>.txt` or `<key>.json` ({"caption": ...};
    instruction rows may add "question" / "answer"). `urls`: local paths (globs allowed), brace
    ranges (`shard-{000..127}.tar`), `file:`, `pipe:<command>` and http(s) URLs (read through
    curl), all opened by webdataset. A shard that cannot be opened or read is skipped with a
    warning (and listed in `bad_shards` of the process that read it)."""

    def __init__(self, urls: list[str] | str, **kw):
        super().__init__(**kw)
        shardlists = _need("webdataset.shardlists")
        if isinstance(urls, str):
            urls = [urls]
        shards: list[str] = []
        for url in urls:
            for u in shardlists.expand_urls(str(url)):
                path = _local_path(u)
                shards += sorted(glob.glob(path)) if path is not None and any(c in path for c in "*?[") else [u]
        missing = [u for u in shards if _local_path(u) is not None and not Path(_local_path(u)).is_file()]
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise FileNotFoundError(f"webdataset shards not found: {missing[:5]}{more}")
        if not shards:
            raise ValueError(f"no webdataset shards match {urls}")
        self.shards = shards
        self.bad_shards: list[str] = []

    def _on_error(self, exn: Exception) -> bool:
        where = next((a for a in exn.args if isinstance(a, str) and a in self.shards), "a shard")
        if where not in self.bad_shards:
            self.bad_shards.append(where)
            warnings.warn(f"webdataset: skipping {where}: {exn.args[0] if exn.args else exn!r}", stacklevel=2)
        return True

    def records(self, epoch: int, part: int, parts: int) -> Iterator[dict]:
        tariterators = _need("webdataset.tariterators")
        filters = _need("webdataset.filters")
        mine, stride = _shard_share(self.shards, epoch, part, parts, self.seed, self.shuffle_buffer > 1)
        samples = tariterators.tarfile_samples(({"url": u} for u in mine), handler=self._on_error)
        if stride is not None:
            samples = islice(samples, stride[0], None, stride[1])
        if self.shuffle_buffer > 1:
            rng = random.Random(f"samples:{self.seed}:{epoch}:{part}:{parts}")
            buf = self.shuffle_buffer
            samples = filters._shuffle(iter(samples), bufsize=buf, initial=buf, rng=rng)
        return samples

    def key(self, record: dict) -> str:
        return str(record.get("__key__"))

    def decode(self, record: dict) -> Sample | None:
        data = next((record[e[1:]] for e in IMAGE_EXTS if e[1:] in record), None)
        if data is None:
            return None
        caption = question = answer = None
        try:
            if "json" in record:
                meta = json.loads(record["json"].decode("utf-8"))
                if isinstance(meta, dict):
                    caption, question, answer = (_text(meta.get(k)) for k in ("caption", "question", "answer"))
            if caption is None and "txt" in record:
                caption = _text(record["txt"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None
        if question is None or answer is None:
            question = answer = None
        if caption is None and question is None:
            return None
        image = _open_image(data)
        if image is None:
            return None
        url = str(record.get("__url__", ""))
        return Sample(image, caption, f"{url.rsplit('/', 1)[-1]}/{record['__key__']}", question, answer)


class HFDatasetPairs(StreamingPairs):
    """A Hugging Face dataset read with `load_dataset(..., streaming=True)`: a Hub id, or a
    builder (parquet, imagefolder, webdataset, json, ...) with `data_files`. `image_column` holds
    images (an Image feature, bytes or a path), `caption_column` the text. Rank / worker parts come
    from `datasets.distributed.split_dataset_by_node`, the shuffle buffer from
    `IterableDataset.shuffle` (reseeded every epoch)."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        data_files=None,
        split_name: str = "train",
        image_column: str = "image",
        caption_column: str = "caption",
        revision: str | None = None,
        **kw,
    ):
        super().__init__(**kw)
        datasets = _need("datasets")
        files = [data_files] if isinstance(data_files, str) else list(data_files or [])
        absent = [f for f in files if "://" not in f and not glob.glob(f)]
        if absent:
            raise FileNotFoundError(f"data files of the Hugging Face dataset {path!r} not found: {absent}")
        try:
            ds = datasets.load_dataset(
                path, name, data_files=data_files or None, split=split_name, streaming=True, revision=revision
            )
        except (OSError, ValueError) as e:  # not found, offline, a bad id or config name
            raise ValueError(f"cannot stream the Hugging Face dataset {path!r} (split {split_name!r}): {e}") from e
        cols = list(ds.column_names or [])
        if cols:
            absent = [c for c in (image_column, caption_column) if c not in cols]
            if absent:
                raise ValueError(
                    f"the Hugging Face dataset {path!r} has no column {absent[0]!r} (its columns: {cols}); "
                    f"set data.image_column / data.caption_column"
                )
        feat = (ds.features or {}).get(image_column)
        if isinstance(feat, datasets.Image):  # decode ourselves: a broken image is skipped, not fatal
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.path = ds, path
        self.image_column, self.caption_column = image_column, caption_column

    def records(self, epoch: int, part: int, parts: int) -> Iterator[dict]:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.ds, rank=part, world_size=parts)
        if self.shuffle_buffer > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
        # .iter() rather than iter(): the part is already this worker's, so datasets must not
        # split it again between DataLoader workers
        for row in ds.iter(batch_size=1):
            yield {k: v[0] for k, v in row.items()}

    def _image_bytes(self, value) -> bytes | Path | None:
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            return Path(value["path"]) if value.get("path") else None
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            return Path(value)
        return None

    def key(self, record: dict) -> str:
        data = self._image_bytes(record.get(self.image_column))
        if isinstance(data, Path):
            return str(data)
        return hashlib.blake2b(data or b"", digest_size=16).hexdigest()

    def decode(self, record: dict) -> Sample | None:
        caption = _text(record.get(self.caption_column))
        value = record.get(self.image_column)
        if caption is None or value is None:
            return None
        if hasattr(value, "convert"):  # a PIL image (a column decoded by datasets)
            image = to_rgb(value)
        else:
            data = self._image_bytes(value)
            image = _open_image(data) if data is not None else None
        if image is None:
            return None
        return Sample(image, caption, f"{self.path}/{self.key(record)[:16]}")


class StreamingLoader:
    """Batches of a `StreamingPairs` for one rank: `batch` samples per step, from `workers`
    DataLoader processes; `step` counts the batches already trained on (resume)."""

    def __init__(
        self,
        dataset: StreamingPairs,
        *,
        global_batch: int,
        rank: int,
        world: int,
        step: int,
        collate,
        workers: int = 0,
        seed: int = 0,
    ):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} ranks")
        self.dataset, self.collate, self.workers, self.seed = dataset, collate, workers, seed
        self.batch, self.rank, self.world, self.step = global_batch // world, rank, world, step

    def take(self, steps: int):
        ds = self.dataset.configure(rank=self.rank, world=self.world, batch=self.batch, start=self.step)
        collate = self.collate if callable(self.collate) else make_collate(int(self.collate))
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch,
            collate_fn=collate,
            num_workers=self.workers,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed + self.step),
        )
        for batch in islice(loader, steps):
            self.step += 1
            yield batch
