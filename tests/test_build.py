"""The package, its compiled extension and `python -m seed_fast.info`."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import seed_fast
from seed_fast import _ext
from seed_fast.ops import codebook_lookup_ref
from seed_fast.testing import assert_close, assert_equal

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_extension_is_built():
    mod = _ext.cpu_ext()
    assert mod is not None, f"C++ extension missing: {_ext.cpu_ext_error()}"
    info = dict(mod.build_info())
    assert info["threads"] >= 1 and isinstance(info["openmp"], bool)


def _info() -> str:
    return subprocess.run([sys.executable, "-m", "seed_fast.info"], capture_output=True, text=True, check=True).stdout


def test_cuda_extension_absence_is_explained(seed):
    """Without the CUDA extension: a reason, shown by `python -m seed_fast.info`, and no CUDA kernel
    registered. With it: its CUDA version and archs, shown by info, and a CUDA kernel that runs."""
    op = "seed_fast::_codebook_lookup_indices"
    assert _ext.cpu_ext() is not None, _ext.cpu_ext_error()  # the operator is defined by the C++ extension
    cuda = _ext.cuda_ext()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    line = next(ln for ln in _info().splitlines() if ln.split()[:1] == ["cuda"])
    if cuda is None:
        reason = _ext.cuda_ext_error()
        assert reason and reason.strip(), "a missing CUDA extension must say why"
        assert line.split(None, 1)[1] == f"not built: {reason}", line
        assert not has_cuda_kernel, f"{op} has a CUDA kernel although seed_fast._C_cuda did not load"
        return
    assert _ext.cuda_ext_error() is None
    b = cuda.build_info()
    assert re.fullmatch(r"\d+\.\d+", b["cuda_version"]), b
    archs = [a for a in re.split(r"[;,\s]+", b["archs"]) if a]
    assert archs and all(re.fullmatch(r"(\d+\.\d+a?|[A-Za-z]+)(\+PTX)?", a) for a in archs), b  # never "unknown"
    assert torch.version.cuda and b["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0], b
    assert line.split(None, 1)[1] == f"built (CUDA {b['cuda_version']}, archs {b['archs']})", line
    assert has_cuda_kernel, f"seed_fast._C_cuda loaded but {op} has no CUDA kernel"
    if torch.cuda.is_available():
        # small integers: exact scores, so the kernel must give the reference's indices, ties included
        g = torch.Generator().manual_seed(seed)
        uniq = torch.randint(-3, 4, (50, 16), generator=g).float()
        book = torch.cat([uniq, uniq])
        z = torch.randint(-3, 4, (70, 16), generator=g).float()
        idx = torch.ops.seed_fast._codebook_lookup_indices(z.cuda(), book.cuda())
        assert idx.device.type == "cuda"
        assert_equal(idx, codebook_lookup_ref(z, book)[0], name="CUDA kernel vs reference")


def test_info_runs_and_lists_backends():
    out = _info()
    for word in ("torch", "transformers", "backends:", "ref", "cpu", "cuda", "triton"):
        assert word in out
    assert "cpu            built" in out


def test_source_folders_live_in_the_seed_fast_namespace():
    import seed_fast.export.to_onnx
    import seed_fast.kernels.codebook_lookup

    assert Path(seed_fast.kernels.codebook_lookup.__file__).resolve().parent == ROOT / "kernels"
    assert Path(seed_fast.export.to_onnx.__file__).resolve().parent == ROOT / "export"
    for folder in ("kernels", "export"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ must not be a top-level package"


# what test_public_api checks each public name does; a name added to seed_fast.__all__ gets a check there
PUBLIC = {
    "CheckpointError",
    "InputError",
    "LoadReport",
    "SeedLLM",
    "SeedTokenizer",
    "TokenizerConfig",
    "get_config",
    "__version__",
}


def test_public_api(tmp_path, seed):
    """Each public name, called as a user would on tiny inputs: results, shapes and errors."""
    assert set(seed_fast.__all__) <= PUBLIC, f"add a behaviour check for {sorted(set(seed_fast.__all__) - PUBLIC)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert seed_fast.__version__ == project["version"]

    # get_config / TokenizerConfig: presets by name, copies, dict round trips, refusals
    cfg = seed_fast.get_config("tiny")
    assert isinstance(cfg, seed_fast.TokenizerConfig) and cfg.name == "tiny"
    assert seed_fast.get_config(cfg) == cfg and seed_fast.get_config(cfg) is not cfg
    assert seed_fast.TokenizerConfig.from_dict(cfg.to_dict()) == cfg == seed_fast.get_config(cfg.to_dict())
    with pytest.raises(ValueError, match="unknown tokenizer preset 'no-such'"):
        seed_fast.get_config("no-such")

    # SeedTokenizer: images -> 32 codes -> one generation embedding each; bad inputs are InputErrors
    tok = seed_fast.SeedTokenizer.from_config(cfg, seed=0, init="unit")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # resized to 224
    codes = tok.encode(images)
    assert codes.shape == (2, tok.num_codes) == (2, 32) and codes.dtype == torch.int64
    assert_equal(tok.encode(images[1:]), codes[1:], name="codes of one image alone")
    emb = tok.decode(codes)
    assert emb.shape == (2, cfg.detokenizer.out_dim) and emb.dtype == torch.float32
    assert_close(emb[1:], tok.decode(codes[1:]), atol=1e-5, rtol=1e-5, name="decode of one row")
    with pytest.raises(seed_fast.InputError, match="4 dims"):
        tok.encode(images[0])
    with pytest.raises(seed_fast.InputError, match=rf"must lie in \[0, {tok.codebook_size}\)"):
        tok.decode(torch.full((1, 32), tok.codebook_size))
    assert issubclass(seed_fast.InputError, ValueError)

    # from_official: the released layout loads back into the same tokenizer, with a LoadReport;
    # a file with a key missing is a CheckpointError that names it
    quant, vit = tok.official_state_dicts()
    torch.save(quant, tmp_path / "q.pt")
    torch.save(vit, tmp_path / "v.pt")
    back = seed_fast.SeedTokenizer.from_official(tmp_path / "q.pt", tmp_path / "v.pt", config="tiny")
    assert isinstance(back.load_report, seed_fast.LoadReport) and back.load_report.ok(), back.load_report.summary()
    assert back.load_report.loaded == len(tok.state_dict())
    assert_equal(back.encode(images), codes, name="codes after from_official")
    del quant["quantize.embedding.weight"]
    torch.save(quant, tmp_path / "q.pt")
    with pytest.raises(seed_fast.CheckpointError, match="quantizer.codebook.weight"):
        seed_fast.SeedTokenizer.from_official(tmp_path / "q.pt", tmp_path / "v.pt", config="tiny")
    assert issubclass(seed_fast.CheckpointError, ValueError)

    # SeedLLM: text -> 32 valid image codes; codes -> a caption
    llm = seed_fast.SeedLLM.from_config("tiny-llama", seed=0)
    drawn = llm.generate_image_codes(["one red circle", "two blue squares"])
    assert drawn.shape == (2, 32) and drawn.dtype == torch.int64
    assert int(drawn.min()) >= 0 and int(drawn.max()) < llm.tokenizer.codebook_size
    assert_equal(llm.generate_image_codes(["two blue squares"]), drawn[1:], name="greedy codes, batch of one")
    caps = llm.caption(codes=drawn, max_new_tokens=4)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    with pytest.raises(seed_fast.InputError, match="exactly 32 codes"):
        llm.caption(codes=drawn[:, :31])


def test_extensions_raise_only_through_libc10():
    """TORCH_CHECK_VALUE / TORCH_CHECK_TYPE / C10_THROW_ERROR / a bare `throw` raise from the
    extension's own code, which crashed the process (SIGSEGV) on a GPU machine where TORCH_CHECK,
    thrown inside libc10, reached Python; csrc/ uses TORCH_CHECK only."""
    root = ROOT / "csrc"
    typed = re.compile(r"\b(TORCH_CHECK_(VALUE|TYPE|INDEX|NOT_IMPLEMENTED|LINALG)|C10_THROW_ERROR|throw)\b")
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if typed.search(code):
                found.append(f"{path.relative_to(root.parent)}:{n}: {line.strip()}")
    assert not found, "raise with TORCH_CHECK (thrown inside libc10):\n" + "\n".join(found)


def test_cuda_tensor_core_kernels_run_on_tensor_cores():
    """The built CUDA extension's "tc" kernels hold TF32 HMMA instructions in every sm_80+ cubin (their
    FFMAs are the code norms only), and the SIMT kernel none. Needs the CUDA extension and Triton's
    cuobjdump; no GPU."""
    cuda = _ext.cuda_ext()
    if cuda is None:
        pytest.skip(f"CUDA extension not built: {_ext.cuda_ext_error()}")
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("Triton's cuobjdump is not installed")
    so = Path(cuda.__file__)
    sass = subprocess.run([str(tool), "-sass", str(so)], capture_output=True, text=True, check=True).stdout
    kernels: dict[tuple[str, str], str] = {}  # (arch, kernel) -> its SASS
    arch = name = None
    for line in sass.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch, name = m.group(1), None
        elif m := re.search(r"Function : (\S+)", line):
            name = m.group(1)
            kernels[(arch, name)] = ""
        elif name is not None:
            kernels[(arch, name)] += line + "\n"
    tc = {k: v for k, v in kernels.items() if "codebook_lookup_tc_kernel" in k[1] and int(k[0][3:5]) >= 80}
    assert tc, f"no sm_80+ tensor-core kernel in {so.name}: {sorted(kernels)}"
    for (arch, name), body in tc.items():
        assert "HMMA" in body and "TF32" in body, f"{arch} {name}: no TF32 HMMA"
    simt = [v for k, v in kernels.items() if "codebook_lookup_kernel" in k[1]]
    assert simt and not any("HMMA" in v for v in simt)
