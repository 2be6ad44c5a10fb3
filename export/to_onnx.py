"""Export the SEED stack to ONNX, one file per part, with a manifest the torch-free runtime reads.

Every part is traced on the reference path (standard ONNX ops only, no custom domain), checked with
`onnx.checker`, then run in onnxruntime (CPU) on fresh random inputs and compared with torch before
the export reports success. The fused kernels (Triton / CUDA) do not enter the graphs: see
`seed_fast.export.tensorrt_build` for why and how TensorRT handles the standard-op graphs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import SeedTokenizer
from ..models.llm.seed_llm import SeedLLM
from .graphs import (
    CODE_CHUNK,
    DetokenizerGraph,
    LMGraph,
    TokenizerGraph,
    UnclipUNetGraph,
    UNetGraph,
    VaeDecodeGraph,
    kv_shape,
)
from .runtime import MANIFEST

# 2: optimum's LLM layout (model.onnx, past_key_values.i.key, full logits, config.json and the
# tokenizer files beside it), image_tokenizer.onnx / image_detokenizer.onnx
FORMAT = 2
PARTS = ("tokenizer", "detokenizer", "llm", "decoder")
LLM_FILE = "model.onnx"  # optimum's default file name
DEFAULT_OPSET = 17
TWO_GB = 2**31
# fp32 parity bound (relative to the largest reference value); fp16 graphs get a looser one
RTOL = {False: 1e-4, True: 2e-2}


class ExportError(RuntimeError):
    """An export that could not be made or failed its checks."""


@dataclass
class PartReport:
    part: str
    files: list[str]
    seconds: float
    megabytes: float
    parity: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- loading
def load_checkpoint(checkpoint: str | os.PathLike | None, parts: tuple[str, ...]) -> dict[str, Any]:
    """The torch objects a set of parts needs, from a checkpoint folder.

    Accepted folders: a default-model folder (tokenizer/, llm/, decoder/), a SeedLLM folder
    (seed_llm.json [+ tokenizer/]), a SeedTokenizer folder (config.json + weights) or a
    SeedImageDecoderPipeline folder (unet/ + scheduler/)."""
    if checkpoint is None:
        raise ExportError(
            f"no checkpoint folder to export {list(parts)} from: pass checkpoint= (the embedded model's is "
            "seed_fast.default_model.DEFAULT_DIR) or the torch objects as objects="
        )
    root = Path(checkpoint).expanduser()
    if not root.is_dir():
        raise ExportError(f"--checkpoint {str(root)!r} is not a folder")
    found: dict[str, Any] = {}
    want_tok = bool({"tokenizer", "detokenizer"} & set(parts))
    tok_dir = next((d for d in (root / "tokenizer", root) if _is_tokenizer_dir(d)), None)
    llm_dir = next((d for d in (root / "llm", root) if (d / "seed_llm.json").is_file()), None)
    dec_dirs = [root / "decoder", root / "diffusion", root] + ([llm_dir / "diffusion"] if llm_dir is not None else [])
    dec_dir = next((d for d in dec_dirs if (d / "unet").is_dir() and (d / "scheduler").is_dir()), None)
    if want_tok or "llm" in parts:
        if tok_dir is None and llm_dir is not None and _is_tokenizer_dir(llm_dir / "tokenizer"):
            tok_dir = llm_dir / "tokenizer"
    if want_tok:
        if tok_dir is None:
            raise ExportError(
                f"{root}: no SeedTokenizer folder (config.json + model.safetensors) in it or in tokenizer/"
            )

        found["tokenizer"] = SeedTokenizer.from_pretrained(tok_dir)
    if "llm" in parts:
        if llm_dir is None:
            raise ExportError(f"{root}: no SeedLLM folder (seed_llm.json) in it or in llm/")

        found["llm"] = SeedLLM.from_pretrained(llm_dir, tokenizer=found.get("tokenizer"), fused_lora=False)
    if "decoder" in parts:
        if dec_dir is None:
            raise ExportError(f"{root}: no image-decoder folder (unet/ + scheduler/) in it or in decoder/")
        if (dec_dir / "vae").is_dir():  # Stable unCLIP (SEED's released decoder)
            from ..models.decoders.unclip import load_unclip_pipeline

            found["decoder"] = load_unclip_pipeline(str(dec_dir), dtype=torch.float32)
        else:
            from ..models.decoders.image_decoder import load_image_decoder

            found["decoder"] = load_image_decoder(dec_dir)
    return found


def _is_tokenizer_dir(d: Path) -> bool:
    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        return False
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("class") == "SeedTokenizer" or ("qformer" in cfg and "vision" in cfg)


# ------------------------------------------------------------------------------------- utilities
# Which exporter each part takes. The dynamo exporter (torch.export, then onnxscript) is used where
# it gives the same parity as the legacy TorchScript one, measured with torch 2.13 and onnxscript
# 0.7: the image tokenizer (codes identical) and the embedded decoder's UNet (1.1e-6 relative). The
# legacy exporter stays where dynamo does not get there: the de-tokenizer (the graph it writes
# fails onnx.checker: the output name is used twice), the LLM (its dynamic_axes cannot be turned
# into torch.export dynamic shapes: the KV cache's past length is 0 at prefill, a size torch.export
# specializes), and the parts not yet measured with it (the autoencoder's decoder, Stable unCLIP's
# UNet and VAE). Models of 1.5 GB and more keep the legacy path and its external-data handling,
# and without onnxscript installed every part takes the legacy exporter.
DYNAMO_MAX_BYTES = 1.5 * 2**30


def _dynamo_usable(module) -> bool:
    import importlib.util

    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return importlib.util.find_spec("onnxscript") is not None and size < DYNAMO_MAX_BYTES


def _export(
    module, args, path: Path, *, input_names, output_names, dynamic_axes, opset: int, dynamo: bool = False
) -> str:
    """Trace `module` to `path`; returns the exporter used ("dynamo" or "legacy")."""
    module.eval()
    names = dict(input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent python branches
        failed = None
        if dynamo and _dynamo_usable(module):
            try:
                kw = dict(dynamo=True, opset_version=max(opset, 18), external_data=False, verbose=False)
                torch.onnx.export(module, tuple(args), str(path), **names, **kw)
                return "dynamo"
            except Exception as e:  # another torch / onnxscript than measured: the legacy exporter instead
                failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                for f in path.parent.iterdir():
                    f.unlink()
        kw = dict(dynamo=False, opset_version=opset, do_constant_folding=True)
        torch.onnx.export(module, tuple(args), str(path), **names, **kw)
    return "legacy" if failed is None else f"legacy (the dynamo exporter failed: {failed})"


def _finish_file(path: Path, external_data: bool | None) -> list[str]:
    """onnx.checker on the file; weights moved to one `<name>.data` file beside it when the model is
    over 2 GB (protobuf's limit) or external_data=True. Returns the file names written."""
    import onnx

    tmp_dir = path.parent
    size = sum(f.stat().st_size for f in tmp_dir.iterdir() if f.is_file())
    use_external = size >= TWO_GB if external_data is None else external_data
    if use_external:
        model = onnx.load(str(path), load_external_data=True)
        for f in list(tmp_dir.iterdir()):
            if f != path and f.is_file():
                f.unlink()  # the exporter's one-file-per-tensor data
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
        del model
    onnx.checker.check_model(str(path))
    return sorted(f.name for f in tmp_dir.iterdir() if f.is_file())


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / max(scale, 1e-12)) if b.size else 0.0


