"""The SEED tokenizer: image -> 32 causal codes -> generation embedding.

images -> preprocess -> EVA ViT -> ln_vision        (B, 257, 1408)
       -> causal Q-Former                            (B, 32, 768)   `encode_embeddings`
       -> encode_task_layer -> nearest code          (B, 32)        `encode`
codes  -> codebook -> decode_task_layer              (B, 32, 768)
       -> de-tokenizer head                          (B, 1024)      `decode`
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import (
    CheckpointError,
    LoadReport,
    hf_to_ours,
    load_into,
    load_state_dict_file,
    official_to_ours,
    ours_to_official,
)
from ..config import TokenizerConfig, get_config
from ..cuda_graph import GraphedForward
from ..hub import placement, push_folder, resolve_folder
from ..preprocess import InputError, check_codes, images_to_tensor, normalize
from .detokenizer import Reconstructor, build_detokenizer
from .qformer import QFormer
from .quantizer import Quantizer
from .vit import EvaViT

CONFIG_NAME = "config.json"
MODEL_TYPE = "seed_tokenizer"  # config.json's model_type (transformers' AutoConfig: seed_fast.models.auto)
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
# Largest batch that cuda_graph="auto" replays as a CUDA graph: where kernel launches, not the math,
# bound the full-size model (measured at batch 1: see SeedTokenizer.to_fast).
GRAPH_AUTO_MAX_BATCH = 32


class SeedTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig | str | dict = "seed-tokenizer-2"):
        super().__init__()
        cfg = get_config(config)
        self.config = cfg
        v, q = cfg.vision, cfg.qformer
        self.vision = EvaViT(v)
        self.ln_vision = nn.LayerNorm(v.width)  # BLIP-2's LayerNorm, eps 1e-5
        self.qformer = QFormer(
            num_queries=q.num_queries,
            hidden=q.hidden,
            layers=q.layers,
            heads=q.heads,
            ffn=q.ffn,
            encoder_width=v.width,
            cross_attention_freq=q.cross_attention_freq,
            eps=q.ln_eps,
            causal=q.is_causal,
        )
        self.quantizer = Quantizer(cfg.quantizer, q.hidden)
        self._graphs: dict | None = None  # CUDA graphs of the fast path (to_fast(cuda_graph=True))
        self.detokenizer = build_detokenizer(cfg.detokenizer, q)
        self.reconstructor = Reconstructor(cfg.detokenizer, q) if cfg.detokenizer.reconstruction_blocks else None
        self.to_fast()  # the fast path by default; to_reference() switches to the specification

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls, name_or_config: str | TokenizerConfig | dict, seed: int | None = None, *, init: str = "bert"
    ) -> "SeedTokenizer":
        """A randomly initialized tokenizer; `seed` makes the weights reproducible.

        init="bert": the training init (truncated normal 0.02, released codebook init). An untrained
        model so initialized barely sees its input (the query tokens dominate).
        init="unit": variance-preserving weights (std 1/sqrt(fan_in)) and a unit-scale codebook, so that
        an untrained model's codes depend on the image: for tests, demos and benchmarks.
        init="uniform": "unit"'s scales drawn from uniform distributions, with no default init before
        them: the full-size model builds about 8x faster (9 s against 71 s for the truncated normals
        of 1.1 B weights on 2 CPU cores), for benchmarks whose speed does not depend on the weights.
        """
        if init not in ("bert", "unit", "uniform"):
            raise ValueError(f"init must be 'bert', 'unit' or 'uniform', got {init!r}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if init == "uniform":
                model = cls._empty(name_or_config)
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))  # what init_weights does not reach shows up below
                model.init_weights(init)
                left = [n for n, p in model.named_parameters() if p.is_floating_point() and p.isnan().any()]
                if left:
                    raise RuntimeError(f"init='uniform' left parameters uninitialized: {left[:8]}")
            else:
                model = cls(name_or_config)
                model.init_weights(init)
        return model.eval()

    def init_weights(self, init: str = "bert") -> None:
        """Initialize every parameter (see `from_config` for the three schemes)."""
        uniform = init == "uniform"

        def draw(t, std):  # uniform on [-sqrt(3) std, sqrt(3) std] has the given std
            if uniform:
                nn.init.uniform_(t, -(3**0.5) * std, (3**0.5) * std)
            else:
                nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                std = 0.02 if init == "bert" else m.weight[0].numel() ** -0.5
                draw(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("cls_token", "pos_embed", "query_tokens", "pos_embed_image")):
                if uniform:
                    draw(p, 1.0)
                else:  # the full truncated normal (bounds -2 and 2), as it has always been drawn
                    nn.init.trunc_normal_(p, std=0.02 if init == "bert" else 1.0)
            elif name.endswith(("q_bias", "v_bias")):
                nn.init.zeros_(p)
        if init == "bert":
            self.quantizer.reset_codebook()
        elif uniform:
            draw(self.quantizer.codebook.weight, 0.5)
        else:
            nn.init.normal_(self.quantizer.codebook.weight, std=0.5)

    @classmethod
    def _empty(cls, config) -> "SeedTokenizer":
        """Allocate without initializing (weights are about to be loaded)."""
        with torch.device("meta"):
            model = cls(config)
        return model.to_empty(device="cpu")

    @classmethod
    def _finish_load(cls, model, mapped, *, strict, report, allow_missing=()) -> "SeedTokenizer":
        own = model.state_dict()
        if any(k not in mapped for k in own):  # something will keep its initial value: give it one
            model.init_weights()
        load_into(model, mapped, strict=strict, report=report, allow_missing=allow_missing)
        if not report.ok():
            warnings.warn("SeedTokenizer loaded with problems: " + report.summary(), stacklevel=3)
        model.load_report = report
        return model.eval()

    @classmethod
    def from_official(
        cls,
        quantizer_path: str | os.PathLike,
        vit_path: str | os.PathLike | None = None,
        config: str | TokenizerConfig | dict = "seed-tokenizer-2",
        *,
        strict: bool = True,
    ) -> "SeedTokenizer":
        """Load the released `seed_quantizer.pt` and BLIP-2's `eva_vit_g.pth` with their own key names.

        Both load with `weights_only=True` (or as safetensors). Keys the inference model does not use
        (text branch, `position_ids`, EVA's 40th block) are listed in `tok.load_report.ignored`.
        strict=True raises on missing, unexpected or mis-shaped keys; strict=False warns and keeps the
        initial values of what is missing. `vit_path=None` only works if the quantizer file carries
        the ViT under `visual_encoder.`.
        """
        cfg = get_config(config)
        quant_sd = load_state_dict_file(quantizer_path)
        vit_sd = load_state_dict_file(vit_path) if vit_path is not None else None
        mapped, unknown, ignored = official_to_ours(quant_sd, vit_sd, cfg.vision.depth)
        report = LoadReport(unexpected=unknown, ignored=ignored)
        allow = ()
        if not cfg.detokenizer.reconstruction_blocks:
            report.ignored += [k for k in mapped if k.startswith("reconstructor.")]
            mapped = {k: v for k, v in mapped.items() if not k.startswith("reconstructor.")}
        elif not any(k.startswith("reconstructor.") for k in mapped):
            allow = ("reconstructor.",)  # training-only head; a file without it is still complete for inference
        return cls._finish_load(cls._empty(cfg), mapped, strict=strict, report=report, allow_missing=allow)

    def official_state_dicts(self) -> tuple[dict, dict]:
        """(quantizer dict, ViT dict) with the released key names (the inverse of `from_official`).

        The tensors share storage with the model (no copy of a 1 B-parameter model): clone before editing.
        """
        return ours_to_official(self.state_dict())

    def load_blip2_qformer(self, state_dict_or_path, *, strict: bool = True) -> LoadReport:
        """Load ViT / ln_vision / Q-Former weights from a BLIP-2 state dict (stage-I init).

        Accepts transformers' layouts (`Blip2QFormerModel.state_dict()`, or `Blip2Model` /
        `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval` with `qformer.`, `query_tokens`,
        `vision_model.`) and LAVIS' (`Qformer.bert.`, `query_tokens`, `ln_vision`, `visual_encoder.`).
        Only the parts present are loaded; strict=True raises when a Q-Former key is missing or a key
        has no place in the model.
        """
        sd = state_dict_or_path
        if not isinstance(sd, dict):
            sd = load_state_dict_file(sd)
        if any(k.startswith(("Qformer.", "visual_encoder.")) for k in sd):
            mapped, unknown, ignored = official_to_ours(sd, None, self.config.vision.depth)
        else:
            mapped, unknown, ignored = hf_to_ours(sd)
        if not any(k.startswith("qformer.") for k in mapped):
            raise CheckpointError("no Q-Former weights found in this state dict (keys like 'qformer.encoder.layer.*')")
        # Parts of the model the file does not touch at all (e.g. the quantizer) keep their weights.
        given = {k.split(".")[0] for k in mapped}
        untouched = tuple(p + "." for p in {k.split(".")[0] for k in self.state_dict()} - given)
        report = LoadReport(unexpected=unknown, ignored=ignored)
        load_into(self, mapped, strict=strict, report=report, allow_missing=untouched)
        return report

    # ------------------------------------------------------------------ save / load our format
    def save_pretrained(
        self, directory: str | os.PathLike, *, push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs
    ) -> Path:
        """Write config.json + model.safetensors (atomically: temp files, then rename); with
        push_to_hub=True also upload them to `repo_id` (default: the folder's name), as `push_to_hub`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "class": "SeedTokenizer",
            "config": self.config.to_dict(),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp_w, tmp_c = directory / (WEIGHTS_NAME + ".tmp"), directory / (CONFIG_NAME + ".tmp")
        save_file(tensors, str(tmp_w), metadata={"format": "pt", "seed_fast_format_version": str(FORMAT_VERSION)})
        tmp_c.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_w, directory / WEIGHTS_NAME)
        os.replace(tmp_c, directory / CONFIG_NAME)
        if push_to_hub:
            self.push_to_hub(repo_id or directory.name, **push_kwargs)
        return directory

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token=None, revision=None, commit_message=None
    ) -> str:
        """Upload config.json + model.safetensors to the Hugging Face Hub repository `repo_id`
        (created when missing); returns the commit's URL."""
        kw = {"private": private, "token": token, "revision": revision, "commit_message": commit_message}
        return push_folder(self.save_pretrained, repo_id, **kw)

    # transformers' AutoModel passes these along; they change nothing for a local or cached folder
    _IGNORED_LOAD_KWARGS = frozenset(
        {
            "config",
            "force_download",
            "proxies",
            "trust_remote_code",
            "code_revision",
            "adapter_kwargs",
            "_from_auto",
            "_commit_hash",
        }
    )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        strict: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        torch_dtype=None,
        dtype=None,
        device_map=None,
        device=None,
        subfolder: str = "",
        **kwargs,
    ) -> "SeedTokenizer":
        """A save_pretrained folder, or a Hugging Face Hub repository id ("org/name": fetched with
        huggingface_hub, or read from its cache; with HF_HUB_OFFLINE=1 the cache only). revision,
        cache_dir, local_files_only, token: as in transformers. torch_dtype / dtype: the dtype to
        cast to ("auto" or None: as saved); device_map / device: the device ("auto": the GPU when
        there is one; the model lives on one device)."""
        unknown = set(kwargs) - cls._IGNORED_LOAD_KWARGS
        if unknown:
            raise TypeError(f"SeedTokenizer.from_pretrained got unexpected arguments {sorted(unknown)}")
        dt, dev = placement(torch_dtype, dtype, device_map, device, what="SeedTokenizer.from_pretrained")
        hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        directory = resolve_folder(name_or_path, "tokenizer", **hub) / subfolder
        tok = cls._from_folder(directory, strict=strict)
        if dt is not None or dev is not None:
            tok = tok.to(device=dev, dtype=dt)
        return tok

    @classmethod
    def _from_folder(cls, directory: Path, *, strict: bool) -> "SeedTokenizer":
        if not directory.is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {directory} (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} is missing (a save_pretrained folder has {CONFIG_NAME} + {WEIGHTS_NAME})")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or "config" not in meta:
            raise CheckpointError(f"{cfg_path} has no 'config' entry; is this a seed_fast tokenizer folder?")
        version = meta.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise CheckpointError(f"{cfg_path}: format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{cfg_path} has format_version {meta['format_version']}; this seed_fast reads <= {FORMAT_VERSION}"
            )
        try:
            cfg = TokenizerConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        sd = load_state_dict_file(w_path)
        return cls._finish_load(cls._empty(cfg), sd, strict=strict, report=LoadReport())

    # ------------------------------------------------------------------ differentiable pieces
    @property
    def dtype(self) -> torch.dtype:
        return self.ln_vision.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.ln_vision.weight.device

    @property
    def num_codes(self) -> int:
        return self.config.qformer.num_queries

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    def preprocess(self, images) -> torch.Tensor:
        """Validated images -> normalized pixels (B, 3, S, S) in the model's dtype and device."""
        x = images_to_tensor(images, self.config.vision.image_size).to(self.device)
        return normalize(x, self.config.image_mean, self.config.image_std).to(self.dtype)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.vision(pixels))  # (B, 257, 1408)

    def causal_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.qformer(self.image_features(pixels))  # (B, 32, 768)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(codes)  # (B, 32, 768)

    def generation_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        return self.detokenizer(self.embed_codes(codes))  # (B, 1024)

    # ------------------------------------------------------------------ fast path
    def to_fast(
        self, *, cuda_graph: bool | str = "auto", attn_impl: str = "auto", compile_vit: bool | str = False
    ) -> SeedTokenizer:
        """Switch to the fast path, the state after construction (returns self; `to_reference()`
        undoes it). Call it again to capture CUDA graphs or to pin the attention backend.

        - Q-Former: one matmul for all cross-attention layers' K / V of the image tokens, fused
          Q / K / V per self-attention, attention by `attn_impl` ("auto": the backend measured
          fastest on this class of device, see seed_fast/ops/dispatch.py). Fused weights are
          cached while the weights do not change (see qformer.FusedLinearCache); ~34M extra values
          for the full-size model.
        - ViT attention through SDPA.
        - cuda_graph: `encode` / `encode_embeddings` on CUDA replay a CUDA graph captured per batch
          shape, which removes the launch overhead that dominates at small batch (batch 1 of the
          full-size model in fp16 on an H200: 4.1 ms against 19.5 ms eagerly). "auto" (the default)
          captures a shape at its second call, for batches up to GRAPH_AUTO_MAX_BATCH (32); True
          captures every shape at its first call; False never. Graphs are dropped by
          `to_reference()`, `reset_graphs()` and by moving or casting the model (`.to()`,
          `.half()`, ...); a capture that fails warns once and leaves encode eager.
        - compile_vit: compile each ViT block with torch.compile (one compiled region, reused by all
          39 blocks: it fuses the bias + GELU, the residual adds and the LayerNorms around the
          GEMMs); True for torch.compile's default mode, or a mode name. Off by default: whether it
          wins is measured per GPU by benchmarks/bench_tokenizer.py; the first call compiles.
        Outputs match the reference path within the dtype's tolerance (codes identical in fp32
        barring exact near-ties).
        """
        if compile_vit not in (True, False) and not isinstance(compile_vit, str):
            raise ValueError(f"compile_vit must be True, False or a torch.compile mode, got {compile_vit!r}")
        self.qformer.set_fast(True, impl=attn_impl)
        for blk in self.vision.blocks:
            blk.attn.attn_impl = "sdpa"
            if compile_vit:
                blk.compile(mode=None if compile_vit is True else compile_vit)
            else:
                blk._compiled_call_impl = None
        self._graphs = None
        if cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
        if cuda_graph:
            auto = cuda_graph == "auto"
            opts = {
                "prepare": self.qformer.refresh_fused,
                "max_batch": GRAPH_AUTO_MAX_BATCH if auto else None,
                "capture_after": 1 if auto else 0,
            }
            self._graphs = {
                "codes": GraphedForward(self._pixels_to_codes, **opts),
                "embeddings": GraphedForward(self.causal_embeddings, **opts),
            }
        return self

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.reset_graphs()  # .to() / .half() / .cuda() re-allocate the parameters the graphs read
        return out

    def to_reference(self) -> SeedTokenizer:
        """Back to the reference path (plain torch, the specification); returns self.
        `to_fast()` (the state after construction) switches back."""
        self.qformer.set_fast(False)
        for blk in self.vision.blocks:
            blk.attn.attn_impl = "ref"
            blk._compiled_call_impl = None
        self._graphs = None
        return self

    @property
    def is_fast(self) -> bool:
        return self.qformer.fast

    def reset_graphs(self) -> None:
        """Drop captured CUDA graphs (they are re-captured on next use)."""
        for g in (getattr(self, "_graphs", None) or {}).values():
            g.reset()

    def _pixels_to_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(self.causal_embeddings(pixels))

    def _run(self, what: str, pixels: torch.Tensor) -> torch.Tensor:
        graphs = getattr(self, "_graphs", None)
        if graphs is not None and pixels.is_cuda:
            return graphs[what](pixels)
        return self._pixels_to_codes(pixels) if what == "codes" else self.causal_embeddings(pixels)

    # ------------------------------------------------------------------ public inference API
    @torch.no_grad()
    def encode_embeddings(self, images, *, batch_size: int | None = None, progress: bool | None = None) -> torch.Tensor:
        """Causal embeddings before quantization, (B, 32, hidden) in the model's dtype."""
        pixels = self.preprocess(images)
        return self._batched(lambda x: self._run("embeddings", x), pixels, batch_size, progress, "encode")

    @torch.no_grad()
    def encode(self, images, *, batch_size: int | None = None, progress: bool | None = None) -> torch.LongTensor:
        """Images -> codes (B, 32) int64 in [0, codebook_size)."""
        pixels = self.preprocess(images)
        return self._batched(lambda x: self._run("codes", x), pixels, batch_size, progress, "encode")

    @torch.no_grad()
    def decode(self, codes, *, batch_size: int | None = None, progress: bool | None = None) -> torch.Tensor:
        """Codes (B, 32) -> generation embedding (B, out_dim), or (B, Q, out_dim) for a multi-query head."""
        codes = check_codes(codes, self.num_codes, self.codebook_size).to(self.device)
        return self._batched(self.generation_embedding, codes, batch_size, progress, "decode")

    def _batched(self, fn, x: torch.Tensor, batch_size, progress, what) -> torch.Tensor:
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size is None or batch_size >= x.shape[0]:
            return fn(x)
        chunks = range(math.ceil(x.shape[0] / batch_size))
        if progress is None:
            progress = len(chunks) > 1
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=what, unit="batch")
        return torch.cat([fn(x[i * batch_size : (i + 1) * batch_size]) for i in chunks])

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"config={self.config.name!r}, params={n / 1e6:.1f}M"
