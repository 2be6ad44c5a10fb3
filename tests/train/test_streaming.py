"""Streaming training data through the real libraries: webdataset shards (local, pipe:, http) and
Hugging Face `datasets` streams (parquet files): every sample once per epoch over ranks x workers,
a seeded shuffle buffer, an exact resume, held-out splits, and a training run on each."""

import functools
import http.server
import io
import json
import shutil
import threading
from collections import Counter

import pytest
import torch
from cfgs import spawn, stage2_run, train_args  # tests/train/cfgs.py

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from seed_fast.train import ConfigError, TrainConfig  # noqa: E402
from seed_fast.train.data import make_collate
from seed_fast.train.loop import read_metrics, train  # noqa: E402
from seed_fast.train.sources import make_source  # noqa: E402
from seed_fast.train.streaming import HFDatasetPairs, StreamingLoader, WebDatasetPairs  # noqa: E402


@pytest.fixture(autouse=True)
def _no_shutdown_sleep(monkeypatch):
    # datasets' shuffled multi-file stream sleeps 5 s when each pass ends (a pyarrow thread
    # workaround); nothing here depends on it, and the tests end many short passes
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


def _png(i: int, size: int = 24) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(i)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(folder, counts, *, bad=()):
    """Shards shard-000.tar ... written by webdataset's TarWriter; keys s<k>; `bad` keys get a
    corrupt image."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s, n in enumerate(counts):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as w:
            for _ in range(n):
                key = f"s{k:04d}"
                w.write({"__key__": key, "png": b"junk" if key in bad else _png(k), "txt": f"caption {k}"})
                k += 1
    return [str(folder / f"shard-{s:03d}.tar") for s in range(len(counts))], k


def _keys(batches):
    return [[key.rsplit("/", 1)[-1] for key in b.keys] for b in batches]


def _parts(ds, parts, epoch=0):
    return [[ds.key(r) for r in ds.records(epoch, p, parts)] for p in range(parts)]


@pytest.mark.parametrize("counts", [[7, 5, 6, 4, 9], [11, 13]])  # more shards than parts / fewer
def test_webdataset_parts_cover_each_epoch_once(tmp_path, counts):
    shards, n = _write_shards(tmp_path, counts)
    ds = WebDatasetPairs(shards, seed=3, shuffle_buffer=8)
    for epoch in (0, 1):
        parts = _parts(ds, 4, epoch)
        flat = [k for p in parts for k in p]
        assert sorted(flat) == [f"s{k:04d}" for k in range(n)], "each sample once per epoch"
        assert all(parts), "every part gets samples"
    assert _parts(ds, 4, 0) != _parts(ds, 4, 1), "the order changes between epochs"
    again = WebDatasetPairs(shards, seed=3, shuffle_buffer=8)
    assert _parts(again, 4, 1) == _parts(ds, 4, 1), "the same seed gives the same order"
    plain = WebDatasetPairs(shards, seed=3, shuffle_buffer=0)
    assert [ds.key(r) for r in plain.records(0, 0, 1)] == [f"s{k:04d}" for k in range(n)]
    assert [ds.key(r) for r in ds.records(0, 0, 1)] != [f"s{k:04d}" for k in range(n)], "shuffled"


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2)])
def test_webdataset_loader_resumes_at_the_exact_batch(tmp_path, world, workers):
    shards, n = _write_shards(tmp_path, [9, 8, 10, 7, 6], bad={"s0005"})
    gb, steps, cut = 4, 12, 5  # 48 samples: more than one epoch (40)
    ds = WebDatasetPairs(shards, seed=1, shuffle_buffer=6)
    collate = make_collate(16)

    def run(rank, step, k):
        loader = StreamingLoader(
            ds, global_batch=gb, rank=rank, world=world, step=step, collate=collate, workers=workers, seed=0
        )
        out = list(loader.take(k))
        assert loader.step == step + k
        return out

    every = []
    for rank in range(world):
        full = run(rank, 0, steps)
        assert all(len(b) + b.skipped == gb // world for b in full)
        resumed = run(rank, cut, steps - cut)
        assert _keys(resumed) == _keys(full)[cut:], f"rank {rank}: the resumed batches differ"
        assert torch.equal(torch.cat([b.pixels for b in resumed]), torch.cat([b.pixels for b in full[cut:]]))
        every += [k for b in _keys(full) for k in b] + ["bad"] * sum(b.skipped for b in full)
    counts = Counter(every)
    assert "s0005" not in counts, "the corrupt sample is skipped"
    if world == 1 and workers == 0:  # more than one epoch of one stream: every sample, the corrupt one skipped
        assert counts["bad"] >= 1 and set(counts) == {f"s{k:04d}" for k in range(n) if k != 5} | {"bad"}


def test_webdataset_reads_pipe_and_http_urls(tmp_path):
    shards, n = _write_shards(tmp_path / "shards", [5, 6])
    local = [s.key for s in WebDatasetPairs(shards, shuffle_buffer=0).head(100)]
    assert len(local) == n
    piped = WebDatasetPairs([f"pipe:cat {s}" for s in shards], shuffle_buffer=0).head(100)
    assert [s.key for s in piped] == local
    braces = WebDatasetPairs([str(tmp_path / "shards" / "shard-{000..001}.tar")], shuffle_buffer=0).head(100)
    assert [s.key for s in braces] == local
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http URLs through curl, which is not installed")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "shards"))

    class Quiet(handler.func):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, **handler.keywords))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..001}}.tar"
        remote = WebDatasetPairs([url], shuffle_buffer=0).head(100)
    finally:
        server.shutdown()
    assert [s.key for s in remote] == local
    assert [s.caption for s in remote] == [f"caption {k}" for k in range(n)]


def test_webdataset_bad_shards(tmp_path):
    shards, n = _write_shards(tmp_path, [4, 5])
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        WebDatasetPairs(shards + [str(tmp_path / "nope.tar")])
    with pytest.raises(ValueError, match="no webdataset shards match"):
        WebDatasetPairs([str(tmp_path / "none-*.tar")])
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    ds = WebDatasetPairs([shards[0], str(tmp_path / "junk.tar"), shards[1]], shuffle_buffer=0)
    with pytest.warns(UserWarning, match="junk.tar"):
        got = ds.head(100)
    assert len(got) == n and ds.bad_shards == [str(tmp_path / "junk.tar")]
    empty = WebDatasetPairs([str(tmp_path / "junk.tar")], shuffle_buffer=0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="holds no samples"):
        empty.head(1)


def test_held_out_split_by_key(tmp_path):
    shards, n = _write_shards(tmp_path, [20, 20])
    kw = {"seed": 4, "shuffle_buffer": 0}
    train_keys = {r.key for r in WebDatasetPairs(shards, split="train", held_out=(0.25, 4), **kw).head(n)}
    val_keys = {r.key for r in WebDatasetPairs(shards, split="val", held_out=(0.25, 4), **kw).head(n)}
    assert train_keys and val_keys and not train_keys & val_keys
    assert len(train_keys | val_keys) == n
    assert 2 <= len(val_keys) <= 20


def _parquet(tmp_path, counts, *, bad=()):
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    files, k = [], 0
    for s, c in enumerate(counts):
        rows = {"image": [], "text": []}
        for _ in range(c):
            rows["image"].append({"bytes": b"junk" if k in bad else _png(k), "path": None})
            rows["text"].append(f"caption {k}")
            k += 1
        path = tmp_path / f"part-{s}.parquet"
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))
        files.append(str(path))
    return files, k


def test_hf_datasets_stream_parts_resume_and_columns(tmp_path):
    files, n = _parquet(tmp_path, [6, 7, 5, 6], bad={3})
    ds = HFDatasetPairs("parquet", data_files=files, caption_column="text", seed=2, shuffle_buffer=5)
    plain = HFDatasetPairs("parquet", data_files=files, caption_column="text", shuffle_buffer=0)
    caps = [s.caption if s is not None else None for s in plain.head(100)]
    assert caps == [None if k == 3 else f"caption {k}" for k in range(n)], "stream order, the corrupt one None"
    for parts in (2, 3):  # 4 files: split by file, then by sample
        keys = [k for p in _parts(ds, parts) for k in p]
        assert len(keys) == n and len(set(keys)) == n
    assert _parts(ds, 2, 0) != _parts(ds, 2, 1)
    collate = make_collate(16)

    def run(step, k):
        return list(StreamingLoader(ds, global_batch=4, rank=0, world=1, step=step, collate=collate, workers=2).take(k))

    full, resumed = run(0, 8), run(3, 5)
    assert [b.captions for b in resumed] == [b.captions for b in full[3:]]
    assert sum(b.skipped for b in full) >= 1
    with pytest.raises(ValueError, match=r"no column 'caption' \(its columns: \['image', 'text'\]\)"):
        HFDatasetPairs("parquet", data_files=files)
    with pytest.raises(FileNotFoundError, match="missing-"):
        HFDatasetPairs("parquet", data_files=[str(tmp_path / "missing-*.parquet")])
    with pytest.raises(ValueError, match="cannot stream the Hugging Face dataset"):
        HFDatasetPairs(str(tmp_path / "no-such-folder"))


def _stage_cfg(out, data, **kw):
    return stage2_run(out, data={"image_size": 32, "val_n": 8, "shuffle_buffer": 16, **data}, **kw)


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if not r.get("eval")]


@pytest.mark.parametrize("kind", ["webdataset", "hf"])
def test_a_training_run_streams_and_resumes(tmp_path, kind):
    if kind == "webdataset":
        shards, n = _write_shards(tmp_path / "d", [12, 11, 13], bad={"s0007"})
        data = {"kind": "webdataset", "shards": [str(tmp_path / "d" / "shard-*.tar")], "val_fraction": 0.2}
    else:
        files, n = _parquet(tmp_path, [12, 11, 13])
        data = {
            "kind": "hf",
            "hf_dataset": "parquet",
            "hf_data_files": files,
            "caption_column": "text",
            "val_fraction": 0.2,
            "workers": 2,
        }
    cfg = TrainConfig.from_dict(_stage_cfg(tmp_path / "a", data))
    full = train(cfg, progress=False)
    cut = TrainConfig.from_dict(_stage_cfg(tmp_path / "b", data))
    train(cut, progress=False, stop_after=3)  # the newest checkpoint is step 2
    resumed = train(cut, resume=True, progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)
    assert resumed["val_recon_cos"] == pytest.approx(full["val_recon_cos"], rel=1e-5)
    val = make_source(cfg, "val")
    train_keys = {s.key for s in make_source(cfg, "train", head=n) if s is not None}
    assert val and not {s.key for s in val if s is not None} & train_keys


def test_torchrun_two_ranks_stream_and_resume(tmp_path):
    """Two gloo ranks on webdataset shards (each its own part): the run ends (every rank has a batch
    at every step, so none waits in a collective), and a stopped run resumes to the same losses."""
    _write_shards(tmp_path / "d", [9, 10, 8, 11])
    losses = {}
    for name, stops in (("full", [None]), ("cut", [2, None])):
        data = {"kind": "webdataset", "shards": [str(tmp_path / "d" / "shard-{000..003}.tar")], "val_n": 4}
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps(_stage_cfg(tmp_path / name, data, steps=4)))
        for stop in stops:
            extra = ["--stop-after", str(stop)] if stop else ["--resume"] if name == "cut" else []
            _, err = (p := spawn(train_args("stage2", cfg, *extra, ranks=2))).communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        losses[name] = _losses(tmp_path / name)
    assert [s for s, _ in losses["full"]] == [1, 2, 3, 4]
    assert [x for _, x in losses["full"]] == pytest.approx([x for _, x in losses["cut"]], rel=1e-5)


def test_evaluation_reads_the_held_out_stream_once(tmp_path, monkeypatch):
    shards, n = _write_shards(tmp_path / "d", [10, 10])
    data = {"kind": "webdataset", "shards": shards, "val_fraction": 0.3}
    cfg = TrainConfig.from_dict(_stage_cfg(tmp_path / "r", data))
    reads, real = [], WebDatasetPairs.head
    monkeypatch.setattr(WebDatasetPairs, "head", lambda self, k: reads.append(k) or real(self, k))
    a, b = make_source(cfg, "val"), make_source(cfg, "val")
    assert reads == [8] and a and [s.key for s in a] == [s.key for s in b]
    a.clear()  # each call gets its own list
    assert len(make_source(cfg, "val")) == len(b) and reads == [8]
    assert len(make_source(cfg, "train", head=5)) == 5 and reads == [8, 5]


def test_config_checks_for_streaming_data(tmp_path):
    def check(data, stage="stage2"):
        TrainConfig.from_dict(_stage_cfg(tmp_path, data, stage=stage))

    with pytest.raises(ConfigError, match="data.shards must list at least one webdataset shard"):
        check({"kind": "webdataset"})
    with pytest.raises(ConfigError, match="data.hf_dataset must name"):
        check({"kind": "hf"})
    with pytest.raises(ConfigError, match="hf_val_split is for hf data"):
        check({"kind": "webdataset", "shards": ["x.tar"], "hf_val_split": "validation"})
    with pytest.raises(ConfigError, match="shuffle_buffer must be >= 0"):
        check({"kind": "webdataset", "shards": ["x.tar"], "shuffle_buffer": -1})
    with pytest.raises(ConfigError, match="the llm stage encodes every image once"):
        check({"kind": "hf", "hf_dataset": "parquet"}, stage="llm")
    with pytest.raises(ConfigError, match="give one held-out split"):
        check({"kind": "hf", "hf_dataset": "x", "hf_val_split": "validation", "val_fraction": 0.1})
    json.dumps(TrainConfig.from_dict(_stage_cfg(tmp_path, {"kind": "hf", "hf_dataset": "x"})).to_dict())
    assert not (tmp_path / "checkpoints").exists()