def _check(name: str, rel: float, fp16: bool) -> None:
    if not rel <= RTOL[fp16]:
        raise ExportError(f"{name}: onnxruntime differs from torch by {rel:.3g} (relative; bound {RTOL[fp16]:g})")


def _eval_dtype(module: torch.nn.Module, fp16: bool) -> torch.nn.Module:
    module.eval()
    return module.half() if fp16 else module.float()


# ---------------------------------------------------------------------------------------- parts
def export_tokenizer(
    tok,
    folder: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    image_dtype: str = "uint8",
    external_data: bool | None = None,
    seed: int = 0,
) -> tuple[PartReport, dict]:
    """SeedTokenizer -> image_tokenizer.onnx: images (B, 3, S, S) -> codes (B, 32) int64 (the image
    tokenizer: not the text tokenizer a Hugging Face user expects under tokenizer.*)."""
    if image_dtype not in ("uint8", "float32"):
        raise ExportError(f"image_dtype must be 'uint8' or 'float32', got {image_dtype!r}")
    t0 = time.perf_counter()
    was_fast = tok.is_fast
    tok.to_reference()
    _eval_dtype(tok, fp16)
    s = tok.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    uint8 = image_dtype == "uint8"

    def images(b):
        if uint8:
            return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)
        return torch.rand(b, 3, s, s, generator=g)

    graph = TokenizerGraph(tok, uint8=uint8)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = Path(tmp) / "image_tokenizer.onnx"
            exporter = _export(
                graph,
                [images(2)],
                path,
                input_names=["images"],
                output_names=["codes"],
                dynamic_axes={"images": {0: "batch"}, "codes": {0: "batch"}},
                opset=opset,
                dynamo=True,
            )
            files = _finish_file(path, external_data)
            x = images(3)
            got = _session(path).run(None, {"images": x.numpy()})[0]
            with torch.no_grad():
                ref = tok.encode(x.float() / 255.0 if uint8 else x).cpu().numpy()
            same = float((got == ref).mean())
            if not fp16 and same < 1.0:
                raise ExportError(
                    f"tokenizer: onnxruntime codes differ from torch's at {int((got != ref).sum())} "
                    f"of {ref.size} positions"
                )
            _move(Path(tmp), folder, files)
    finally:
        if was_fast:
            tok.to_fast()
    info = {
        "file": "image_tokenizer.onnx",
        "image_size": s,
        "image_dtype": image_dtype,
        "num_codes": tok.num_codes,
        "codebook_size": tok.codebook_size,
        "code_chunk": CODE_CHUNK,
        "resize": "bicubic",
        "inputs": {"images": ["batch", 3, s, s]},
        "outputs": {"codes": ["batch", tok.num_codes]},
    }
    return _report("tokenizer", folder, files, t0, {"codes_equal": same, "exporter": exporter}), info


