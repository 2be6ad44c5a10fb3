"""The Triton kernels compile ahead of time for the GPUs seed_fast targets (no GPU needed: Triton's
own ptxas), and the tensor-core paths really run on tensor cores (HMMA in the SASS, not FFMA).

The compiles run in a subprocess: the test session runs Triton as its interpreter (TRITON_INTERPRET=1),
which has no compiler behind the kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import json, os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seed_fast.kernels import codebook_lookup as kcl, lora_linear as klo, qformer_attention as kqa

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature(fn, dtype, consts, typed=None):
    # every argument that is not a constexpr: pointers to dtype and i32 scalars, unless typed names it
    typed = typed or {}
    return {a: typed.get(a, "*" + dtype if a.endswith("_ptr") else "i32") for a in fn.arg_names if a not in consts}


def compile_for(fn, sig, consts, cap, sass=True):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
    if not sass:
        return {"compiled": True}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return {"mma": [l.split()[1] for l in text.splitlines() if "HMMA" in l or "HGMMA" in l][:4], "ffma": "FFMA" in text}


out = {}
CODEBOOK = {"idx_ptr": "*i64", "ws_ptr": "*i64", "cnt_ptr": "*i32", "flag_ptr": "*i32"}
ATTENTION = {"mask_ptr": "*u8", "lse_ptr": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32"}
LORA = {"inv_keep": "fp32", "alpha": "fp32", "seed": "i64", "thresh": "i64"}
for cap in (80, 90):
    for dtype, precision in (("fp32", "tf32x3"), ("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")):
        for split in (False, True):
            consts = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, PRECISION=precision, CHECK=True, WRITE_ZQ=True,
                          SPLIT=split)
            sig = signature(kcl._codebook_lookup_kernel, dtype, consts, CODEBOOK)
            out[f"{cap}-{dtype}-{precision}-{split}"] = compile_for(kcl._codebook_lookup_kernel, sig, consts, cap)
    for dtype in ("fp16", "bf16", "fp32"):
        for name in ("_qformer_attention_fwd_kernel", "_qformer_attention_bwd_fused_kernel"):
            fn = getattr(kqa, name)
            consts = dict(CAUSAL=True, HAS_MASK=True, IEEE=dtype == "fp32", BLOCK_M=32, BLOCK_N=64, BLOCK_D=64)
            out[f"{name}-{cap}-{dtype}"] = compile_for(fn, signature(fn, dtype, consts, ATTENTION), consts, cap)
        for name in ("_lora_shrink_kernel", "_lora_expand_masked_add_kernel"):
            fn = getattr(klo, name)
            consts = dict(IEEE=dtype == "fp32", BM=64, BK=64, BR=16)
            out[f"{name}-{cap}-{dtype}"] = compile_for(fn, signature(fn, dtype, consts, LORA), consts, cap)
    for dtype in ("fp16", "fp32"):
        for name in ("_bgmv_shrink_kernel", "_bgmv_expand_kernel"):
            fn = getattr(klo, name)
            consts = {k: 128 if k in ("BK", "BN") else 16 for k in ("BK", "BN", "BR") if k in fn.arg_names}
            typed = {"ids_ptr": "*i64", "s_ptr": "*fp32", "t_ptr": "*fp32"}
            out[f"{name}-{cap}-{dtype}"] = compile_for(fn, signature(fn, dtype, consts, typed), consts, cap, sass=False)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    if run.returncode != 0 and ("ptxas" in run.stderr or "cuobjdump" in run.stderr or "backend" in run.stderr):
        pytest.skip(f"this triton cannot compile for NVIDIA GPUs here: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype,precision", [("fp32", "tf32x3"), ("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")])
@pytest.mark.parametrize("split", [False, True])
def test_codebook_lookup_kernel_compiles_to_tensor_cores(compiled, capability, dtype, precision, split):
    got = compiled[f"{capability}-{dtype}-{precision}-{split}"]
    if precision == "ieee":  # the path for GPUs without TF32 (sm_70)
        assert not got["mma"] and got["ffma"]
    else:
        assert got["mma"], "the tensor-core path compiled to no HMMA / HGMMA instruction"
        if precision == "tf32x3":
            assert all("TF32" in op for op in got["mma"]), got["mma"]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize(
    "kernel",
    [
        "_qformer_attention_fwd_kernel",
        "_qformer_attention_bwd_fused_kernel",
        "_lora_shrink_kernel",
        "_lora_expand_masked_add_kernel",
    ],
)
def test_attention_and_lora_kernels_compile(compiled, capability, dtype, kernel):
    got = compiled[f"{kernel}-{capability}-{dtype}"]
    if dtype == "fp32":  # IEEE fp32 dots: the fp32 contract
        assert not got["mma"] and got["ffma"]
    else:
        assert got["mma"], "fp16 / bf16 compiled to no tensor-core instruction"


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("kernel", ["_bgmv_shrink_kernel", "_bgmv_expand_kernel"])
def test_mixed_adapter_kernels_compile(compiled, capability, dtype, kernel):
    assert compiled[f"{kernel}-{capability}-{dtype}"]["compiled"]
