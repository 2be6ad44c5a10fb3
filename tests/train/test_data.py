"""Training data: synthetic / folder / tar sources, bad samples skipped and counted, resumable order."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from seed_fast.train.data import BatchLoader, FolderPairs, ResumableBatches, SyntheticPairs, TarShards, make_collate


def test_synthetic_pairs_are_deterministic_and_splits_disjoint():
    a, b = SyntheticPairs(20, seed=3), SyntheticPairs(20, seed=3)
    assert a[7].caption == b[7].caption and a[7].image.tobytes() == b[7].image.tobytes()
    val = SyntheticPairs(20, seed=3, split="val")
    train_imgs = {a[i].image.tobytes() for i in range(20)}
    assert not any(val[i].image.tobytes() in train_imgs for i in range(20))
    with pytest.raises(ValueError, match="split"):
        SyntheticPairs(5, split="dev")
    with pytest.raises(ValueError, match="size >= 48"):
        SyntheticPairs(5, size=32)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_pairs_skip_and_count_bad_samples(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "b.png").write_bytes(b"not an image")
    (tmp_path / "c.png").write_bytes(_png((0, 0, 255)))
    lines = [
        {"image": "a.png", "caption": "a red square"},
        {"image": "b.png", "caption": "broken"},
        {"image": "c.png"},
        {"image": "missing.png", "caption": "gone"},
    ]
    index = tmp_path / "index.jsonl"
    index.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    ds = FolderPairs(index)
    assert len(ds) == 4 and ds.bad_lines == 1
    batch = make_collate(32)([ds[i] for i in range(4)])
    assert batch.captions == ["a red square"] and batch.skipped == 3
    assert batch.pixels.shape == (1, 3, 32, 32) and batch.pixels.max() > 0.9
    csv = tmp_path / "index.csv"
    csv.write_text("image,caption\na.png,red\nc.png,blue\n")
    assert [FolderPairs(csv)[i].caption for i in range(2)] == ["red", "blue"]
    (tmp_path / "bad.csv").write_text("path,text\na.png,red\n")
    with pytest.raises(ValueError, match="columns image and caption"):
        FolderPairs(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        FolderPairs(tmp_path / "none.jsonl")


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_shards(tmp_path):
    _tar(
        tmp_path / "s0.tar",
        [
            ("k1.png", _png((0, 255, 0))),
            ("k1.txt", b"a green square"),
            ("k2.jpg", b"garbage"),
            ("k2.txt", b"broken"),
            ("k3.png", _png((1, 2, 3))),
        ],
    )
    _tar(tmp_path / "s1.tar", [("x.png", _png((9, 9, 9))), ("x.json", json.dumps({"caption": "grey"}).encode())])
    _tar(tmp_path / "empty.tar", [])
    (tmp_path / "corrupt.tar").write_bytes(b"\x00" * 10)
    ds = TarShards([tmp_path / "s0.tar", tmp_path / "s1.tar", tmp_path / "empty.tar", tmp_path / "corrupt.tar"])
    assert len(ds) == 4 and len(ds.bad_shards) == 2
    batch = make_collate(16)([ds[i] for i in range(len(ds))])
    assert sorted(batch.captions) == ["a green square", "grey"] and batch.skipped == 2
    with pytest.raises(ValueError, match="no image-caption pairs"):
        TarShards([tmp_path / "empty.tar"])


def test_resumable_batches_cover_each_epoch_and_split_across_ranks():
    n, gb = 23, 6
    order = ResumableBatches(n, gb, seed=5)
    epoch0 = [order.next_indices() for _ in range(order.steps_per_epoch)]
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 18  # 3 full batches, the partial one dropped
    epoch1 = [order.next_indices() for _ in range(order.steps_per_epoch)]
    assert epoch1 != epoch0 and order.epoch == 2
    # two ranks take disjoint halves of the same global batches
    r0, r1 = ResumableBatches(n, gb, seed=5, rank=0, world=2), ResumableBatches(n, gb, seed=5, rank=1, world=2)
    for glob in epoch0:
        assert r0.next_indices() + r1.next_indices() == glob
    # resuming at step k gives the same batches as running through
    ref = ResumableBatches(n, gb, seed=5)
    seq = [ref.next_indices() for _ in range(7)]
    resumed = ResumableBatches(n, gb, seed=5, step=4)
    assert [resumed.next_indices() for _ in range(3)] == seq[4:]
    with pytest.raises(ValueError, match="divisible"):
        ResumableBatches(n, 5, world=2)
    with pytest.raises(ValueError, match="data order changed"):
        resumed.load_state_dict({"step": 1, "n": 99, "global_batch": gb, "seed": 5})


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_loader_gives_the_order_s_batches(workers):
    ds = SyntheticPairs(12, seed=1, size=48)
    order = ResumableBatches(12, 4, seed=2)
    got = [b.keys for b in BatchLoader(ds, order, 32, workers=workers).take(5)]
    ref = ResumableBatches(12, 4, seed=2)
    assert got == [[f"train-{i}" for i in ref.next_indices()] for _ in range(5)]
    assert torch.is_tensor(next(iter(BatchLoader(ds, ResumableBatches(12, 4), 32).take(1))).pixels)


def test_folder_and_tar_data_get_a_held_out_split(tmp_path):
    """val_fraction keeps a fixed share of folder / tar samples out of training (the same ones every
    run, disjoint from the train split, together all of them); val_index / val_shards name a held-out
    set of their own; contradictory settings fail before any work."""
    from cfgs import merged

    from seed_fast.train import ConfigError, TrainConfig
    from seed_fast.train.sources import held_out, make_source

    for i in range(40):
        (tmp_path / f"{i}.png").write_bytes(_png((6 * i, 0, 0)))
    index = tmp_path / "index.jsonl"
    index.write_text("\n".join(json.dumps({"image": f"{i}.png", "caption": f"shade {i}"}) for i in range(40)) + "\n")
    base = {"stage": "stage2", "out": str(tmp_path / "run"), "steps": 1, "global_batch": 4}
    cfg = TrainConfig.from_dict(merged(base, data={"kind": "folder", "index": str(index), "val_fraction": 0.25}))
    train, val = make_source(cfg, "train"), make_source(cfg, "val")
    tr = {train[i].caption for i in range(len(train))}
    va = {val[i].caption for i in range(len(val))}
    assert not tr & va and len(tr | va) == 40 and 4 <= len(va) <= 16
    again = make_source(
        TrainConfig.from_dict(merged(base, data={"kind": "folder", "index": str(index), "val_fraction": 0.25})), "val"
    )
    assert {again[i].caption for i in range(len(again))} == va  # the same samples every run
    assert held_out(1000, 0.1, 0) != held_out(1000, 0.1, 1) and 60 < sum(held_out(1000, 0.1, 0)) < 140
    # a held-out set of its own
    val_index = tmp_path / "val.jsonl"
    val_index.write_text(json.dumps({"image": "0.png", "caption": "held"}) + "\n")
    cfg = TrainConfig.from_dict(merged(base, data={"kind": "folder", "index": str(index), "val_index": str(val_index)}))
    assert len(make_source(cfg, "train")) == 40 and make_source(cfg, "val")[0].caption == "held"
    shard = tmp_path / "v.tar"
    _tar(shard, [("k.png", _png((1, 2, 3))), ("k.txt", b"from the held-out shard")])
    _tar(tmp_path / "t.tar", [("j.png", _png((3, 2, 1))), ("j.txt", b"train")])
    cfg = TrainConfig.from_dict(
        merged(base, data={"kind": "tar", "shards": [str(tmp_path / "t.tar")], "val_shards": [str(shard)]})
    )
    assert make_source(cfg, "val")[0].caption == "from the held-out shard"
    for data, msg in (
        ({"kind": "folder", "index": str(index), "val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        (
            {"kind": "folder", "index": str(index), "val_fraction": 0.2, "val_index": str(val_index)},
            "one held-out split",
        ),
        (
            {"kind": "folder", "index": str(index), "val_shards": [str(shard)]},
            "val_shards is for tar or webdataset data",
        ),
        (
            {"kind": "folder", "index": str(index), "val_index": str(tmp_path / "nope.jsonl")},
            "val_index must be an existing",
        ),
        ({"val_fraction": 0.1}, "synthetic data has val_n"),
    ):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig.from_dict(merged(base, data=data))
