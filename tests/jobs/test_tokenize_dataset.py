"""tokenize_dataset: a folder or tar shards -> code shards equal to SeedTokenizer.encode, key by key;
two gloo ranks; kill -9 then resume (each key exactly once); unreadable images listed; refusals."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seed_fast import SeedTokenizer, get_config
from seed_fast.cli import main as cli_main
from seed_fast.jobs.tokenize_dataset import JobError, load_codes, tokenize_dataset

ROOT = Path(__file__).resolve().parents[2]
N_TARS, PER_TAR = 3, 8


def _png(rng, mode="RGB") -> Image.Image:
    h, w = (int(v) for v in rng.integers(20, 70, size=2))
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return im.convert(mode)


def _bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model at 28 px, a folder of PNGs (nested, several modes, two unreadable) and the same
    images as three tar shards, with the codes SeedTokenizer.encode gives each key."""
    d = tmp_path_factory.mktemp("tokjob")
    cfg = get_config("tiny")
    cfg.vision.image_size = 28
    tok = SeedTokenizer.from_config(cfg, seed=3, init="unit")  # codes that depend on the image
    tok.save_pretrained(d / "model")
    SeedTokenizer.from_config(cfg, seed=4, init="unit").save_pretrained(d / "other_model")
    rng = np.random.default_rng(0)
    images = {}
    for i in range(N_TARS * PER_TAR):
        images[f"part{i % 3}/sub{i % 2}/{i:03d}.png"] = _png(rng, ("RGB", "L", "RGBA", "P")[i % 4])
    folder = d / "images"
    for key, im in images.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        im.save(folder / key)
    (folder / "part0" / "broken.png").write_bytes(b"not a png")
    (folder / "part1" / "cut.png").write_bytes(_bytes(images["part1/sub1/001.png"])[:60])
    (folder / "notes.txt").write_text("not an image: ignored")

    shards, tar_images = d / "shards", {}
    shards.mkdir()
    items = list(images.values())
    for t in range(N_TARS):
        with tarfile.open(shards / f"shard-{t:02d}.tar", "w") as tf:

            def put(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

            for j in range(PER_TAR):
                key = f"{t * PER_TAR + j:06d}"
                im = items[t * PER_TAR + j]
                put(f"{key}.png", _bytes(im))
                put(f"{key}.txt", b"a caption")
                put(f"{key}.seg.png", _bytes(_png(rng)))  # another field of the sample, not its image
                tar_images[f"shard-{t:02d}.tar/{key}"] = im
            put("zzbad.jpg", b"\xff\xd8 not a jpeg")

    def encode(ims):
        keys = sorted(ims)
        codes = tok.encode([ims[k] for k in keys])
        return {k: c.numpy() for k, c in zip(keys, codes)}

    return dict(
        dir=d,
        model=d / "model",
        other_model=d / "other_model",
        folder=folder,
        shards=shards,
        folder_codes=encode(images),
        tar_codes=encode(tar_images),
    )


def _assert_codes(out: Path, expected: dict):
    got = load_codes(out)  # raises on a key in two shards
    assert sorted(got) == sorted(expected)
    for k, c in expected.items():
        assert got[k].tolist() == c.tolist(), k
    index = json.loads((out / "index.json").read_text())
    assert index["images"] == sum(s["count"] for s in index["shards"]) == len(expected)
    files = sorted(p.name for p in out.glob("codes-*.npz"))
    assert files == sorted(s["file"] for s in index["shards"]), "a shard file the index does not list"
    assert not list(out.glob(".*")), "temporary files left behind"
    return index


def _skipped(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("skipped-r*.jsonl")) for line in p.read_text().splitlines()]


