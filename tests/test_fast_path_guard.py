"""Regression guard: the fast paths run where they should, through the public model APIs.

A fast path that silently falls back (the C++ kernel not built, a dispatch rule broken, a model
path calling the reference) keeps every output right and only costs speed, so no other test sees
it. These tests record which backend each op call used (`seed_fast.ops.record_dispatch`) and fail
on a fallback. They never look at timings.
"""

import os

import pytest
import torch

from seed_fast import SeedLLM, SeedTokenizer, _ext
from seed_fast.ops import dispatch, record_dispatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the op's backend where the dispatch table has no measurement for the case
DEFAULTS = {"codebook_lookup": "torch" if CUDA else "cpu", "qformer_attention": "sdpa", "lora_linear": "torch"}


def _expected(op: str) -> set[str]:
    """Every backend the committed dispatch table may pick for `op` on this device class, plus the
    op's default for cases it did not measure: a call outside this set means dispatch ignored it."""
    dev = dispatch.device_class(torch.device(DEVICE))
    picks = {r[k] for r in dispatch.cases(op, dev) for k in ("eager", "graph")}
    return picks | {DEFAULTS[op]}


EXPECTED = {op: _expected(op) for op in DEFAULTS}


def _require_cpu_extension():
    if _ext.cpu_ext() is None:
        msg = f"the C++ extension is not built ({_ext.cpu_ext_error()}): codebook_lookup falls back to the reference"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _used(log, op):
    return {impl for name, impl in log if name == op}


def _assert_fast(log, ops):
    for op in ops:
        used = _used(log, op)
        assert used, f"{op} was never called: the model path no longer goes through seed_fast's op"
        assert used <= EXPECTED[op], f"{op} used {sorted(used)}, expected only {sorted(EXPECTED[op])} on {DEVICE}"


def test_tokenizer_fast_path_uses_the_kernels():
    if not CUDA:
        _require_cpu_extension()
    tok = SeedTokenizer.from_config("tiny", seed=0).to(DEVICE).to_fast()
    x = torch.rand(2, 3, 224, 224, device=DEVICE)
    with record_dispatch() as log:
        tok.encode(x)
    _assert_fast(log, ["codebook_lookup", "qformer_attention"])


def test_reference_path_really_is_the_reference():
    # the guard itself can fail: after to_reference() attention must report "ref"
    tok = SeedTokenizer.from_config("tiny", seed=0).to_reference()
    with record_dispatch() as log:
        tok.encode(torch.rand(1, 3, 224, 224))
    assert _used(log, "qformer_attention") == {"ref"}


def test_stage2_quantizer_training_step_uses_the_kernel():
    if not CUDA:
        _require_cpu_extension()
    tok = SeedTokenizer.from_config("tiny", seed=0).to(DEVICE)
    emb = torch.randn(3, 32, tok.config.qformer.hidden, device=DEVICE, requires_grad=True)
    with record_dispatch() as log:
        z, codes, loss = tok.quantizer(emb)
        (z.square().mean() + loss).backward()
    _assert_fast(log, ["codebook_lookup"])


def test_fused_lora_llm_uses_lora_linear():
    pytest.importorskip("peft")
    llm = SeedLLM.from_config("tiny-llama", seed=0)
    llm.add_lora(True, fused=True)
    llm.model.to(DEVICE)
    ids = torch.randint(0, 50, (2, 9), device=DEVICE)
    with record_dispatch() as log:
        llm.model(input_ids=ids).logits.sum().backward()
    _assert_fast(log, ["lora_linear"])
    n_lora_layers = sum(1 for n, _ in llm.model.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert len([1 for name, _ in log if name == "lora_linear"]) >= n_lora_layers


def test_default_tokenizer_path_reads_no_scalar_back():
    """No `.item()` / `int(tensor)` / `bool(tensor)` on the default encode and decode paths: on a GPU
    each is a host sync that stalls the launch queue. (decode reads the codes' range once, as one
    batched copy, to refuse out-of-range codes before they reach a gather.)"""
    if not CUDA:
        _require_cpu_extension()
    tok = SeedTokenizer.from_config("tiny", seed=0).to(DEVICE)
    images = (torch.rand(2, 3, 224, 224) * 255).to(torch.uint8).to(DEVICE)
    tok.encode(images)  # first call: a CPU codebook's scale is checked once per version (CPU only)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        codes = tok.encode(images)
        tok.decode(codes)
    reads = [e.name for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::item")]
    assert reads == [], reads