def export_detokenizer(
    tok,
    folder: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    seed: int = 0,
) -> tuple[PartReport, dict]:
    """SeedTokenizer's quantizer + de-tokenizer -> image_detokenizer.onnx: codes (B, 32) -> embedding."""
    t0 = time.perf_counter()
    _eval_dtype(tok, fp16)
    g = torch.Generator().manual_seed(seed + 1)
    n, k = tok.num_codes, tok.codebook_size
    graph = DetokenizerGraph(tok)
    with torch.no_grad():
        out_shape = list(graph(torch.zeros(1, n, dtype=torch.long)).shape[1:])
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "image_detokenizer.onnx"
        _export(
            graph,
            [torch.randint(0, k, (2, n), generator=g)],
            path,
            input_names=["codes"],
            output_names=["embedding"],
            dynamic_axes={"codes": {0: "batch"}, "embedding": {0: "batch"}},
            opset=opset,
        )
        files = _finish_file(path, external_data)
        codes = torch.randint(0, k, (3, n), generator=g)
        got = _session(path).run(None, {"codes": codes.numpy()})[0]
        with torch.no_grad():
            ref = tok.decode(codes).float().numpy()
        rel = _rel(got, ref)
        _check("detokenizer", rel, fp16)
        _move(Path(tmp), folder, files)
    info = {
        "file": "image_detokenizer.onnx",
        "num_codes": n,
        "codebook_size": k,
        "inputs": {"codes": ["batch", n]},
        "outputs": {"embedding": ["batch", *out_shape]},
    }
    return _report("detokenizer", folder, files, t0, {"max_rel_err": rel}), info