def test_folder_codes_equal_encode(data, tmp_path):
    out = tmp_path / "out"
    s = tokenize_dataset(data["folder"], out, checkpoint=data["model"], batch_size=5, shard_size=7, num_workers=0)
    index = _assert_codes(out, data["folder_codes"])
    n = len(data["folder_codes"])
    assert (s.images, s.skipped, s.total_images, s.total_skipped) == (n, 2, n, 2)
    assert [sh["count"] for sh in index["shards"]] == [7] * (n // 7) + [n % 7]
    assert index["codes_per_image"] == 32 and index["code_dtype"] == "int16"
    with np.load(out / index["shards"][0]["file"]) as z:
        assert z["codes"].dtype == np.int16 and z["codes"].shape == (7, 32)
    skipped = _skipped(out)
    assert sorted(r["key"] for r in skipped) == ["part0/broken.png", "part1/cut.png"]
    assert all(r["reason"] for r in skipped)
    # run again: nothing is read twice, nothing rewritten, unreadable images are not retried
    again = tokenize_dataset(data["folder"], out, checkpoint=data["model"], batch_size=5, shard_size=7, num_workers=0)
    assert (again.images, again.skipped, again.total_images) == (0, 0, n)
    assert len(_skipped(out)) == 2


def test_tar_shards_codes_equal_encode(data, tmp_path):
    out = tmp_path / "out"
    s = tokenize_dataset(data["shards"], out, checkpoint=data["model"], batch_size=4, shard_size=6, num_workers=2)
    _assert_codes(out, data["tar_codes"])
    assert s.images == N_TARS * PER_TAR and s.skipped == N_TARS
    assert sorted(r["key"] for r in _skipped(out)) == [f"shard-{t:02d}.tar/zzbad" for t in range(N_TARS)]
    progress = json.loads((out / "progress-r0.json").read_text())
    assert sorted(progress["sources_done"]) == [f"shard-{t:02d}.tar" for t in range(N_TARS)]
    # the same shards named by a range: the same source, all done, no shard opened
    again = tokenize_dataset(str(data["shards"] / "shard-{00..02}.tar"), out, checkpoint=data["model"])
    assert again.images == 0 and again.total_images == N_TARS * PER_TAR


def test_a_tar_that_breaks_off_is_listed_and_the_rest_kept(data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(data["shards"] / "shard-00.tar", src)
    whole = (data["shards"] / "shard-01.tar").read_bytes()
    (src / "shard-01.tar").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    tokenize_dataset(src, out, checkpoint=data["model"], batch_size=4, shard_size=5, num_workers=0)
    got = load_codes(out)
    first = {k: v for k, v in data["tar_codes"].items() if k.startswith("shard-00.tar/")}
    assert {k for k in got if k.startswith("shard-00.tar/")} == set(first)
    partial = [k for k in got if k.startswith("shard-01.tar/")]
    assert 0 < len(partial) < PER_TAR  # what was read before the break is kept
    for k in partial:
        assert got[k].tolist() == data["tar_codes"][k].tolist()
    index = json.loads((out / "index.json").read_text())
    assert index["broken_tar_shards"] == ["shard-01.tar"]
    # a rerun reads the broken shard again (the error may have been passing) without writing any key twice
    tokenize_dataset(src, out, checkpoint=data["model"], batch_size=4, shard_size=5, num_workers=0)
    assert sorted(load_codes(out)) == sorted(got)
    assert sum("shard" in r for r in _skipped(out)) == 1  # listed once


def _spawn(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))


def _torchrun(*args):
    return _spawn(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args])


def test_two_gloo_ranks_write_every_key_once(data, tmp_path):
    out = tmp_path / "out"
    job = ["-m", "seed_fast.jobs.tokenize_dataset", str(data["shards"]), "--out", str(out)]
    job += ["--checkpoint", str(data["model"]), "--batch-size", "3", "--shard-size", "5", "--num-workers", "0"]
    p = _torchrun(*job)
    assert p.returncode == 0, p.stderr[-3000:]
    index = _assert_codes(out, data["tar_codes"])
    assert index["ranks"] == 2 and {s["rank"] for s in index["shards"]} == {0, 1}
    assert "tokenize-dataset rank 0/2" in p.stderr and "img/s" in p.stderr  # rank 0's bar
    per_rank = [
        re.search(rf"rank {r}/2: (\d+) images tokenized, \d+ skipped, [\d.]+ images/s", p.stderr) for r in (0, 1)
    ]
    assert all(per_rank) and sum(int(m.group(1)) for m in per_rank) == N_TARS * PER_TAR, p.stderr[-2000:]
    assert "tokenize-dataset rank 1/2" not in p.stderr


