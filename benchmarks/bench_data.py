#!/usr/bin/env python
"""Training-data loading: seed_fast's loaders against the libraries' own pipelines, same files.

Data: N JPEG photos-like images (random smooth fields, `--image-px` square, quality 90) with a
caption each, written as K webdataset shards (webdataset's TarWriter) and as K parquet files
(datasets). Every provider yields the same batches' shape, (B, 3, S, S) float pixels plus captions,
through the same decode-and-resize collate (seed_fast.train.data.make_collate), so the rows differ
only in how samples reach it:

  seed_fast tar          data.kind "tar": TarShards (scans every member header first) + BatchLoader
  seed_fast webdataset   data.kind "webdataset": WebDatasetPairs + StreamingLoader
  webdataset pipeline    what a webdataset user writes: wds.WebDataset(urls, shardshuffle).shuffle(buf)
                         .decode("pil") into a DataLoader
  seed_fast hf           data.kind "hf": HFDatasetPairs (parquet, streaming) + StreamingLoader
  datasets pipeline      load_dataset("parquet", streaming=True).shuffle(buf) into a DataLoader

Units: first batch s = from building the loader to the first batch; samples/s = the samples of the
batches after the first over their wall time; resumed first batch s = the first batch of a loader
resumed at the middle of the epoch (seed_fast only: the peers have no exact resume; streaming
loaders read past the trained samples without decoding them). "check": over one epoch (N / B
batches, one pass), every caption arrives exactly once. datasets pauses 5 s at points of a shuffled
multi-file stream (when its reader threads end: a pyarrow workaround,
`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`); the `hf` and `datasets` rows include these
pauses alike, and a resumed `hf` loader meets one while it reads past the trained samples.

    python benchmarks/bench_data.py [--n 2048] [--shards 16] [--batch 64] [--workers 0,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import tempfile
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, write_results  # noqa: E402

from seed_fast.train.data import BatchLoader, ResumableBatches, Sample, TarShards, make_collate  # noqa: E402


def _jpeg(i: int, px: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(i)
    low = torch.rand(1, 3, 8, 8, generator=g)
    field = torch.nn.functional.interpolate(low, size=(px, px), mode="bicubic", align_corners=False)[0]
    field = (field + 0.05 * torch.randn(field.shape, generator=g)).clamp(0, 1)
    buf = io.BytesIO()
    Image.fromarray((field.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_data(folder: str, n: int, shards: int, px: int):
    """(tar paths, parquet paths) holding the same n samples."""
    import datasets
    import webdataset as wds

    per = -(-n // shards)
    tars, parquets = [], []
    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for s in range(shards):
        ids = range(s * per, min(n, (s + 1) * per))
        if not ids:
            break
        rows = [(f"{i:07d}", _jpeg(i, px), f"a smooth field number {i}") for i in ids]
        tar = os.path.join(folder, f"shard-{s:04d}.tar")
        with wds.TarWriter(tar) as w:
            for key, jpg, cap in rows:
                w.write({"__key__": key, "jpg": jpg, "txt": cap})
        pq = os.path.join(folder, f"part-{s:04d}.parquet")
        table = {"image": [{"bytes": j, "path": None} for _, j, _ in rows], "caption": [c for _, _, c in rows]}
        datasets.Dataset.from_dict(table, features=feats).to_parquet(pq)
        tars.append(tar)
        parquets.append(pq)
    return tars, parquets


def _as_samples(collate):
    """A collate over (PIL image, caption) pairs from a peer pipeline, into our batches."""

    def run(items):
        return collate([Sample(img.convert("RGB"), cap, cap) for img, cap in items])

    return run


def providers(tars, parquets, args, workers: int):
    """name -> (make(start_step) -> iterator of batches, resumable)."""
    import datasets
    import webdataset as wds

    from seed_fast.train.streaming import HFDatasetPairs, StreamingLoader, WebDatasetPairs

    collate = make_collate(args.size)
    B, buf = args.batch, args.shuffle_buffer

    def tar(start):
        ds = TarShards(tars)
        order = ResumableBatches(len(ds), B, seed=0, step=start)
        return BatchLoader(ds, order, collate, workers=workers).take(args.n // B - start)

    def ours_wds(start):
        ds = WebDatasetPairs(tars, seed=0, shuffle_buffer=buf)
        return StreamingLoader(ds, global_batch=B, rank=0, world=1, step=start, collate=collate, workers=workers).take(
            args.n // B - start
        )

    def peer_wds(start):
        ds = wds.WebDataset(tars, shardshuffle=len(tars), seed=0, empty_check=False)
        ds = ds.shuffle(buf, initial=buf).decode("pil").to_tuple("jpg", "txt")
        loader = torch.utils.data.DataLoader(ds, batch_size=B, collate_fn=_as_samples(collate), num_workers=workers)
        return iter(loader)

    def ours_hf(start):
        ds = HFDatasetPairs("parquet", data_files=parquets, seed=0, shuffle_buffer=buf)
        return StreamingLoader(ds, global_batch=B, rank=0, world=1, step=start, collate=collate, workers=workers).take(
            args.n // B - start
        )

    def peer_hf(start):
        ds = datasets.load_dataset("parquet", data_files=parquets, split="train", streaming=True)
        ds = ds.shuffle(seed=0, buffer_size=buf)

        def pairs(rows):
            return _as_samples(collate)([(r["image"], r["caption"]) for r in rows])

        return iter(torch.utils.data.DataLoader(ds, batch_size=B, collate_fn=pairs, num_workers=workers))

    return {
        "seed_fast tar": (tar, True),
        "seed_fast webdataset": (ours_wds, True),
        "webdataset pipeline": (peer_wds, False),
        "seed_fast hf": (ours_hf, True),
        "datasets pipeline": (peer_hf, False),
    }


def measure(make, resumable: bool, n_batches: int, n: int, B: int) -> dict:
    t0 = time.perf_counter()
    it = make(0)
    first = next(it)
    t1 = time.perf_counter()
    batches = [first]
    for b in it:
        batches.append(b)
        if len(batches) == n_batches:
            break
    t2 = time.perf_counter()
    caps = Counter(c for b in batches for c in b.captions)
    skipped = sum(b.skipped for b in batches)
    ok = len(batches) == n_batches and skipped == 0 and len(caps) == n_batches * B and max(caps.values()) == 1
    row = {
        "first_s": f"{t1 - t0:.3f}",
        "samples_s": f"{(len(batches) - 1) * B / max(t2 - t1, 1e-9):.0f}",
        "check": "every sample once"
        if ok
        else f"FAILED: {len(caps)} distinct of {len(batches) * B}, {skipped} skipped",
        "resumed_first_s": "",
    }
    close = getattr(it, "close", None)
    if close is not None:  # outside the timings: datasets pauses when a shuffled stream is closed
        close()
    del it
    gc.collect()
    if resumable:
        t0 = time.perf_counter()
        next(make(n_batches // 2))
        row["resumed_first_s"] = f"{time.perf_counter() - t0:.3f}"
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048, help="samples (one epoch)")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-px", type=int, default=256, help="stored image size")
    p.add_argument("--size", type=int, default=224, help="the batches' image size")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--workers", default="0,2", help="DataLoader workers, comma separated")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = p.parse_args(argv)
    if args.n % args.batch or args.n // args.batch < 2:
        raise SystemExit(f"--n ({args.n}) must be a multiple of --batch ({args.batch}), at least two batches")
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise SystemExit(f"--workers takes comma-separated integers, got {args.workers!r}") from None
    import datasets

    datasets.disable_progress_bars()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tars, parquets = write_data(tmp, args.n, args.shards, args.image_px)
        n_batches = args.n // args.batch
        for w in workers:
            for name, (make, resumable) in providers(tars, parquets, args, w).items():
                row = {"provider": name, "workers": w, **measure(make, resumable, n_batches, args.n, args.batch)}
                rows.append(row)
                print(row, flush=True)
    peer_of = {"seed_fast hf": "datasets pipeline", "datasets pipeline": "datasets pipeline"}
    for r in rows:
        peer = next(
            float(q["samples_s"])
            for q in rows
            if q["workers"] == r["workers"] and q["provider"] == peer_of.get(r["provider"], "webdataset pipeline")
        )
        r["vs_peer"] = f"{float(r['samples_s']) / peer:.2f}x"
    cols = [
        ("provider", "provider"),
        ("workers", "workers"),
        ("first_s", "first batch s"),
        ("samples_s", "samples/s"),
        ("vs_peer", "vs the library's pipeline"),
        ("resumed_first_s", "resumed first batch s"),
        ("check", "check"),
    ]
    import webdataset

    libs = {"webdataset": webdataset.__version__, "datasets": datasets.__version__}
    head = (
        f"webdataset {libs['webdataset']}, datasets {libs['datasets']}. "
        f"{args.n} JPEG images ({args.image_px} px, quality 90) in {len(tars)} shards / parquet files, "
        f"batches of {args.batch} at {args.size} px, shuffle buffer {args.shuffle_buffer}; one epoch per row "
        f"(the resumed loader starts at batch {args.n // args.batch // 2}). Wall time on this machine. The hf and "
        "datasets rows include datasets' 5 s pauses in shuffled multi-file streams (see the script).\n\n"
    )
    md = head + markdown_table(rows, cols)
    print(md)
    write_results("bench_data", "cpu", rows, md, args.out, extra={"args": vars(args), "libraries": libs})
    return rows


if __name__ == "__main__":
    main()
