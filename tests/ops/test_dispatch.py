"""impl="auto" follows the dispatch table: nearest measured size, exact case, vendor default elsewhere."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from seed_fast.ops import codebook_lookup, dispatch, lora_linear, qformer_attention, record_dispatch
from seed_fast.testing import assert_close, assert_equal

cl_mod = importlib.import_module("seed_fast.ops.codebook_lookup")
lora_mod = importlib.import_module("seed_fast.ops.lora_linear")
qa_mod = importlib.import_module("seed_fast.ops.qformer_attention")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import dispatch_table as builder  # noqa: E402

IMPLS = {
    "qformer_attention": set(qa_mod.IMPLS) - {"auto"},
    "codebook_lookup": set(cl_mod.IMPLS) - {"auto"},
    "lora_linear": set(lora_mod.IMPLS) - {"auto"},
}


@pytest.fixture
def fake_table():
    """Install a table for this test only; the committed one is restored afterwards."""

    def install(cpu_ops: dict):
        dispatch.set_table({"format": 1, "devices": {"cpu": cpu_ops}})

    yield install
    dispatch.set_table(None)


def _row(case, size, eager, graph=None):
    return {"case": case, "size": size, "eager": eager, "graph": graph or eager, "us": {}}


def _attention_impls(b, lq=32, grad=False, causal=True):
    q = torch.randn(b, 2, lq, 8, requires_grad=grad)
    with record_dispatch() as log:
        out = qformer_attention(q, q, q, causal=causal)
        if grad:
            out.sum().backward()
    return {impl for op, impl in log if op == "qformer_attention"}


def test_nearest_measured_size_on_a_log_scale(fake_table):
    case = {"dtype": "float32", "attention": "self", "mode": "fwd"}
    fake_table({"qformer_attention": [_row(case, 1, "ref"), _row(case, 100, "sdpa")]})
    assert _attention_impls(1) == {"ref"}
    assert _attention_impls(9) == {"ref"}  # log 9 is nearer log 1 than log 100
    assert _attention_impls(11) == {"sdpa"}
    assert _attention_impls(1000) == {"sdpa"}


def test_case_must_match_exactly_else_the_vendor_default(fake_table):
    case = {"dtype": "float32", "attention": "self", "mode": "fwd"}
    fake_table({"qformer_attention": [_row(case, 4, "ref")]})
    assert _attention_impls(4) == {"ref"}
    assert _attention_impls(4, grad=True) == {"sdpa"}  # fwd+bwd not in the table
    assert _attention_impls(4, causal=False) == {"sdpa"}  # cross-attention not in the table
    assert _attention_impls(4, lq=300) == {"sdpa"}  # beyond the measured query counts


def test_graph_column_is_used_while_capturing():
    dispatch.set_table(
        {"devices": {"sm_90": {"codebook_lookup": [_row({"dtype": "float32"}, 32, eager="torch", graph="cuda")]}}}
    )
    try:
        case = (("dtype", "float32"),)
        assert dispatch._decide("codebook_lookup", "sm_90", case, 32, False, "x") == "torch"
        assert dispatch._decide("codebook_lookup", "sm_90", case, 32, True, "x") == "cuda"
        assert dispatch._decide("codebook_lookup", "sm_80", case, 32, False, "x") == "x"  # never measured
    finally:
        dispatch.set_table(None)


def test_a_table_choice_that_cannot_run_falls_back(fake_table):
    # a table naming the Triton kernel, on a machine where it cannot run bf16, still runs
    fake_table({"lora_linear": [_row({"dtype": "bfloat16", "mode": "fwd"}, 8, "triton")]})
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    w = torch.randn(12, 16, dtype=torch.bfloat16)
    a, b = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(12, 4, dtype=torch.bfloat16)
    with record_dispatch() as log:
        y = lora_linear(x, w, None, a, b, 2.0)
    assert log == [("lora_linear", "torch")]
    assert_close(y, lora_mod.lora_linear_ref(x, w, None, a, b, 2.0), atol=0.1, rtol=0.05, name="bf16 lora_linear")


def test_codebook_auto_follows_the_table(fake_table):
    fake_table({"codebook_lookup": [_row({"dtype": "float32"}, 1, "torch"), _row({"dtype": "float32"}, 1000, "ref")]})
    book = torch.randn(64, 8)
    for n, want in ((1, "torch"), (2000, "ref")):
        z = torch.randn(n, 8)
        with record_dispatch() as log:
            idx, _ = codebook_lookup(z, book)
        assert log == [("codebook_lookup", want)]
        assert_equal(idx, cl_mod.codebook_lookup_ref(z, book)[0], name=f"n={n}")


def test_sdpa_backend_impls_explain_themselves_on_cpu():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="impl='sdpa_efficient' cannot run.*CUDA kernels"):
        qformer_attention(q, q, q, impl="sdpa_efficient")


def test_committed_table_is_consistent():
    table = json.loads(dispatch.TABLE_PATH.read_text())
    assert table["devices"], "the committed table holds no device class"
    for dev, ops in table["devices"].items():
        assert dev == "cpu" or dev.startswith("sm_"), dev
        for op, rows in ops.items():
            assert op in IMPLS, op
            seen = set()
            for r in rows:
                key = (json.dumps(r["case"], sort_keys=True), r["size"])
                assert key not in seen, f"{dev} {op}: {key} twice"
                seen.add(key)
                assert {r["eager"], r["graph"]} <= IMPLS[op], (dev, op, r)
                times = {i: (t["device"], t["host"]) for i, t in r["us"].items()}
                assert set(times) <= IMPLS[op]
                again = builder._decide(times)
                # the stored choices are the rule's choices on the stored times
                assert (again["eager"], again["graph"]) == (r["eager"], r["graph"]), (dev, op, r)


def test_choice_rule_prefers_device_time_unless_host_work_is_decisive():
    # host times within 1.5x of the smallest count as noise
    assert builder._decide({"a": (100.0, 40.0), "b": (60.0, 55.0)})["eager"] == "b"
    # a backend whose host work is 4x the others' loses in eager mode, wins under a graph
    d = builder._decide({"ours": (10.0, 120.0), "vendor": (20.0, 30.0)})
    assert (d["eager"], d["graph"]) == ("vendor", "ours")
    # at large sizes device time dominates again
    assert builder._decide({"ours": (300.0, 120.0), "vendor": (500.0, 30.0)})["eager"] == "ours"


def test_torch_compile_fullgraph_in_a_fresh_process(seed):
    """The first call of each op inside torch.compile(fullgraph=True), in a process that has not run
    the op eagerly: nothing on the dispatch path (the table, the compiled extension) may be read
    for the first time while dynamo traces."""
    import subprocess
    import sys

    script = """
import sys
import torch
from seed_fast.ops import codebook_lookup, lora_linear, qformer_attention
from seed_fast.testing import assert_close, assert_equal
torch.manual_seed(int(sys.argv[1]))
c = lambda f: torch.compile(f, fullgraph=True, backend="aot_eager")
z, book = torch.randn(5, 8), torch.randn(20, 8)
assert_equal(c(lambda z, b: codebook_lookup(z, b)[0])(z, book), codebook_lookup(z, book)[0], name="auto")
assert_equal(c(lambda z, b: codebook_lookup(z, b, impl="cpu")[0])(z, book), codebook_lookup(z, book)[0], name="cpu")
q = torch.randn(1, 2, 4, 8)
att = lambda q: qformer_attention(q, q, q, causal=True)
assert_close(c(att)(q), att(q), atol=1e-5, rtol=1.3e-6, name="attention")
x, w, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
lora = lambda x: lora_linear(x, w, None, a, b, 0.5)
assert_close(c(lora)(x), lora(x), atol=1e-5, rtol=1.3e-6, name="lora")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script, str(seed)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