# Dies by SIGKILL right after the second shard is committed ("after_progress") or between its two
# renames ("between_renames": shard file in place, progress file not yet naming it), leaving a
# half-written temporary shard behind too.
_DIE_AFTER_SECOND_SHARD = """
import os, signal, sys
from pathlib import Path
where, out = sys.argv[1], Path(sys.argv[2])
replace = os.replace

def die():
    (out / ".codes-r0-00002.npz.tmp").write_bytes(b"PK half a shard")
    os.kill(os.getpid(), signal.SIGKILL)

def os_replace(src, dst, *a, **k):
    replace(src, dst, *a, **k)
    name = Path(dst).name
    if where == "between_renames" and name == "codes-r0-00001.npz":
        die()
    if where == "after_progress" and name == "progress-r0.json" and "codes-r0-00001" in Path(dst).read_text():
        die()

os.replace = os_replace
from seed_fast.jobs.tokenize_dataset import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("kind, where", [("folder", "between_renames"), ("tar", "after_progress")])
def test_kill_9_then_resume_writes_every_key_once(data, tmp_path, kind, where):
    out = tmp_path / "out"
    src = data["folder" if kind == "folder" else "shards"]
    args = [str(src), "--out", str(out), "--checkpoint", str(data["model"]), "--batch-size", "5"]
    args += ["--shard-size", "3", "--num-workers", "0", "--no-progress"]
    p = _spawn(["-c", _DIE_AFTER_SECOND_SHARD, where, str(out), *args])
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    listed = [s["file"] for s in json.loads((out / "progress-r0.json").read_text())["shards"]]
    assert listed == (
        ["codes-r0-00000.npz"] if where == "between_renames" else ["codes-r0-00000.npz", "codes-r0-00001.npz"]
    )
    assert (out / "codes-r0-00001.npz").exists() and not (out / "index.json").exists()
    expected = data[f"{kind}_codes"]
    if kind == "folder":  # resumed in this process
        s = tokenize_dataset(src, out, checkpoint=data["model"], batch_size=5, shard_size=3, num_workers=0)
        assert s.images == len(expected) - 3 * len(listed)
    else:  # resumed by two ranks: the rank count may change between runs
        q = _torchrun("-m", "seed_fast.jobs.tokenize_dataset", *args)
        assert q.returncode == 0, q.stderr[-3000:]
    _assert_codes(out, expected)


def test_refusals(data, tmp_path):
    out = tmp_path / "out"
    folder, model = data["folder"], data["model"]
    tokenize_dataset(folder, out, checkpoint=model, shard_size=100, num_workers=0)
    with pytest.raises(JobError, match="different model .*weights_blake2b"):
        tokenize_dataset(folder, out, checkpoint=data["other_model"], num_workers=0)
    with pytest.raises(JobError, match="different model .*dtype"):
        tokenize_dataset(folder, out, checkpoint=model, dtype="bfloat16", num_workers=0)
    with pytest.raises(JobError, match="different source"):
        tokenize_dataset(data["shards"], out, checkpoint=model, num_workers=0)
    with pytest.raises(JobError, match="already holds a tokenize-dataset job"):
        tokenize_dataset(folder, out, checkpoint=model, resume=False, num_workers=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(JobError, match="files this job did not write .*mine.txt"):
        tokenize_dataset(folder, foreign, checkpoint=model, num_workers=0)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(source="nope"), FileNotFoundError, "no such folder or tar shard: .*nope"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
        (dict(shard_size=-1), ValueError, "shard_size must be an integer >= 1"),
        (dict(preset="tiny"), ValueError, "one of checkpoint .* and preset .*not both"),
        (dict(checkpoint=None), ValueError, "one of checkpoint"),
        (dict(dtype="int8"), ValueError, "dtype must be one of"),
        (dict(source="one.png"), ValueError, "one.png is not a tar shard"),
    ],
)
def test_bad_arguments(data, tmp_path, kw, error, message):
    (tmp_path / "one.png").write_bytes(b"")
    args = dict(source=data["folder"], out_dir=tmp_path / "out", checkpoint=data["model"], num_workers=0) | kw
    if args["source"] in ("nope", "one.png"):
        args["source"] = str(tmp_path / args["source"])
    with pytest.raises(error, match=message):
        tokenize_dataset(**args)
    assert not (tmp_path / "out").exists()


def test_cli_user_errors_are_one_line_exit_2(data, tmp_path, capsys):
    ok = ["--checkpoint", str(data["model"]), "--num-workers", "0", "--no-progress"]
    assert cli_main(["tokenize-dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *ok]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("seed-fast tokenize-dataset: error: no such folder"), err
    out = tmp_path / "out"
    assert cli_main(["tokenize-dataset", str(data["folder"]), "--out", str(out), *ok]) == 0
    assert len(load_codes(out)) == len(data["folder_codes"])
    capsys.readouterr()
    other = ["--checkpoint", str(data["other_model"]), "--no-progress"]
    assert cli_main(["tokenize-dataset", str(data["folder"]), "--out", str(out), *other]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different model" in err and "Traceback" not in err, err
    with pytest.raises(JobError):
        cli_main(["tokenize-dataset", str(data["folder"]), "--out", str(out), *other, "--debug"])
    with pytest.raises(SystemExit) as e:
        cli_main(["tokenize-dataset", str(data["folder"]), "--out", str(out), *ok, "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_plain_progress_lines_without_tqdm(monkeypatch, capsys):
    import seed_fast.jobs.tokenize_dataset as job

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import tqdm` raises ImportError
    monkeypatch.setattr(job, "PLAIN_PROGRESS_EVERY_S", 0.0)
    bar = job._Progress(True, 10, "tokenize-dataset rank 0/1")
    assert bar.bar is None
    bar.update(4)
    bar.close()
    assert "tokenize-dataset rank 0/1: 4/10 images," in capsys.readouterr().err