def _lm_inputs(
    batch: int, past: int, new: int, vocab: int, layers: int, heads: int, head_dim: int, dtype, g, pad_rows: int = 1
):
    ids = torch.randint(0, vocab, (batch, new), generator=g)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    for r in range(min(pad_rows, batch)):
        mask[r, : min(2, past + new - 1)] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [torch.randn(batch, heads, past, head_dim, generator=g).to(dtype) for _ in range(2 * layers)]
    return [ids, mask, pos, *kv]


def export_llm(
    llm,
    folder: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    seed: int = 0,
) -> tuple[PartReport, dict]:
    """SeedLLM -> llm.onnx (LoRA merged into the weights, in place) with KV-cache inputs and
    outputs; one graph serves prefill (past length 0) and decode (one new token)."""
    t0 = time.perf_counter()
    if llm.has_lora:
        llm.merge_lora()
    model = _eval_dtype(llm.model, fp16)
    layers, heads, head_dim = kv_shape(model.config)
    vocab = model.get_input_embeddings().weight.shape[0]
    dtype = torch.float16 if fp16 else torch.float32
    # optimum's names (past_key_values.i.key in, present.i.key out, full logits), so that
    # ORTModelForCausalLM.from_pretrained(folder) runs model.onnx with config.json beside it
    names_in = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dyn = {
        "input_ids": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "new"},
        "logits": {0: "batch", 1: "new"},
    }
    dyn.update({n: {0: "batch", 2: "past"} for n in names_in[3:]})
    dyn.update({n: {0: "batch", 2: "total"} for n in names_out[1:]})
    g = torch.Generator().manual_seed(seed + 2)
    graph = LMGraph(model).eval()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / LLM_FILE
        _export(
            graph,
            _lm_inputs(2, 3, 4, vocab, layers, heads, head_dim, dtype, g),
            path,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dyn,
            opset=opset,
        )
        files = _finish_file(path, external_data)
        sess = _session(path)
        worst = 0.0
        for b, p, t in ((1, 0, 7), (3, 5, 1), (2, 9, 3)):  # prefill, decode, a chunk after a cache
            x = _lm_inputs(b, p, t, vocab, layers, heads, head_dim, dtype, g)
            got = sess.run(None, dict(zip(names_in, (v.numpy() for v in x))))
            with torch.no_grad():
                ref = [r.float().numpy() for r in graph(*x)]
            worst = max(worst, *(_rel(a.astype(np.float32), r) for a, r in zip(got, ref)))
        _check("llm", worst, fp16)
        _move(Path(tmp), folder, files)
    tt = llm.text_tokenizer
    if not getattr(tt, "is_fast", False):
        raise ExportError(
            "the LLM's text tokenizer is not a fast (tokenizers-backed) tokenizer: the runtime needs its tokenizer.json"
        )
    # beside model.onnx, what transformers / optimum read: the LM's config, its generation config
    # and its text tokenizer (tokenizer.json and friends)
    side = _write_hf_files(model, tt, folder)
    info = {
        "file": LLM_FILE,
        "num_layers": layers,
        "kv_heads": heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "kv_dtype": "float16" if fp16 else "float32",
        "inputs": names_in,
        "outputs": names_out,
        "text_tokenizer": "tokenizer.json",
        "bos_id": tt.bos_token_id,
        "eos_id": tt.eos_token_id,
        "pad_id": tt.pad_token_id,
        "image_vocab": asdict(llm.vocab),  # seed_fast.prompt.ImageVocab
        "template": asdict(llm.template),  # seed_fast.prompt.PromptTemplate
        "max_positions": getattr(model.config, "max_position_embeddings", None),
    }
    return _report("llm", folder, files + side, t0, {"max_rel_err": worst}), info


def _write_hf_files(model, text_tokenizer, folder: Path) -> list[str]:
    """config.json, generation_config.json and the tokenizer files of the exported LM (the names
    transformers and optimum look for), written through temporary names; returns the file names."""
    from transformers import GenerationConfig

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cfg = model.config.to_dict()
        cfg["use_cache"] = True
        Path(tmp, "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        gen = GenerationConfig(
            bos_token_id=text_tokenizer.bos_token_id,
            eos_token_id=text_tokenizer.eos_token_id,
            pad_token_id=text_tokenizer.pad_token_id,
        )
        gen.save_pretrained(tmp)
        text_tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir())
        _move(Path(tmp), folder, names)
    return names


