"""TensorRT engines from the exported ONNX files (through the `tensorrt` Python API).

Why standard ops and no plugins: the exported graphs hold only standard ONNX ops (the nearest-code
search as chunked fp32 distances + ArgMin, attention as MatMul / Softmax, LoRA merged into the
weights). TensorRT fuses those itself (its Myelin backend turns the attention pattern into fused
multi-head-attention kernels, and MatMul + bias + activation into one GEMM epilogue), so the graphs
build with stock TensorRT and run under onnxruntime's TensorRT provider without a plugin library.
Our Triton / CUDA kernels would need a TensorRT plugin each (IPluginV3, built per architecture and
shipped beside the engine); that buys nothing for the Q-Former attention (32 queries: TensorRT's fused
MHA covers it) and little for the codebook search (well under 1% of the tokenizer), so it is not done.

Each engine gets one optimization profile per dynamic input: batch in [1, max_batch] (opt at
opt_batch) and, for the LLM, new tokens in [1, max_seq] and past length in [0, max_seq].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .runtime import MANIFEST

INSTALL_HINT = (
    "pip install tensorrt   (NVIDIA's wheels, Linux x86_64 / aarch64 with an NVIDIA driver; "
    "or the TensorRT tarball from developer.nvidia.com/tensorrt with its python/ wheel)"
)


class TensorRTError(RuntimeError):
    pass


def shape_profiles(
    part: str, info: dict, *, max_batch: int = 8, opt_batch: int = 1, max_seq: int = 512
) -> dict[str, tuple]:
    """The (min, opt, max) shape of every input of one exported part, from its manifest entry."""
    if not 1 <= opt_batch <= max_batch:
        raise TensorRTError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    if max_seq < 1:
        raise TensorRTError(f"max_seq must be >= 1, got {max_seq}")
    b = (1, opt_batch, max_batch)
    if part == "tokenizer":
        s = info["image_size"]
        return {"images": tuple((n, 3, s, s) for n in b)}
    if part == "detokenizer":
        return {"codes": tuple((n, info["num_codes"]) for n in b)}
    # classifier-free guidance doubles the denoiser's batch
    b2 = (1, 2 * opt_batch, 2 * max_batch)
    if part == "decoder" and info.get("kind") == "unclip":
        c, h, d = info["in_channels"], info["latent_size"], info["embed_dim"]
        return {
            "sample": tuple((n, c, h, h) for n in b2),
            "timestep": tuple((n,) for n in b2),
            "encoder_hidden_states": tuple((n, info["text_len"], info["text_dim"]) for n in b2),
            "class_labels": tuple((n, 2 * d) for n in b2),
        }
    if part == "decoder_vae":
        c, h = info["in_channels"], info["latent_size"]
        return {"latents": tuple((n, c, h, h) for n in b)}
    if part == "decoder":
        c, s, d = info["in_channels"], info.get("latent_size", info["image_size"]), info["embed_dim"]
        return {
            "sample": tuple((n, c, s, s) for n in b2),
            "timestep": tuple((n,) for n in b2),
            "embedding": tuple((n, d) for n in b2),
        }
    if part == "llm":
        h, hd = info["kv_heads"], info["head_dim"]
        opt_new, opt_past = min(64, max_seq), min(64, max_seq)
        prof = {
            "input_ids": ((1, 1), (opt_batch, opt_new), (max_batch, max_seq)),
            "position_ids": ((1, 1), (opt_batch, opt_new), (max_batch, max_seq)),
            "attention_mask": ((1, 1), (opt_batch, opt_new + opt_past), (max_batch, 2 * max_seq)),
        }
        for name in info["inputs"][3:]:  # the cache inputs, as the manifest names them
            prof[name] = ((1, h, 0, hd), (opt_batch, h, opt_past, hd), (max_batch, h, max_seq, hd))
        return prof
    raise TensorRTError(f"unknown part {part!r}")


def build_engines(
    onnx_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    parts=None,
    fp16: bool = True,
    max_batch: int = 8,
    opt_batch: int = 1,
    max_seq: int = 512,
    workspace_gb: float = 4.0,
) -> dict[str, str]:
    """Build `<part>.plan` for each exported part (default: all in the manifest). Returns
    {part: engine path}. Raises TensorRTError with the install hint when tensorrt is missing."""
    root = Path(onnx_dir)
    man_path = root / MANIFEST
    if not man_path.is_file():
        raise TensorRTError(f"{root} has no {MANIFEST}: export the ONNX files first (seed-fast export onnx)")
    manifest = json.loads(man_path.read_text())
    have = manifest.get("parts", {})
    parts = list(have) if parts is None else list(parts)
    missing = [p for p in parts if p not in have]
    if missing:
        raise TensorRTError(f"parts {missing} are not in {man_path} (exported: {sorted(have)})")
    # one engine per ONNX file: a latent decoder (Stable unCLIP, or the embedded model's with a vae) has two:
    # the UNet, and the VAE decoder as decoder_vae
    files = {p: have[p]["file"] for p in parts}
    if "decoder" in parts and have["decoder"].get("vae_file"):
        files["decoder_vae"] = have["decoder"]["vae_file"]
    profiles = {
        p: shape_profiles(
            p, have.get(p, have.get("decoder")), max_batch=max_batch, opt_batch=opt_batch, max_seq=max_seq
        )
        for p in files
    }
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTError(
            f"TensorRT is not installed (the ONNX files in {root} are ready). Install it with:\n  {INSTALL_HINT}"
        ) from None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    engines = {}
    for part in files:
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = root / files[part]
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
        if fp16 and part != "tokenizer":  # the code search keeps fp32 distances; TensorRT picks per layer otherwise
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in profiles[part]:
                raise TensorRTError(f"{onnx_path}: input {name!r} has no shape profile")
            profile.set_shape(name, *profiles[part][name])
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise TensorRTError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
        path = out_dir / f"{part}.plan"
        tmp = path.with_suffix(".plan.tmp")
        tmp.write_bytes(bytes(blob))
        os.replace(tmp, path)
        engines[part] = str(path)
    (out_dir / "engines.json").write_text(
        json.dumps(
            {
                "engines": engines,
                "profiles": {p: {k: list(map(list, v)) for k, v in pr.items()} for p, pr in profiles.items()},
                "fp16": fp16,
                "tensorrt": trt.__version__,
            },
            indent=1,
        )
    )
    return engines
