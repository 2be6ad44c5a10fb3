"""The benchmark suite's own machinery (no timing): roofline fractions, summaries, the CLI entry."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import run_all  # noqa: E402


def test_roofline_fraction_is_the_binding_limit():
    peaks = common.gpu_peaks("NVIDIA H100 80GB HBM3")
    assert peaks == {"fp32": 67.0, "tensor16": 989.0, "tb_s": 3.35}
    assert (
        common.gpu_peaks("NVIDIA H100 PCIe")["tb_s"] == 2.0 and common.gpu_peaks("Tesla V100-SXM2-16GB")["fp32"] == 15.7
    )
    assert common.gpu_peaks("Some Future GPU") is None
    # compute-bound row: 33.5 TFLOP/s of 67 fp32 -> 50%; memory side 0.67 of 3.35 TB/s -> 20%
    assert common.roofline_fraction(33.5, 0.67, peaks, "fp32") == pytest.approx(0.5)
    assert common._row_roofline({"gflops": "33500", "gbs": "670"}, peaks, "fp32") == pytest.approx(0.5)
    # an fp16 row is measured against the tensor-core peak
    assert common._row_roofline({"dtype": "float16", "tflops": "494.5"}, peaks, "fp32") == pytest.approx(0.5)
    assert common._row_roofline({"ms": "1.0"}, peaks, "fp32") is None


def test_summary_tables_json_and_headline(tmp_path):
    rows = [
        {"N": 32, "provider": "torch", "ms": "2.0"},
        {"N": 32, "provider": "seed_fast cpu", "ms": "0.5"},
        {"N": 64, "provider": "torch", "ms": "4.0"},
        {"N": 64, "provider": "seed_fast cpu", "ms": "1.0"},
        {"N": 64, "provider": "faiss", "ms": "3.0"},
    ]
    (tmp_path / "bench_x.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    (tmp_path / "bench_x.md").write_text("# bench_x\n\nheader\n\n| a |\n")
    title, bars = run_all.headline(rows)
    assert title == "N 64" and [b[0] for b in bars] == ["torch", "seed_fast cpu", "faiss"]
    meta = {
        "device": "cpu-test",
        "date": "today",
        "versions": {"torch": "x"},
        "quick": True,
        "scripts": {"x": {"status": "ok", "seconds": 1.0}},
    }
    run_all.summarize(tmp_path, meta)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"]["bench_x"]["rows"] == rows and summary["meta"]["scripts"]["x"]["status"] == "ok"
    md = (tmp_path / "summary.md").read_text()
    assert "| x | ok | 1.0 |" in md and "## bench_x" in md
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_bench_cli_rejects_unknown_benchmarks():
    r = subprocess.run(
        [sys.executable, "-m", "seed_fast.cli", "bench", "--only", "nope"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert set(run_all.ORDER) == {
        "codebook",
        "codebook-fp16",
        "attention",
        "lora",
        "tokenizer",
        "tokenizer-embedded",
        "llm",
        "export",
        "related",
    }
    for name, b in run_all.BENCHES.items():
        assert (ROOT / "benchmarks" / b["script"]).is_file(), name


def test_bench_from_an_installed_package_says_it_needs_a_source_checkout(tmp_path, monkeypatch, capsys):
    """A wheel holds seed_fast/ without the checkout's benchmarks/ beside it: `seed-fast bench` ends in
    one line saying where the benchmarks run from, exit status 2, no traceback."""
    from seed_fast import cli

    (tmp_path / "seed_fast").mkdir()  # site-packages: the package, and no benchmarks/ next to it
    monkeypatch.setattr(cli, "_checkout_root", lambda: tmp_path)
    for argv in (["bench", "--quick"], ["bench", "-h"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("seed-fast bench: error: the benchmarks are not installed with the package")
        assert "source checkout" in err and str(tmp_path) in err and "pip install --no-build-isolation -e ." in err
    # in a checkout the runner is found
    monkeypatch.undo()
    assert cli.bench_script() == ROOT / "benchmarks" / "run_all.py"


def test_benchmark_tables_in_the_readme_and_docs_are_what_the_results_files_print():
    """README.md's per-device summaries and docs/benchmarks.md's full tables are what readme_tables.py
    makes from the committed JSON: a table typed by hand, or left behind when its results file was
    rerun, fails (`python benchmarks/readme_tables.py --write` rewrites them)."""
    import readme_tables

    for target in ("README.md", "docs/benchmarks.md"):
        assert readme_tables.stale(target) is None, readme_tables.stale(target)
    summary = readme_tables.generated("README.md")
    devices = [f.name for f in readme_tables._folders() if readme_tables.summary_table(f)]
    assert {"cpu-amd-epyc-2c", "nvidia-h200"} <= set(devices), devices
    assert summary.count("| op | case |") == len(devices), "one summary table per device"
    # the summary's numbers are the results files' (one spot check against the raw JSON)
    rows = json.loads((ROOT / "benchmarks/results/nvidia-h200/bench_codebook_lookup_float32.json").read_text())["rows"]
    ours = [
        r
        for r in rows
        if (r["N"], r["K"], r["D"]) == (8192, 8192, 32)
        and r["provider"] in ("seed_fast cuda", "seed_fast triton", "seed_fast cpu", "seed_fast torch")
        and r.get("ms") not in (None, "")
    ]
    best = min(ours, key=lambda r: float(r["ms"]))
    assert f"{float(best['ms']):.3f} ms ({best['provider'].split()[-1]})" in summary
    full = readme_tables.generated("docs/benchmarks.md")
    assert (
        full.count("from [benchmarks/results/") >= 12 and "NVIDIA H200" in full and "](../benchmarks/results/" in full
    )


def test_the_training_benchmark_runs_both_providers_on_the_same_loss(tmp_path):
    """bench_train_llm.py at a CI size: both providers, checkpointing off and on, the same loss with
    dropout off, a ratio to peft per setting, and its results files."""
    pytest.importorskip("peft")
    import bench_train_llm

    bench_train_llm.main(
        ["--device", "cpu", "--model", "llama-tiny", "--seq", "16", "--repeats", "1", "--out", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "bench_train_llm_float32.json").read_text())["rows"]
    assert [(r["checkpointing"], r["provider"].split()[0]) for r in rows] == [
        ("off", "peft"),
        ("off", "seed_fast"),
        ("on", "peft"),
        ("on", "seed_fast"),
    ]
    for r in rows:
        assert float(r["check"].split()[0]) < 1e-5, r  # fp32, dropout off: the same loss as peft's
        assert float(r["tok_s"]) > 0 and r["vs_peft"].endswith("x")
    with pytest.raises(SystemExit):
        bench_train_llm.main(["--device", "cpu", "--checkpointing", "maybe"])


def test_the_decode_benchmark_runs_every_table_at_a_ci_size(tmp_path):
    """bench_llm_decode.py on a tiny LM: generate, prefill and the LoRA table (which copies the
    model), each provider's tokens equal to transformers' / peft's."""
    pytest.importorskip("peft")
    import bench_llm_decode

    args = ["--device", "cpu", "--model", "llama-tiny", "--batch", "1", "--prompt", "8", "--new", "4", "--quick"]
    assert bench_llm_decode.main([*args, "--out", str(tmp_path)]) == 0
    md = next(tmp_path.glob("bench_llm_decode*.md")).read_text()
    assert "seed_fast generate_ids" in md and "seed_fast fused lora_linear" in md
    assert "| no |" not in md, md