def export_decoder(
    pipe,
    folder: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    seed: int = 0,
) -> tuple[PartReport, dict]:
    """SeedImageDecoderPipeline -> decoder_unet.onnx (the denoiser) + the scheduler's constants
    (the runtime runs the DDIM loop in numpy); a latent decoder also -> decoder_vae.onnx (the
    autoencoder's decoder, latents / scaling_factor -> pixels)."""
    from diffusers import DDIMScheduler, StableUnCLIPImg2ImgPipeline

    if isinstance(pipe, StableUnCLIPImg2ImgPipeline):
        return export_unclip_decoder(pipe, folder, fp16=fp16, opset=opset, external_data=external_data, seed=seed)
    if not hasattr(pipe, "_denoise") or not isinstance(pipe.scheduler, DDIMScheduler):
        raise ExportError(
            f"the decoder export takes a SeedImageDecoderPipeline or a Stable unCLIP pipeline with a DDIM "
            f"scheduler, got {type(pipe).__name__}"
        )
    t0 = time.perf_counter()
    _eval_dtype(pipe.unet, fp16)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        _eval_dtype(vae, fp16)
    c, s, d = pipe.sample_channels, pipe.sample_size, pipe.image_embedding_dim
    g = torch.Generator().manual_seed(seed + 3)
    t_max = pipe.scheduler.config.num_train_timesteps

    def inputs(b):
        return [
            torch.randn(b, c, s, s, generator=g),
            torch.randint(0, t_max, (b,), generator=g),
            torch.randn(b, d, generator=g),
        ]

    graph = UNetGraph(pipe).eval()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "decoder_unet.onnx"
        exporter = _export(
            graph,
            inputs(2),
            path,
            input_names=["sample", "timestep", "embedding"],
            output_names=["prediction"],
            dynamic_axes={n: {0: "batch"} for n in ("sample", "timestep", "embedding", "prediction")},
            opset=opset,
            dynamo=True,
        )
        files = _finish_file(path, external_data)
        x = inputs(3)
        got = _session(path).run(None, {"sample": x[0].numpy(), "timestep": x[1].numpy(), "embedding": x[2].numpy()})[0]
        with torch.no_grad():
            ref = graph(*x).numpy()
        rel = _rel(got, ref)
        _check("decoder", rel, fp16)
        _move(Path(tmp), folder, files)
    parity = {"max_rel_err": rel, "exporter": exporter}
    if vae is not None:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = Path(tmp) / "decoder_vae.onnx"
            graph = VaeDecodeGraph(vae).eval()
            _export(
                graph,
                [torch.randn(2, c, s, s, generator=g)],
                path,
                input_names=["latents"],
                output_names=["images"],
                dynamic_axes={"latents": {0: "batch"}, "images": {0: "batch"}},
                opset=opset,
            )
            written = _finish_file(path, external_data)
            x = torch.randn(3, c, s, s, generator=g)
            got = _session(path).run(None, {"latents": x.numpy()})[0]
            with torch.no_grad():
                vrel = _rel(got, graph(x).numpy())
            _check("decoder (decoder_vae.onnx)", vrel, fp16)
            parity["decoder_vae_max_rel_err"] = vrel
            _move(Path(tmp), folder, written)
            files = files + written
    sc = pipe.scheduler
    cfg = {
        k: v
        for k, v in dict(sc.config).items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))
    }
    info = {
        "file": "decoder_unet.onnx",
        "image_size": pipe.image_size,
        "in_channels": c,
        "embed_dim": d,
        "scheduler": {
            "class": type(sc).__name__,
            **cfg,
            "alphas_cumprod": [float(a) for a in sc.alphas_cumprod],
            "final_alpha_cumprod": float(sc.final_alpha_cumprod),
        },
        "null_embedding": "zeros",
    }
    if vae is not None:
        # the loop runs on latents (in_channels x latent_size^2); decoder_vae.onnx draws image_size pixels
        info.update(vae_file="decoder_vae.onnx", latent_size=s, vae_scaling_factor=float(vae.config.scaling_factor))
    return _report("decoder", folder, files, t0, parity), info


