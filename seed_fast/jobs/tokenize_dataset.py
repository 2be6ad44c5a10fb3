"""Tokenize a whole image dataset into code shards: one process per GPU under torchrun, resumable.

    torchrun --nproc-per-node 8 -m seed_fast.jobs.tokenize_dataset '/data/laion/{000000..000999}.tar' \\
        --out /data/laion-codes --checkpoint seed-tokenizer-2/ --dtype bfloat16
    seed-fast tokenize-dataset /data/images --out codes/ --checkpoint seed-tokenizer-2/    # one process

Sources: a folder of images (recursive; key = the path relative to the folder, `a/b.jpg`), or
webdataset-style tar shards (a folder of them, a glob, a `{000..099}` range or a list of paths; members
`<key>.<ext>` with ext an image extension, split at the first dot of the file name as webdataset does;
key = `<shard name>/<key>`). Rank r of W owns every W-th unit (tar shard or image file) in sorted
order and opens only those; tar shards are read as streams, never scanned ahead.

out_dir (every file written under a temporary name, then renamed into place):
  job.json                    the model (config hash, weight hash, dtype) and source it belongs to
  codes-r{rank}-{n:05d}.npz   `keys` (N,) str and `codes` (N, 32) int16 (int32 past 32768 codes)
  progress-r{rank}.json       the rank's committed shards and finished tar shards (after each shard)
  skipped-r{rank}.jsonl       what could not be read: {"key", "reason"} per image ({"shard", ...} for
                              a tar that broke off, {"member", ...} for a second image of one key)
  index.json                  by rank 0 once every rank has finished: every shard and its count

Resume: the progress files are the truth. At start, temporary files and shard files that no progress
file lists (a kill between the two renames) are removed; keys in listed shards or in a skipped file
are not read again; so each image's codes are in exactly one shard file. The rank count may change
between runs. A folder written for another model, dtype or source is refused, as is one holding
files this job did not write.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..images import to_rgb
from ..models import SeedTokenizer

FORMAT_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# ranks finish at different times; a crashed rank ends the others through torchrun, not this timeout
BARRIER_TIMEOUT = timedelta(days=7)
PLAIN_PROGRESS_EVERY_S = 30.0

_OWN_FILE = re.compile(
    r"(job\.json|index\.json|progress-r\d+\.json|skipped-r\d+\.jsonl|codes-r\d+-\d{5,}\.npz"
    r"|\.(job\.json|index\.json|progress-r\d+\.json|codes-r\d+-\d{5,}\.npz)\.tmp)"
)
_SHARD_FILE = re.compile(r"codes-r(\d+)-(\d{5,})\.npz")


class JobError(ValueError):
    """An out_dir this job cannot start or resume in (another job's, foreign files, damaged)."""


@dataclass
class TokenizeSummary:
    """What one rank did in this run; the totals (over every rank and earlier runs) on every rank."""

    rank: int
    world: int
    images: int  # tokenized by this rank in this run
    skipped: int  # unreadable images (and broken tar shards) this rank met in this run
    seconds: float
    images_per_s: float
    out_dir: Path
    total_images: int = 0  # in all shards of out_dir
    total_skipped: int = 0
    index: Path | None = None


# ---------------------------------------------------------------------------- sources
@dataclass
class _Source:
    kind: str  # "folder" | "tar"
    where: str  # for messages and job.json
    units: list[tuple[str, Path]]  # (name, path): image files (name = key) or tar shards, sorted

    def identity(self) -> dict:
        names = "\n".join(n for n, _ in self.units).encode()
        return {"kind": self.kind, "units": len(self.units), "names_sha256": hashlib.sha256(names).hexdigest()}


def _is_tar(path: str | Path) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _expand_braces(spec: str) -> list[str]:
    """webdataset's `{000..099}` numeric ranges (zero padding kept), several allowed."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m is None:
        return [spec]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    if hi < lo:
        raise ValueError(f"empty shard range {m.group(0)} in {spec!r}")
    out = []
    for i in range(lo, hi + 1):
        out += _expand_braces(spec[: m.start()] + str(i).zfill(width) + spec[m.end() :])
    return out


def _resolve_source(source) -> _Source:
    if isinstance(source, (str, os.PathLike)):
        specs = [os.fspath(source)]
    elif isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        specs = [os.fspath(s) for s in source]
    else:
        raise ValueError(f"source must be a folder, a tar shard pattern or a list of tar shards, got {source!r}")
    if len(specs) == 1 and Path(specs[0]).is_dir():
        return _scan_folder(Path(specs[0]))
    paths: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec))
            if not found:
                raise FileNotFoundError(f"no file matches {spec!r}")
            paths += found
        else:
            for p in _expand_braces(spec):
                if not Path(p).exists():
                    raise FileNotFoundError(f"no such folder or tar shard: {p}")
                paths.append(p)
    not_tar = [p for p in paths if Path(p).is_dir() or not _is_tar(p)]
    if not_tar:
        raise ValueError(
            f"{not_tar[0]} is not a tar shard ({', '.join(TAR_SUFFIXES)}); give one folder of images, "
            "or tar shards (a folder of them, a glob, a {000..099} range or several paths)"
        )
    units = sorted((Path(p).name, Path(p)) for p in paths)
    dup = sorted(n for n, k in Counter(n for n, _ in units).items() if k > 1)
    if dup:
        raise ValueError(f"two tar shards have the same name {dup[0]!r}: keys are <shard name>/<key>")
    return _Source("tar", " ".join(specs), units)


def _scan_folder(root: Path) -> _Source:
    """Image files (or else tar shards) under root, by path relative to it; no file is opened."""
    images, tars = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            name = (rel / f).as_posix()
            if _is_tar(f):
                tars.append((name, Path(dirpath) / f))
            elif f.rpartition(".")[2].lower() in IMAGE_EXTS:
                images.append((name, Path(dirpath) / f))
    if images and tars:
        raise ValueError(
            f"{root} holds both images ({images[0][0]}, ...) and tar shards ({tars[0][0]}, ...); "
            "point the job at one kind"
        )
    if not images and not tars:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) and no tar shards under {root}")
    kind = "folder" if images else "tar"
    return _Source(kind, str(root), sorted(images or tars))


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's split: `dir/abc.seg.png` -> (`dir/abc`, `seg.png`)."""
    name = name[2:] if name.startswith("./") else name
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


# ---------------------------------------------------------------------------- reading (workers)
@dataclass
class _Chunk:
    keys: list[str]
    units: list[str]  # the unit (tar shard or file) of each key
    pixels: torch.Tensor | None  # (n, 3, S, S) uint8, resized as SeedTokenizer.encode resizes PIL images
    skipped: list[dict] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # tar shards read to their end

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def _decode(src, size: int, where: str) -> np.ndarray:
    """The pixels SeedTokenizer.encode([PIL image]) would see: to_rgb, PIL bicubic resize."""
    from PIL import Image

    with Image.open(src) as im:
        im = to_rgb(im, where)
    if im.width == 0 or im.height == 0:
        raise ValueError(f"empty image ({im.width}x{im.height})")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


class _ImageStream(torch.utils.data.IterableDataset):
    """This rank's remaining units, split again over DataLoader workers; yields `_Chunk`s in order."""

    def __init__(self, kind: str, units, done: set[str], size: int, chunk: int):
        self.kind, self.units, self.done, self.size, self.chunk = kind, units, done, size, chunk

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        units = self.units if info is None else self.units[info.id :: info.num_workers]
        buf = _Chunk([], [], None)
        arrays: list[np.ndarray] = []

        def flush():
            nonlocal buf, arrays
            if arrays:
                buf.pixels = torch.from_numpy(np.stack(arrays))
            out, buf, arrays = buf, _Chunk([], [], None), []
            return out

        def add(key, unit, src):
            try:
                arrays.append(_decode(src, self.size, key))
            # PIL's decoders raise many types (OSError, SyntaxError, struct.error, DecompressionBombError,
            # ...): one unreadable image is listed in the skipped file, never the end of the job
            except Exception as e:
                buf.skipped.append({"key": key, "reason": _reason(e)})
                return
            buf.keys.append(key)
            buf.units.append(unit)

        for name, path in units:
            if self.kind == "folder":
                add(name, name, path)
            else:
                for event, value in self._members(name, path):
                    if event == "image":
                        add(value[0], name, io.BytesIO(value[1]))
                    elif event == "skip":
                        buf.skipped.append(value)
                    else:  # "end": after every image of the shard, so it is done once they are committed
                        buf.finished.append(name)
                    if len(arrays) >= self.chunk:
                        yield flush()
            if len(arrays) >= self.chunk:
                yield flush()
        if arrays or buf.skipped or buf.finished:
            yield flush()

    def _members(self, name: str, path: Path):
        """("image", (key, bytes)) for each image member not yet done, ("skip", record), and ("end",
        None) once the shard is read to its end; a shard that breaks off has no "end" (read again by
        the next run)."""
        seen: set[str] = set()
        try:
            with tarfile.open(path, mode="r|*") as tf:  # a stream: members in order, nothing read ahead
                for m in tf:
                    if not m.isfile():
                        continue
                    stem, ext = _split_member(m.name)
                    if ext.lower() not in IMAGE_EXTS:
                        continue
                    key = f"{name}/{stem}"
                    if key in seen:
                        yield "skip", {"member": f"{name}/{m.name}", "reason": f"a second image for key {key}"}
                        continue
                    seen.add(key)
                    if key in self.done:
                        continue
                    f = tf.extractfile(m)
                    yield "image", (key, f.read() if f is not None else b"")
        except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
            yield "skip", {"shard": name, "reason": _reason(e)}
            return
        yield "end", None


# ---------------------------------------------------------------------------- out_dir
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JobError(f"{path} cannot be read ({e}); it is not as this job writes it") from None


def _progress_files(out: Path) -> dict[int, dict]:
    found = {}
    for p in sorted(out.glob("progress-r*.json")):
        m = re.fullmatch(r"progress-r(\d+)\.json", p.name)
        if m:
            found[int(m.group(1))] = _read_json(p)
    return found


def _skipped_records(out: Path) -> list[dict]:
    """Every record of every skipped file; a line cut off by a kill is ignored (its image is retried)."""
    records = []
    for p in sorted(out.glob("skipped-r*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _prepare_out_dir(out: Path, job: dict, resume: bool) -> None:
    """Rank 0, before any rank writes: refuse a folder that is not this job's, write job.json or
    check it, and remove what a killed run left half-done (temporary files, unlisted shards)."""
    if out.exists() and not out.is_dir():
        raise JobError(f"out_dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not _OWN_FILE.fullmatch(n)]
    if foreign:
        raise JobError(
            f"out_dir {out} holds files this job did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); give an empty or new folder"
        )
    job_path = out / "job.json"
    if not job_path.exists():
        if names == [".job.json.tmp"]:  # killed while writing job.json: nothing else was written
            (out / names.pop()).unlink()
        if names:
            raise JobError(f"out_dir {out} holds tokenize-dataset files but no job.json; give an empty or new folder")
        _write_json(job_path, job)
        return
    if not resume:
        raise JobError(f"out_dir {out} already holds a tokenize-dataset job; resume it, or give a new folder")
    old = _read_json(job_path)
    for part, what in (("model", "model"), ("source", "source")):
        if old.get(part) != job[part]:
            diff = sorted(
                k for k in set(old.get(part) or {}) | set(job[part]) if (old.get(part) or {}).get(k) != job[part].get(k)
            )
            raise JobError(
                f"out_dir {out} was written with a different {what} ({', '.join(diff)}: "
                f"{_short(old.get(part), diff)} there, {_short(job[part], diff)} now); "
                "resume with the same one, or give a new folder"
            )
    listed = set()
    for rank, prog in _progress_files(out).items():
        for s in prog.get("shards", []):
            if not (out / s["file"]).is_file():
                raise JobError(f"out_dir {out}: {s['file']}, listed in progress-r{rank}.json, is missing")
            listed.add(s["file"])
    for n in names:
        if n.endswith(".tmp") or (_SHARD_FILE.fullmatch(n) and n not in listed):
            (out / n).unlink()


def _short(d, keys) -> str:
    d = d or {}
    return ", ".join(str(d.get(k))[:16] for k in keys)


def _model_identity(tok, dtype: torch.dtype) -> dict:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(tok.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy of a 4 GB model
    cfg = json.dumps(tok.config.to_dict(), sort_keys=True).encode()
    return {
        "config": tok.config.name,
        "config_sha256": hashlib.sha256(cfg).hexdigest(),
        "weights_blake2b": h.hexdigest(),
        "dtype": str(dtype).removeprefix("torch."),
        "codes_per_image": tok.num_codes,
        "codebook_size": tok.codebook_size,
    }


# ---------------------------------------------------------------------------- writing
class _ShardWriter:
    """Buffers codes; commits `shard_size` of them at a time: shard file, then the progress file."""

    def __init__(self, out: Path, rank: int, progress: dict | None, shard_size: int, code_dtype, tar: bool):
        self.out, self.rank, self.shard_size, self.code_dtype, self.tar = out, rank, shard_size, code_dtype, tar
        self.progress = progress or {"format": FORMAT_VERSION, "rank": rank, "shards": [], "sources_done": []}
        self.progress["finished"] = False
        done = [int(_SHARD_FILE.fullmatch(s["file"]).group(2)) for s in self.progress["shards"]]
        self.next_index = max(done, default=-1) + 1
        self.keys: list[str] = []
        self.units: list[str] = []
        self.codes: list[np.ndarray] = []
        self.buffered = 0
        self.committed = 0  # images of this run in shard files
        self.finishing: list[tuple[int, str]] = []  # (stream position, tar shard): done once committed past it

    def add(self, keys, units, codes: np.ndarray) -> None:
        self.keys += keys
        self.units += units
        self.codes.append(codes)
        self.buffered += len(keys)
        while self.buffered >= self.shard_size:
            self._commit(self.shard_size)

    def unit_finished(self, name: str, position: int) -> None:
        self.finishing.append((position, name))

    def finish(self) -> None:
        if self.buffered:
            self._commit(self.buffered)
        self.progress["finished"] = True
        self._mark_done()
        _write_json(self.out / f"progress-r{self.rank}.json", self.progress)

    def _mark_done(self) -> None:
        ready = [n for pos, n in self.finishing if pos <= self.committed]
        self.finishing = [(pos, n) for pos, n in self.finishing if pos > self.committed]
        self.progress["sources_done"] += ready

    def _commit(self, n: int) -> None:
        codes = np.concatenate(self.codes) if len(self.codes) > 1 else self.codes[0]
        keys, units = self.keys[:n], self.units[:n]
        name = f"codes-r{self.rank}-{self.next_index:05d}.npz"
        buf = io.BytesIO()
        np.savez(buf, keys=np.array(keys, dtype=str), codes=codes[:n].astype(self.code_dtype))
        _write_atomic(self.out / name, buf.getvalue())
        entry = {"file": name, "count": n}
        if self.tar:  # which tar shards: a resume reads the keys of only those not finished
            entry["sources"] = sorted(set(units))
        self.progress["shards"].append(entry)
        self.next_index += 1
        self.committed += n
        self._mark_done()
        _write_json(self.out / f"progress-r{self.rank}.json", self.progress)
        self.keys, self.units = self.keys[n:], self.units[n:]
        self.codes = [codes[n:]] if n < len(codes) else []
        self.buffered -= n


class _SkipLog:
    """Appends to skipped-r{rank}.jsonl, each record once across runs."""

    def __init__(self, out: Path, rank: int, seen: set[str]):
        self.path, self.seen, self.count = out / f"skipped-r{rank}.jsonl", seen, 0

    def add(self, rec: dict) -> None:
        line = json.dumps(rec, sort_keys=True)
        self.count += 1
        if line in self.seen:
            return
        self.seen.add(line)
        lead = ""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                lead = "" if f.read(1) == b"\n" else "\n"  # a line cut off by a kill stays on its own
        with open(self.path, "a") as f:
            f.write(lead + line + "\n")


class _Progress:
    """A tqdm bar when tqdm is installed, else a line every PLAIN_PROGRESS_EVERY_S seconds."""

    def __init__(self, enabled: bool, total: int | None, desc: str):
        self.enabled, self.total, self.desc, self.n = enabled, total, desc, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= PLAIN_PROGRESS_EVERY_S:
            self.last = time.perf_counter()
            rate = self.n / max(self.last - self.t0, 1e-9)
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.n}{of} images, {rate:.1f} images/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- the job
class _Dist:
    """torchrun's environment (or an initialized process group); one process without it."""

    def __init__(self, device):
        self.started = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank if self.world > 1 else torch.cuda.current_device())
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
            self.started = True

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.started:
            dist.destroy_process_group()


def _check_args(batch_size, shard_size, num_workers, checkpoint, preset) -> None:
    for name, v, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    ):
        raise ValueError(f"num_workers must be an integer >= 0 or None, got {num_workers!r}")
    if (checkpoint is None) == (preset is None):
        raise ValueError(
            "give one of checkpoint (a SeedTokenizer.save_pretrained folder) and preset (random weights)"
            + (", not both" if checkpoint is not None else "")
        )


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def _default_workers(world: int) -> int:
    """Decoding beside the model: the rank's share of the CPUs less one, at most 8; none on 2 cores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(0, min(8, cpus // max(local, 1) - 1))


def tokenize_dataset(
    source,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    preset: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    shard_size: int = 10000,
    num_workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TokenizeSummary:
    """Codes of every image of `source` into code shards in `out_dir` (see the module docstring).

    source: a folder of images, or tar shards (a folder of them, a glob, a `{000..099}` range, or a
    list of paths). checkpoint: a `SeedTokenizer.save_pretrained` folder; preset: random weights of
    a named config instead (seed 0; for trying the pipeline). device: default cuda:LOCAL_RANK when
    CUDA is there, else cpu; dtype: default the checkpoint's (float32). num_workers: DataLoader
    processes decoding images per rank (default: the rank's share of the CPUs less one, at most 8).
    resume=False refuses an out_dir that already holds a job instead of continuing it.
    Under torchrun every rank calls this with the same arguments; rank 0 writes index.json after
    every rank has finished. Returns this rank's `TokenizeSummary`.
    """
    _check_args(batch_size, shard_size, num_workers, checkpoint, preset)
    dtype = _dtype(dtype)
    src = _resolve_source(source)
    out = Path(out_dir)

    if checkpoint is not None:
        tok = SeedTokenizer.from_pretrained(checkpoint)
    else:
        tok = SeedTokenizer.from_config(preset, seed=0)
    dtype = dtype or tok.dtype
    d = _Dist(device)
    try:
        return _run(tok, src, out, d, dtype, batch_size, shard_size, num_workers, resume, progress, preset)
    finally:
        d.close()


def _earlier_runs(out: Path, kind: str):
    """What earlier runs did: each rank's progress, the finished tar shards, the keys not to read
    again (committed, from unfinished tar shards only, or skipped) and the skipped records."""
    progress_by_rank = _progress_files(out)
    sources_done = {s for p in progress_by_rank.values() for s in p.get("sources_done", [])}
    done: set[str] = set()
    for p in progress_by_rank.values():
        for s in p.get("shards", []):
            if kind == "tar" and set(s.get("sources", [])) <= sources_done:
                continue
            try:
                with np.load(out / s["file"], allow_pickle=False) as z:
                    keys = z["keys"].tolist()
            except (OSError, ValueError, KeyError) as e:
                raise JobError(f"{out / s['file']} cannot be read ({e}); out_dir is damaged") from None
            if len(keys) != s["count"]:
                raise JobError(f"{out / s['file']} holds {len(keys)} keys, its progress file says {s['count']}")
            done.update(keys)
    records = _skipped_records(out)
    done.update(r["key"] for r in records if isinstance(r.get("key"), str))
    return progress_by_rank, sources_done, done, records


def _run(tok, src, out, d, dtype, batch_size, shard_size, num_workers, resume, progress, preset):
    job = error = None
    if d.rank == 0:
        if preset is not None:
            print(
                f"tokenize-dataset: RANDOM weights (preset {preset!r}, seed 0): codes are reproducible but meaningless",
                file=sys.stderr,
            )

        job = {
            "format": FORMAT_VERSION,
            "job": "seed_fast.tokenize_dataset",
            "seed_fast": __version__,
            "model": _model_identity(tok, dtype),
            "source": src.identity(),
            "source_path": src.where,
        }
        try:
            _prepare_out_dir(out, job, resume)
        except (JobError, OSError) as e:
            error = str(e)
    error = d.broadcast(error)  # every rank stops on rank 0's refusal, before writing anything
    if error is not None:
        raise JobError(error)
    tok = tok.to(device=d.device, dtype=dtype).eval()

    progress_by_rank, sources_done, done, records = _earlier_runs(out, src.kind)

    mine = src.units[d.rank :: d.world]
    if src.kind == "folder":
        todo = [(n, p) for n, p in mine if n not in done]
        total = len(todo)
    else:
        todo = [(n, p) for n, p in mine if n not in sources_done]
        total = None
    size = tok.config.vision.image_size
    stream = _ImageStream(src.kind, todo, done, size, chunk=min(batch_size, 64))
    workers = min(_default_workers(d.world) if num_workers is None else num_workers, len(todo))
    if workers:
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=d.device.type == "cuda",
            prefetch_factor=4,
        )
    else:
        loader = stream

    code_dtype = np.int16 if tok.codebook_size <= 2**15 else np.int32
    writer = _ShardWriter(out, d.rank, progress_by_rank.get(d.rank), shard_size, code_dtype, src.kind == "tar")
    skiplog = _SkipLog(out, d.rank, {json.dumps(r, sort_keys=True) for r in records})
    bar = _Progress(progress and d.rank == 0, total, f"tokenize-dataset rank 0/{d.world}")
    if total is None and bar.bar is not None:
        bar.bar.set_postfix_str(f"{len(todo)} tar shards")
    staged: list[_Chunk] = []
    staged_n = position = 0

    def encode(n: int) -> None:
        nonlocal staged, staged_n
        keys, units, parts, left = [], [], [], n
        while left:
            c = staged[0]
            take = min(left, len(c.keys))
            keys += c.keys[:take]
            units += c.units[:take]
            parts.append(c.pixels[:take])
            if take == len(c.keys):
                staged.pop(0)
            else:
                c.keys, c.units, c.pixels = c.keys[take:], c.units[take:], c.pixels[take:]
            left -= take
        pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
        codes = tok.encode(pixels.to(d.device, non_blocking=True))  # (n, 32) int64
        staged_n -= n
        writer.add(keys, units, codes.cpu().numpy())
        bar.update(n)

    t0 = time.perf_counter()
    try:
        for chunk in loader:
            for rec in chunk.skipped:
                skiplog.add(rec)
            bar.update(sum("key" in rec for rec in chunk.skipped))  # the bar counts files read
            if chunk.keys:
                staged.append(chunk)
                staged_n += len(chunk.keys)
                position += len(chunk.keys)
            for name in chunk.finished:
                writer.unit_finished(name, position)
            while staged_n >= batch_size:
                encode(batch_size)
        if staged_n:
            encode(staged_n)
        writer.finish()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    n = writer.committed
    rate = n / seconds if seconds > 0 else 0.0
    print(
        f"tokenize-dataset: rank {d.rank}/{d.world}: {n} images tokenized, {skiplog.count} skipped, "
        f"{rate:.1f} images/s ({seconds:.1f} s)",
        file=sys.stderr,
        flush=True,
    )

    # every rank has finished before rank 0 writes the index (all_gather is the barrier)
    stats = d.gather({"images": n, "seconds": seconds})
    index = None
    totals = [0, 0]
    if d.rank == 0:
        index, totals = _write_index(out, job, d.world, code_dtype)
        total_s = max(s["seconds"] for s in stats)
        run_n = sum(s["images"] for s in stats)
        print(
            f"tokenize-dataset: done: {run_n} images in this run ({run_n / max(total_s, 1e-9):.1f} images/s over "
            f"{d.world} rank(s)); {totals[0]} images in {out}, {totals[1]} skipped; index: {index}",
            file=sys.stderr,
            flush=True,
        )
    totals = d.broadcast(totals)
    return TokenizeSummary(
        rank=d.rank,
        world=d.world,
        images=n,
        skipped=skiplog.count,
        seconds=seconds,
        images_per_s=rate,
        out_dir=out,
        total_images=totals[0],
        total_skipped=totals[1],
        index=index,
    )


def _write_index(out: Path, job: dict, world: int, code_dtype) -> tuple[Path, list[int]]:
    shards = []
    for rank, p in sorted(_progress_files(out).items()):
        shards += [{"file": s["file"], "rank": rank, "count": s["count"]} for s in p.get("shards", [])]
    records = _skipped_records(out)
    images = sum(s["count"] for s in shards)
    skipped = len({r["key"] for r in records if "key" in r})
    index = {
        "format": FORMAT_VERSION,
        "job": job["job"],
        "model": job["model"],
        "source": job["source"],
        "source_path": job["source_path"],
        "codes_per_image": job["model"]["codes_per_image"],
        "codebook_size": job["model"]["codebook_size"],
        "code_dtype": np.dtype(code_dtype).name,
        "images": images,
        "skipped_images": skipped,
        "broken_tar_shards": sorted({r["shard"] for r in records if "shard" in r}),
        "ranks": world,
        "shards": shards,
    }
    path = out / "index.json"
    _write_json(path, index)
    return path, [images, skipped]


def load_codes(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: codes (32,)} of a finished job (reads index.json and every shard it lists)."""
    out = Path(out_dir)
    index = _read_json(out / "index.json")
    codes = {}
    for s in index["shards"]:
        with np.load(out / s["file"], allow_pickle=False) as z:
            for k, c in zip(z["keys"].tolist(), z["codes"]):
                if k in codes:
                    raise JobError(f"key {k!r} is in two shards of {out}")
                codes[k] = c
    return codes


# ---------------------------------------------------------------------------- command line
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible; use --device cpu")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `seed-fast tokenize-dataset` and `python -m seed_fast.jobs.tokenize_dataset`."""
    _positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)
    p.add_argument(
        "source",
        nargs="+",
        help="a folder of images, or tar shards: a folder of them, a glob, a {000..099} range, or several paths",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the code shards, progress files and index.json")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", metavar="DIR", help="a SeedTokenizer save_pretrained folder")
    g.add_argument(
        "--preset", help="random weights of this preset, seed 0 (to try the pipeline: codes are meaningless)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--shard-size", type=_positive_int, default=10000, help="images per code shard (default 10000)")
    p.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=None,
        help="image-decoding processes per rank (default: the rank's share of the CPUs less one, at most 8)",
    )
    p.add_argument("--device", type=_device, default=None, help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: the checkpoint's"
    )
    p.add_argument("--no-resume", action="store_true", help="refuse an out_dir that already holds a job")
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args, prog: str = "seed-fast tokenize-dataset") -> int:
    """A user's mistake (or a refused out_dir) ends in one line and exit status 2."""
    try:
        tokenize_dataset(
            args.source[0] if len(args.source) == 1 else args.source,
            args.out,
            checkpoint=args.checkpoint,
            preset=args.preset,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            resume=not args.no_resume,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # JobError, CheckpointError are ValueErrors
        if getattr(args, "debug", False) or os.environ.get("SEED_FAST_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def main(argv=None, *, prog: str = "python -m seed_fast.jobs.tokenize_dataset") -> int:
    """The command line (also `seed-fast tokenize-dataset`): exit status 0, or 2 with one line on a
    user's error; --debug (or SEED_FAST_TRACEBACK=1) shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog=prog, description="image dataset -> code shards (one process, or one per GPU under torchrun)"
    )
    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return run_from_args(p.parse_args(argv), prog)


if __name__ == "__main__":  # through the package, so that DataLoader workers unpickle the same classes
    from seed_fast.jobs.tokenize_dataset import main as _main

    sys.exit(_main())