def test_the_tokenizer_benchmark_holds_codes_to_an_fp32_copy_on_photographs(tmp_path):
    """bench_tokenizer.py on the embedded model: every provider's codes against an fp32 copy of the
    model, on the timed images and on scikit-image's sample photographs."""
    pytest.importorskip("skimage")
    import bench_tokenizer

    args = ["--device", "cpu", "--config", str(ROOT / "seed_fast/default_model/assets/tokenizer")]
    bench_tokenizer.main([*args, "--qformer-batches", "", "--tokenizer-batches", "1", "--out", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("bench_tokenizer*.json")).read_text())["rows"]
    enc = [r for r in rows if r["part"] == "tokenizer"]
    assert {r["provider"] for r in enc} >= {"seed_fast reference (eager)", "seed_fast to_fast()"}
    for r in enc:
        assert r["photos"].endswith("%") and float(r["photos"][:-1]) >= 90.0, r
    ref = next(r for r in enc if r["provider"] == "seed_fast reference (eager)")
    assert ref["check"] == "100.00% codes equal" and ref["photos"] == "100.00%"


def test_the_unclip_benchmark_draws_the_same_images_both_ways(tmp_path):
    """bench_unclip.py on the tiny pipeline: the stock and the sped-up pipeline, the same images."""
    pytest.importorskip("diffusers")
    import bench_unclip

    args = ["--device", "cpu", "--shape", "tiny", "--batches", "1,2", "--steps", "2", "--repeats", "1"]
    assert bench_unclip.main([*args, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_unclip_tiny_float32.json").read_text())["rows"]
    assert len(rows) == 4 and {r["B"] for r in rows} == {1, 2}
    fast = [r for r in rows if r["provider"].startswith("seed_fast")]
    assert len(fast) == 2 and all(float(r["max_diff"]) < 1e-4 for r in fast), fast


def test_the_quantized_loading_benchmark_loads_each_variant(tmp_path):
    """bench_llm_quant.py on a tiny LM: fp32 and torchao int8 through SeedLLM.from_pretrained."""
    pytest.importorskip("torchao")
    import bench_llm_quant

    args = ["--device", "cpu", "--model", "llama-tiny", "--prompt", "8", "--new", "4", "--repeats", "1"]
    assert bench_llm_quant.main([*args, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_llm_quant_llama-tiny.json").read_text())["rows"]
    assert [(r["variant"], r["quantized"]) for r in rows] == [("fp32", "no"), ("int8", "yes")]
    with pytest.raises(ValueError, match="unknown variant"):
        bench_llm_quant.main(["--device", "cpu", "--variants", "int3"])


def test_the_data_benchmark_runs_every_loader_at_a_ci_size(tmp_path, monkeypatch):
    """bench_data.py on 64 small images: every provider, one epoch with every sample once, a
    resumed first batch for seed_fast's loaders, a ratio to the library's own pipeline."""
    pytest.importorskip("webdataset")
    datasets = pytest.importorskip("datasets")
    # no timing is checked here: skip datasets' 5 s pause at the end of each shuffled pass
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)
    import bench_data

    rows = bench_data.main(
        [
            "--n",
            "64",
            "--shards",
            "4",
            "--batch",
            "16",
            "--image-px",
            "40",
            "--size",
            "32",
            "--shuffle-buffer",
            "16",
            "--workers",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["provider"] for r in rows] == [
        "seed_fast tar",
        "seed_fast webdataset",
        "webdataset pipeline",
        "seed_fast hf",
        "datasets pipeline",
    ]
    for r in rows:
        assert r["check"] == "every sample once", r
        assert float(r["samples_s"]) > 0 and r["vs_peer"].endswith("x")
        assert (r["resumed_first_s"] != "") == r["provider"].startswith("seed_fast")
    assert (tmp_path / "bench_data.md").is_file() and json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    with pytest.raises(SystemExit):
        bench_data.main(["--n", "50", "--batch", "16"])
