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
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seed_fast.kernels import codebook_lookup as kcl

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
sig = {"z_ptr": "*fp32", "cb_ptr": "*fp32", "idx_ptr": "*i64", "zq_ptr": "*fp32", "ws_ptr": "*i64",
       "cnt_ptr": "*i32", "flag_ptr": "*i32"}
sig.update({n: "i32" for n in ("N", "K", "D", "stride_z", "stride_c", "stride_q", "codes_per_split", "splits")})
out = {}
for cap in (80, 90):
    for dtype, precision in (("fp32", "tf32x3"), ("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")):
        for split in (False, True):
            s = dict(sig, z_ptr="*" + dtype, cb_ptr="*" + dtype, zq_ptr="*" + dtype)
            consts = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, PRECISION=precision, CHECK=True, WRITE_ZQ=True,
                          SPLIT=split)
            src = ASTSource(fn=kcl._codebook_lookup_kernel, signature={**s, **{k: "constexpr" for k in consts}},
                            constexprs=consts)
            k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
            out[f"{cap}-{dtype}-{precision}-{split}"] = {
                "mma": [l.split()[1] for l in sass.splitlines() if "HMMA" in l or "HGMMA" in l][:4],
                "ffma": "FFMA" in sass}
from seed_fast.kernels import qformer_attention as kqa

def attention_signature(fn, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in ("mask_ptr",):
            sig[name] = "*u8"
        elif name == "lse_ptr":
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name.isupper():
            continue
        else:
            sig[name] = "i32"
    sig["H"] = sig["LQ"] = sig["LK"] = sig["DH"] = "i32"
    return sig

for cap in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for name in ("_qformer_attention_fwd_kernel", "_qformer_attention_bwd_fused_kernel"):
            fn = getattr(kqa, name)
            consts = dict(CAUSAL=True, HAS_MASK=True, IEEE=dtype == "fp32", BLOCK_M=32, BLOCK_N=64, BLOCK_D=64)
            s = {k: v for k, v in attention_signature(fn, dtype).items() if k not in consts}
            src = ASTSource(fn=fn, signature={**s, **{k: "constexpr" for k in consts}}, constexprs=consts)
            k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
            out[f"{name}-{cap}-{dtype}"] = {
                "mma": [l.split()[1] for l in sass.splitlines() if "HMMA" in l or "HGMMA" in l][:4],
                "ffma": "FFMA" in sass}
from seed_fast.kernels import lora_linear as klo

for cap in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for name, ptrs in (("_lora_shrink_kernel", ("x_ptr", "a_ptr", "t_ptr")),
                           ("_lora_expand_masked_add_kernel", ("out_ptr", "u_ptr", "a_ptr"))):
            fn = getattr(klo, name)
            consts = dict(IEEE=dtype == "fp32", BM=64, BK=64, BR=16)
            s = {}
            for arg in fn.arg_names:
                if arg in consts:
                    continue
                s[arg] = "*" + dtype if arg in ptrs else ("fp32" if arg in ("inv_keep", "alpha") else
                                                          ("i64" if arg in ("seed", "thresh") else "i32"))
            src = ASTSource(fn=fn, signature={**s, **{k: "constexpr" for k in consts}}, constexprs=consts)
            k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
            out[f"{name}-{cap}-{dtype}"] = {
                "mma": [l.split()[1] for l in sass.splitlines() if "HMMA" in l or "HGMMA" in l][:4],
                "ffma": "FFMA" in sass}
for cap in (80, 90):
    for dtype in ("fp16", "fp32"):
        for name, ptrs in (("_bgmv_shrink_kernel", ("x_ptr", "a_ptr")), ("_bgmv_expand_kernel", ("y_ptr", "b_ptr"))):
            fn = getattr(klo, name)
            consts = {k: 128 if k in ("BK", "BN") else 16 for k in ("BK", "BN", "BR") if k in fn.arg_names}
            s = {}
            for arg in fn.arg_names:
                if arg in consts:
                    continue
                if arg in ptrs:
                    s[arg] = "*" + dtype
                elif arg == "ids_ptr":
                    s[arg] = "*i64"
                elif arg.endswith("_ptr"):
                    s[arg] = "*fp32"
                else:
                    s[arg] = "i32"
            src = ASTSource(fn=fn, signature={**s, **{k: "constexpr" for k in consts}}, constexprs=consts)
            triton.compile(src, target=GPUTarget("cuda", cap, 32))
            out[f"{name}-{cap}-{dtype}"] = {"compiled": True}
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