def _scheduler_info(sc) -> dict:
    cfg = {
        k: v
        for k, v in dict(sc.config).items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))
    }
    info = {"class": type(sc).__name__, **cfg, "alphas_cumprod": [float(a) for a in sc.alphas_cumprod]}
    if hasattr(sc, "final_alpha_cumprod"):
        info["final_alpha_cumprod"] = float(sc.final_alpha_cumprod)
    return info


def export_unclip_decoder(
    pipe,
    folder: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    seed: int = 0,
) -> tuple[PartReport, dict]:
    """Stable unCLIP (SEED's decoder) -> decoder_unet.onnx + decoder_vae.onnx + the constants the
    runtime needs to run StableUnCLIPImg2ImgPipeline's loop in numpy: the empty prompt's text states
    (SEED renders with prompt ""), the image normalizer, the noise-augmentation schedule and the DDIM
    scheduler. The text encoder is not exported: with a fixed prompt its output is a constant."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ExportError(
            f"the unCLIP export runs the DDIM loop in the runtime; this pipeline's scheduler is "
            f"{type(pipe.scheduler).__name__} (load it with a DDIMScheduler)"
        )
    t0 = time.perf_counter()
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        _eval_dtype(m, fp16)
    g = torch.Generator().manual_seed(seed + 5)
    unet, vae = pipe.unet, pipe.vae
    c, h = unet.config.in_channels, unet.config.sample_size
    d2 = unet.config.projection_class_embeddings_input_dim
    d = int(pipe.image_normalizer.mean.shape[-1])
    if d2 != 2 * d:
        raise ExportError(f"the UNet's class projection takes {d2} values, expected 2 x the image embedding ({d})")
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(
            prompt=[""], device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    pos, neg = pos.float(), neg.float()
    t_max = pipe.scheduler.config.num_train_timesteps

    def unet_inputs(b):
        return [
            torch.randn(b, c, h, h, generator=g),
            torch.randint(0, t_max, (b,), generator=g),
            pos.expand(b, -1, -1) + 0.1 * torch.randn(b, *pos.shape[1:], generator=g),
            torch.randn(b, d2, generator=g),
        ]

    parity = {}
    files: list[str] = []
    names = ["sample", "timestep", "encoder_hidden_states", "class_labels"]
    graphs = (
        (
            "decoder_unet.onnx",
            UnclipUNetGraph(unet).eval(),
            unet_inputs,
            names,
            ["prediction"],
            {n: {0: "batch"} for n in names + ["prediction"]},
        ),
        (
            "decoder_vae.onnx",
            VaeDecodeGraph(vae).eval(),
            lambda b: [torch.randn(b, c, h, h, generator=g)],
            ["latents"],
            ["images"],
            {"latents": {0: "batch"}, "images": {0: "batch"}},
        ),
    )
    for fname, graph, inputs, in_names, out_names, axes in graphs:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = Path(tmp) / fname
            _export(
                graph, inputs(2), path, input_names=in_names, output_names=out_names, dynamic_axes=axes, opset=opset
            )
            written = _finish_file(path, external_data)
            x = inputs(3)
            got = _session(path).run(None, {n: v.numpy() for n, v in zip(in_names, x)})[0]
            with torch.no_grad():
                ref = graph(*x).numpy()
            rel = _rel(got, ref)
            _check(f"decoder ({fname})", rel, fp16)
            parity[f"{fname.split('.')[0]}_max_rel_err"] = rel
            _move(Path(tmp), folder, written)
            files += written
    np.savez(folder / "decoder_prompt.npz", positive=pos.numpy(), negative=neg.numpy())
    files.append("decoder_prompt.npz")
    norm = pipe.image_normalizer
    info = {
        "kind": "unclip",
        "file": "decoder_unet.onnx",
        "vae_file": "decoder_vae.onnx",
        "prompt_file": "decoder_prompt.npz",
        "embed_dim": d,
        "in_channels": c,
        "latent_size": h,
        "image_size": h * int(pipe.vae_scale_factor),
        "text_len": int(pos.shape[1]),
        "text_dim": int(pos.shape[2]),
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "normalizer_mean": norm.mean.detach().float().flatten().tolist(),
        "normalizer_std": norm.std.detach().float().flatten().tolist(),
        "noising_alphas_cumprod": [float(a) for a in pipe.image_noising_scheduler.alphas_cumprod],
        "scheduler": _scheduler_info(pipe.scheduler),
        "null_embedding": "zeros (the whole class label, as diffusers' unconditional half)",
    }
    return _report("decoder", folder, files, t0, parity), info


def _move(src: Path, dst: Path, files: list[str]) -> None:
    for name in files:
        target = dst / name
        if target.exists():
            target.unlink()
        shutil.move(str(src / name), str(target))


def _report(part: str, folder: Path, files: list[str], t0: float, parity: dict) -> PartReport:
    mb = sum((folder / f).stat().st_size for f in files if (folder / f).exists()) / 2**20
    return PartReport(part, files, round(time.perf_counter() - t0, 2), round(mb, 3), parity)


# ----------------------------------------------------------------------------------------- entry
def export_onnx(
    parts=("all",),
    out: str | os.PathLike = "onnx",
    *,
    checkpoint: str | os.PathLike | None = None,
    objects: dict[str, Any] | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    image_dtype: str = "uint8",
    external_data: bool | None = None,
    progress: bool = True,
) -> dict:
    """Export parts ("tokenizer", "detokenizer", "llm", "decoder" or "all") of a checkpoint folder or
    of torch objects given as objects={"tokenizer": ..., "llm": ..., "decoder": ...} into `out`, and
    merge them into its manifest (seed_fast_onnx.json). Returns the manifest.
    Raises ExportError when a part cannot be exported or fails its checks."""
    parts = tuple(parts)
    if "all" in parts:
        parts = PARTS
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ExportError(f"unknown part(s) {bad}: choose from {list(PARTS)} or 'all'")
    if not 7 <= opset <= 23:
        raise ExportError(f"opset must lie in [7, 23] (torch's exporter), got {opset}")
    if opset < 14:
        raise ExportError(
            f"opset {opset} is too old for these graphs (scaled-dot-product attention, trilu): use 14 or newer"
        )
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime ({e})") from None
    objs = dict(objects or {})
    # the torch object each part is traced from (the detokenizer is part of the SeedTokenizer)
    source = {"tokenizer": "tokenizer", "detokenizer": "tokenizer", "llm": "llm", "decoder": "decoder"}
    to_load = tuple(p for p in parts if objs.get(source[p]) is None)
    if to_load:
        objs = {**load_checkpoint(checkpoint, to_load), **{k: v for k, v in objs.items() if v is not None}}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    man_path = folder / MANIFEST
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else {}
    if manifest.get("format", FORMAT) != FORMAT:
        raise ExportError(f"{man_path} has format {manifest.get('format')}; this exporter writes format {FORMAT}")
    manifest.update(format=FORMAT, producer="seed_fast", torch=torch.__version__, opset=opset, fp16=fp16)
    manifest.setdefault("parts", {})
    manifest.setdefault("reports", {})
    kw = {"fp16": fp16, "opset": opset, "external_data": external_data}
    steps = {
        "tokenizer": lambda: export_tokenizer(objs["tokenizer"], folder, image_dtype=image_dtype, **kw),
        "detokenizer": lambda: export_detokenizer(objs["tokenizer"], folder, **kw),
        "llm": lambda: export_llm(objs["llm"], folder, **kw),
        "decoder": lambda: export_decoder(objs["decoder"], folder, **kw),
    }
    it = parts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(parts, desc="export onnx", unit="part")
    for part in it:
        if progress:
            it.set_postfix_str(part)
        report, info = steps[part]()
        manifest["parts"][part] = info
        manifest["reports"][part] = asdict(report)
        tmp = man_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, man_path)
    return manifest
