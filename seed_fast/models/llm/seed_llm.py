"""SeedLLM: a transformers causal LM that reads and writes SEED image codes.

An image in a token sequence is `<img>` + 32 image tokens + `</img>`. Image token `<img_XXXXX>` has
id `base + code`, where `base` is the text vocabulary size, then `<img>` = base + 8192 and
`</img>` = base + 8193: for LLaMA's 32000 text tokens that is SEED-LLaMA's released layout
(vocabulary 40194), so its checkpoints load as they are.

Image -> text: the image's codes go into the prompt, the LM writes text. Text -> image: the prompt
ends with `<img>`, decoding is restricted to image tokens for exactly 32 steps (every answer is a
valid image), the codes go through `SeedTokenizer.decode` to the generation embedding and a
diffusers unCLIP pipeline draws it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...lora import apply_fused_lora, remove_fused_lora
from ...prompt import (
    BOI_TOKEN,
    IMAGE_PLACEHOLDER,
    SEED_LLAMA_CAPTION,
    ImageVocab,
    PromptError,
    PromptTemplate,
    encode_prompt,
    get_template,
    image_token,
    unconditional_ids,
)
from ...synthetic import COLORS, COUNTS, QUESTION_WORDS, SHAPES
from .. import auto as _auto  # noqa: F401  (AutoConfig / AutoModel know SeedTokenizer folders)
from ..checkpoint import CheckpointError
from ..hub import placement, push_folder, resolve_folder
from ..preprocess import InputError, check_codes
from ..seed.tokenizer import SeedTokenizer
from .decoding import check_cfg_scale, check_sampling, left_pad
from .generation import DecoderPool, decode_image_codes, decode_text, eval_mode
from .text_tokenizer import build_word_tokenizer

_MAX_IDLE_DECODERS = 4  # static caches kept between calls (each holds a full-length KV cache)


# LoRA as released (SEED_SPEC section 4): r 16, alpha 32, dropout 0.05 on the attention and MLP
# projections; OPT names them out_proj / fc1 / fc2.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


def seed_lora_config(model: nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=None):
    """A peft LoraConfig with SEED-LLaMA's settings for the projections `model` actually has."""
    from peft import LoraConfig

    if target_modules is None:
        present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        target_modules = [t for t in LORA_TARGETS if t in present]
        if not target_modules:
            raise ValueError(
                f"seed_lora_config: none of {LORA_TARGETS} is a Linear in {type(model).__name__}; pass target_modules"
            )
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )


# transformers' quant_method -> (module its quantizer imports, the pip package that provides it)
_QUANT_BACKENDS = {
    "torchao": ("torchao", "torchao"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "quanto": ("optimum.quanto", "optimum-quanto"),
    "hqq": ("hqq", "hqq"),
}


def _config_value(config, key: str, default=None):
    """A field of a transformers quantization config, given as the config object or its dict."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _quant_method(quantization_config) -> str:
    method = _config_value(quantization_config, "quant_method")
    if method is None:
        raise TypeError(
            "quantization_config must be a transformers quantization config (TorchAoConfig, BitsAndBytesConfig, ...), "
            f"got {type(quantization_config).__name__}"
        )
    return str(getattr(method, "value", method))


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package (optimum for optimum.quanto) is missing
        return False


def _check_quantization_config(quantization_config) -> str:
    """Refuse, before any weight is read, a config whose backend package is not installed or that
    would quantize the embeddings (the image-token rows must stay exact). Returns the quant_method."""
    method = _quant_method(quantization_config)
    module, package = _QUANT_BACKENDS.get(method, (None, None))
    if module is not None and not _has_module(module):
        raise ImportError(
            f"quantization_config uses {method}, which needs the {package!r} package: "
            f"pip install {package} (torchao is also in seed_fast's 'quant' extra)"
        )
    if _config_value(quantization_config, "include_input_output_embeddings", False):
        raise ValueError(
            "include_input_output_embeddings=True would quantize the embeddings and lm_head: SeedLLM keeps them "
            "unquantized so the image-token rows stay exact; leave it False"
        )
    return method


def _check_exact_vocab(model: nn.Module) -> None:
    """The input embedding and the LM head must hold plain floating-point weights: a quantized
    embedding cannot take new image-token rows exactly, and a quantized head blurs the 8192-way
    choice among image codes."""
    heads = {"input embedding": model.get_input_embeddings()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        heads["lm_head"] = out
    for what, module in heads.items():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or type(w.data) is not torch.Tensor or not w.dtype.is_floating_point:
            kind = type(w.data).__name__ if isinstance(w, torch.Tensor) else "no weight tensor"
            raise CheckpointError(
                f"the LM's {what} ({type(module).__name__}, {kind}"
                f"{', ' + str(w.dtype) if isinstance(w, torch.Tensor) else ''}) is quantized: SeedLLM needs the "
                "embeddings and lm_head unquantized so the image-token rows stay exact; keep them out of the "
                "quantization config (transformers skips lm_head by default: if you pass modules_to_not_convert / "
                "llm_int8_skip_modules, include 'lm_head')"
            )


def _is_extra_trainable(name: str) -> bool:
    # SEED-LLaMA trains the embeddings, lm_head and norms fully alongside the LoRA weights
    return "embed_tokens" in name or "lm_head" in name or "norm" in name


class SeedLLM(nn.Module):
    """A causal LM with SEED's image vocabulary, plus the image tokenizer and (optionally) a diffusion
    pipeline.

    model:           any transformers causal LM (or a peft model around one)
    text_tokenizer:  its transformers tokenizer
    tokenizer:       a `SeedTokenizer` (images <-> codes); only the image paths need it
    template:        a name in TEMPLATES or a PromptTemplate
    add_image_tokens: add `<img_XXXXX>`, `<img>`, `</img>` to the text tokenizer and resize the
                     embeddings when they are missing; False raises instead
    diffusion:       a diffusers StableUnCLIPImg2ImgPipeline (see seed_fast.models.decoders.unclip) or None

    Generation (caption, answer, generate_text, generate_image_codes, generate_images) may be called
    from several threads at once: each call decodes through a KV cache of its own. Changing the model
    (add_lora, merge_lora, compile_decode) while calls run is not supported.
    """

    def __init__(
        self,
        model: nn.Module,
        text_tokenizer,
        tokenizer=None,
        *,
        template: str | PromptTemplate | None = None,
        add_image_tokens: bool = True,
        diffusion=None,
        num_codes: int | None = None,
    ):
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"SeedLLM needs a transformers causal LM, got {type(model).__name__}")
        if num_codes is None:
            num_codes = tokenizer.codebook_size if tokenizer is not None else 8192
        if tokenizer is not None and tokenizer.codebook_size != num_codes:
            raise ValueError(f"num_codes={num_codes} but the image tokenizer has {tokenizer.codebook_size} codes")
        self.model = model
        self.text_tokenizer = text_tokenizer
        self.tokenizer = tokenizer
        self.template = get_template(template or _default_template(model))
        self.diffusion = diffusion
        self.tokens_per_image = tokenizer.num_codes if tokenizer is not None else 32
        self.vocab = self._install_image_vocab(num_codes, add_image_tokens)
        # static-cache decoders; a call takes one out for its own use (thread safety)
        self._decoders = DecoderPool(max_idle=_MAX_IDLE_DECODERS)

    # ------------------------------------------------------------------ vocabulary
    def _install_image_vocab(self, num_codes: int, add: bool) -> ImageVocab:
        tt = self.text_tokenizer
        first = tt.convert_tokens_to_ids(image_token(0))
        if first is not None and first != tt.unk_token_id:
            vocab = ImageVocab(base=first, num_codes=num_codes, tokens_per_image=self.tokens_per_image)
            names = vocab.token_names()
            ids = tt.convert_tokens_to_ids(names)
            expected = list(range(vocab.base, vocab.size))
            if ids != expected:
                bad = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
                raise CheckpointError(
                    f"the text tokenizer has image tokens, but not in SEED's layout: {names[bad]!r} has id {ids[bad]}, "
                    f"expected {expected[bad]} (= {vocab.base} + {bad})"
                )
        else:
            vocab = ImageVocab(base=len(tt), num_codes=num_codes, tokens_per_image=self.tokens_per_image)
            if not add:
                raise CheckpointError(
                    f"the text tokenizer has no image tokens ({image_token(0)!r} is unknown) "
                    "and add_image_tokens=False: "
                    "this model was not trained with SEED's image vocabulary"
                )
            added = tt.add_tokens(vocab.token_names(), special_tokens=True)
            if added != num_codes + 2 or tt.convert_tokens_to_ids(BOI_TOKEN) != vocab.boi:
                raise CheckpointError(
                    f"adding the image tokens to the text tokenizer did not give ids {vocab.base}..{vocab.eoi}"
                )
        _check_exact_vocab(self.model)
        rows = self.model.get_input_embeddings().weight.shape[0]
        if rows < vocab.size:
            if not add:
                raise CheckpointError(
                    f"the LM's embedding has {rows} rows but the image vocabulary needs {vocab.size} "
                    f"(text {vocab.base} + {num_codes} codes + <img>, </img>); "
                    "load with add_image_tokens=True to resize"
                )
            self.model.resize_token_embeddings(vocab.size)
        if tt.pad_token_id is None:
            tt.pad_token = tt.eos_token if tt.eos_token is not None else tt.unk_token
        return vocab

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def from_config(
        cls,
        preset: str = "tiny-llama",
        *,
        seed: int = 0,
        tokenizer="tiny",
        corpus: list[str] | None = None,
        template: str | None = None,
        text_vocab_size: int | None = None,
        lm_overrides: dict | None = None,
    ) -> "SeedLLM":
        """A small random-weight SeedLLM (no downloads): "tiny-llama" or "tiny-opt" LM, a word-level
        text tokenizer over `corpus` (default: synthetic captions and the templates' words), and a
        random SeedTokenizer preset (or the SeedTokenizer given). lm_overrides: config fields changed
        from the preset's (`tiny_causal_lm`)."""

        if corpus is None:
            corpus = [" ".join(COLORS), " ".join(SHAPES), " ".join(s + "s" for s in SHAPES), " ".join(COUNTS.values())]
            corpus += [
                "left of a an",
                "a photo of question short answer generate an image",
                SEED_LLAMA_CAPTION,
                "user assistant inst",
            ]
            corpus += [QUESTION_WORDS]
        text_tok = build_word_tokenizer(
            corpus, extra_words=(".", ",", "?", "!", ":", "[", "]", "/"), vocab_size=text_vocab_size
        )
        if isinstance(tokenizer, str):
            tokenizer = SeedTokenizer.from_config(tokenizer, seed=seed, init="unit")
        torch.manual_seed(seed)
        model = tiny_causal_lm(preset, vocab_size=len(text_tok) + tokenizer.codebook_size + 2, overrides=lm_overrides)
        return cls(model, text_tok, tokenizer, template=template or ("seed-opt" if "opt" in preset else "plain"))

    @classmethod
    def from_pretrained(
        cls,
        llm_path: str | os.PathLike,
        *,
        tokenizer=None,
        lora=None,
        template: str | PromptTemplate | None = None,
        diffusion=None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        add_image_tokens: bool = True,
        fused_lora: bool = False,
        quantization_config=None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        torch_dtype=None,
        device_map=None,
    ) -> "SeedLLM":
        """Load a SeedLLM folder (written by `save_pretrained`) or a transformers causal-LM folder
        (e.g. AILab-CVC/seed-llama-8b-sft), given as a local folder or a Hugging Face Hub repository
        id (fetched with huggingface_hub, or read from its cache; HF_HUB_OFFLINE=1: the cache only;
        revision, cache_dir, local_files_only, token as in transformers). torch_dtype is dtype's
        transformers name ("auto": as saved), device_map is device's ("auto": the GPU when there is
        one; one device for the whole model).

        tokenizer: a SeedTokenizer, a folder for `SeedTokenizer.from_pretrained`, or None (the
                   folder's own `tokenizer/` when there is one)
        lora:      None, True / "seed" (a new adapter with SEED's settings, for training), a peft
                   LoraConfig, or a folder with a saved peft adapter
        diffusion: a StableUnCLIPImg2ImgPipeline, a diffusers folder or Hub id, or None (the
                   folder's own `diffusion/` when there is one and diffusers is installed)
        quantization_config: a transformers quantization config passed to the LM's `from_pretrained`,
                   e.g. `TorchAoConfig(Int8WeightOnlyConfig())` (int8 weight-only, runs on the CPU) or
                   `BitsAndBytesConfig(load_in_8bit=True)` / `(load_in_4bit=True)` (bitsandbytes, GPU).
                   Only the transformer blocks' Linear layers are quantized: the embeddings and lm_head
                   stay in `dtype`, so the image-token rows (added ones included) are exact; a config
                   that would quantize them is refused. A missing backend package raises ImportError
                   naming it. With `device`, the LM is loaded onto it (`device_map`) rather than moved.
                   `lora` on a quantized LM trains peft adapters over the frozen quantized weights
                   (QLoRA) where transformers marks the quantization trainable (8-bit torchao,
                   bitsandbytes 8- and 4-bit); see `add_lora`. A tiny test model gets quantized the
                   same way: `SeedLLM.from_config(...).save_pretrained(folder)`, then this.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype, device = placement(torch_dtype, dtype, device_map, device, what="SeedLLM.from_pretrained")
        hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        root = resolve_folder(llm_path, "SeedLLM", **hub)
        meta: dict[str, Any] = {}
        lm_dir = root
        if (root / "seed_llm.json").exists():
            meta = json.loads((root / "seed_llm.json").read_text())
            lm_dir = root / "llm"
        if not (lm_dir / "config.json").exists():
            raise CheckpointError(
                f"{lm_dir} has no config.json: not a transformers model folder (nor a SeedLLM folder)"
            )
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if quantization_config is not None:
            _check_quantization_config(quantization_config)
            kwargs["quantization_config"] = quantization_config
            if device is not None:
                # quantized weights are placed while loading: bitsandbytes models refuse .to(device)
                kwargs["device_map"] = torch.device(device)
        model = AutoModelForCausalLM.from_pretrained(lm_dir, **kwargs)
        text_tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = SeedTokenizer.from_pretrained(tokenizer)
        elif tokenizer is None and (root / "tokenizer").is_dir():
            tokenizer = SeedTokenizer.from_pretrained(root / "tokenizer")
        if tokenizer is not None and dtype is not None:
            tokenizer = tokenizer.to(dtype=dtype)
        if diffusion is None and (root / "diffusion").is_dir():
            diffusion = root / "diffusion"
        if isinstance(diffusion, (str, os.PathLike)):  # a folder or a Hub id, as the LM
            diffusion = _load_diffusion(resolve_folder(diffusion, "diffusion pipeline", **hub), dtype)
        if lora is None and (root / "lora").is_dir():
            lora = root / "lora"
        llm = cls(
            model,
            text_tok,
            tokenizer,
            template=template or meta.get("template"),
            add_image_tokens=add_image_tokens,
            diffusion=diffusion,
            num_codes=meta.get("image_vocab", {}).get("num_codes"),
        )
        if meta and meta.get("image_vocab", {}).get("base", llm.vocab.base) != llm.vocab.base:
            raise CheckpointError(
                f"{root}/seed_llm.json says image tokens start at {meta['image_vocab']['base']}, "
                f"the tokenizer at {llm.vocab.base}"
            )
        if lora is not None and lora is not False:
            llm.add_lora(lora, fused=fused_lora)
        if device is not None:
            if quantization_config is None:
                llm.to(device)
            elif llm.tokenizer is not None:
                llm.tokenizer.to(device)
        return llm

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token=None, revision=None, commit_message=None
    ) -> str:
        """Upload what `save_pretrained` writes to the Hugging Face Hub repository `repo_id` (created
        when missing); `SeedLLM.from_pretrained(repo_id)` loads it back. Returns the commit's URL."""
        kw = {"private": private, "token": token, "revision": revision, "commit_message": commit_message}
        return push_folder(self.save_pretrained, repo_id, **kw)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `seed_llm.json`, `llm/` (a plain transformers folder: base weights, trained
        embeddings and norms included), `lora/` (the peft adapter, if any), `tokenizer/` (the
        SeedTokenizer) and `diffusion/` (the pipeline, if any)."""
        base = self.base_model
        if self.has_lora and self.is_quantized:
            # transformers writes a quantized model's own state dict, adapters included, under the
            # wrapped names: the folder would load with random base weights
            raise ValueError(
                "save_pretrained cannot write a quantized LM with a LoRA adapter as a SeedLLM folder: save the "
                "adapter alone with llm.model.save_pretrained(folder) and load it later over the original "
                "checkpoint (from_pretrained(..., lora=folder)); embeddings, lm_head and norms trained alongside "
                "are not in it, so train those on an unquantized LM if you need them saved"
            )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = base.state_dict()
        if self.has_lora:
            # the base weights under their plain names: drop adapters, unwrap peft's base_layer
            state = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
            self.model.save_pretrained(out / "lora")
        base.save_pretrained(out / "llm", state_dict=state)
        self.text_tokenizer.save_pretrained(out / "llm")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out / "tokenizer")
        if self.diffusion is not None:
            self.diffusion.save_pretrained(out / "diffusion")
        meta = {"format": "seed_fast.SeedLLM", "template": asdict(self.template), "image_vocab": asdict(self.vocab)}
        tmp = out / "seed_llm.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(out / "seed_llm.json")
        return out

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        try:
            from peft import PeftModel
        except ImportError:
            return False
        return isinstance(self.model, PeftModel)

    @property
    def base_model(self) -> nn.Module:
        """The transformers model (inside peft's wrapper when there is one)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def is_quantized(self) -> bool:
        """Whether the LM was loaded with a quantization config (see `from_pretrained`)."""
        return getattr(self.base_model, "hf_quantizer", None) is not None

    def add_lora(self, lora=True, *, fused: bool = False, impl: str = "auto") -> "SeedLLM":
        """Wrap the LM with peft LoRA: True / "seed" for SEED's settings, a LoraConfig, or a saved
        adapter folder. Embeddings, lm_head and norms are made trainable too (as SEED-LLaMA trained
        them). fused=True routes the LoRA layers through seed_fast's `lora_linear` (backend `impl`);
        the default keeps peft's own layers, the stock path, which no benchmark run has yet shown
        `lora_linear` beating with SEED's dropout of 0.05 (benchmarks/bench_lora_linear.py).

        On a quantized LM (`from_pretrained(..., quantization_config=...)`) this is QLoRA: peft's
        adapters train over the frozen quantized weights, with the unquantized embeddings, lm_head and
        norms trainable as above. It works where transformers marks the quantization trainable (torchao
        8-bit, tested on the CPU; bitsandbytes 8- and 4-bit) and is refused otherwise (e.g. torchao
        int4), as is fused=True (lora_linear needs plain base weights). `save_pretrained` refuses such a
        model: save the adapter with `llm.model.save_pretrained(folder)`."""
        from peft import LoraConfig, PeftModel, get_peft_model

        if self.has_lora:
            raise ValueError("this SeedLLM already has a LoRA adapter")
        quantizer = getattr(self.model, "hf_quantizer", None)
        if quantizer is not None:
            method = _quant_method(quantizer.quantization_config)
            if not quantizer.is_trainable:
                raise ValueError(
                    f"LoRA on this LM is refused: transformers cannot train over its {method} quantization "
                    f"({type(quantizer.quantization_config).__name__}); load it unquantized or with an 8-bit "
                    "config (TorchAoConfig(Int8WeightOnlyConfig()), BitsAndBytesConfig(load_in_8bit=True)) or "
                    "bitsandbytes 4-bit"
                )
            if fused:
                raise ValueError(
                    "fused=True needs plain base weights and this LM is quantized: use add_lora(fused=False) "
                    "(peft's own quantized LoRA layers)"
                )
        if not (lora is True or lora == "seed" or isinstance(lora, (LoraConfig, str, os.PathLike))):
            raise TypeError(
                f"lora must be True, 'seed', a peft LoraConfig or an adapter folder, got {type(lora).__name__}"
            )
        if (
            isinstance(lora, (str, os.PathLike))
            and lora != "seed"
            and not (Path(lora) / "adapter_config.json").exists()
        ):
            raise CheckpointError(f"{lora} is not a peft adapter folder (no adapter_config.json)")
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias: a FutureWarning on
            # every wrap that the user can do nothing about
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if lora is True or lora == "seed":
                self.model = get_peft_model(self.model, seed_lora_config(self.model))
            elif isinstance(lora, LoraConfig):
                self.model = get_peft_model(self.model, lora)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(lora), is_trainable=True, local_files_only=True)
        for name, p in self.model.named_parameters():
            if ".lora_" not in name and _is_extra_trainable(name):
                p.requires_grad_(True)
        if fused:
            apply_fused_lora(self.model, impl=impl)
        self._decoders.drop()
        return self

    def merge_lora(self) -> "SeedLLM":
        """Fold the adapter into the base weights (for export / fastest inference); returns self."""
        if self.has_lora:
            remove_fused_lora(self.model)
            self.model = self.model.merge_and_unload()
            self._decoders.drop()
        return self

    def compile_decode(self, enable: bool = True) -> "SeedLLM":
        """Compile the one-token decode step (torch.compile "reduce-overhead": CUDA graphs on GPU)."""
        self._decoders.compile = enable
        self._decoders.drop()
        return self

    # ------------------------------------------------------------------ prompts -> ids
    def image_codes(self, images) -> torch.Tensor:
        """Images -> codes (N, 32) with the image tokenizer."""
        if self.tokenizer is None:
            raise InputError("this SeedLLM has no image tokenizer: pass codes=... instead of images, or load one")
        return self.tokenizer.encode(images).cpu()

    def _text_ids(self, text: str) -> list[int]:
        return self.text_tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode_turn(self, text: str, codes=None, *, chat: bool = True, where: str = "prompt") -> list[int]:
        """One prompt with `<image>` placeholders -> ids, each placeholder replaced by an image's
        `<img>` + codes + `</img>` (`seed_fast.prompt.encode_prompt`). codes: (n_images, 32), one row per
        placeholder in order."""
        try:
            return encode_prompt(
                text,
                codes,
                template=self.template,
                vocab=self.vocab,
                text_ids=self._text_ids,
                bos_id=self.text_tokenizer.bos_token_id,
                chat=chat,
                where=where,
            )
        except PromptError as e:
            raise InputError(str(e)) from None

    def _images_per_prompt(self, images, codes, n_prompts: int, where: str) -> list[torch.Tensor | None]:
        """images / codes per prompt -> list of (n_i, 32) code tensors (None for no image)."""
        if images is not None and codes is not None:
            raise InputError("give images or codes, not both")
        groups = images if images is not None else codes
        if groups is None:
            return [None] * n_prompts
        if isinstance(groups, torch.Tensor) and codes is not None and groups.dim() == 2:
            groups = [g[None] for g in groups]  # codes (B, 32): one image per prompt
        if len(groups) != n_prompts:
            raise InputError(f"{where}: {n_prompts} prompt(s) but {len(groups)} image group(s)")
        nested = [list(g) if isinstance(g, (list, tuple)) or _is_code_block(g, codes) else [g] for g in groups]
        counts = [len(g) for g in nested]
        flat = [x for g in nested for x in g]
        if not flat:
            return [None] * n_prompts
        if codes is not None:
            all_codes = check_codes(
                torch.stack([torch.as_tensor(c) for c in flat]), self.tokens_per_image, self.vocab.num_codes
            )
        else:
            all_codes = self.image_codes(flat)
        out, i = [], 0
        for n in counts:
            out.append(all_codes[i : i + n] if n else None)
            i += n
        return out

    # ------------------------------------------------------------------ decoding
    def _generator(self, seed: int | None):
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def generate_ids(
        self,
        rows: list[list[int]],
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        suppress_image_tokens: bool = True,
        stop_ids: tuple[int, ...] | None = None,
    ) -> list[list[int]]:
        """Token-id prompts -> new text tokens per row (up to `max_new_tokens`, stopping after EOS),
        through the static-KV-cache decoder. With suppress_image_tokens the image vocabulary is
        masked out (a text answer)."""
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("generate_ids needs at least one non-empty prompt")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        eos = self.text_tokenizer.eos_token_id
        stops = set(stop_ids) if stop_ids is not None else ({eos} if eos is not None else set())
        ids, mask = left_pad(rows, self.text_tokenizer.pad_token_id)
        with eval_mode(self.model), self._decoders.take(self.model, len(rows), ids.shape[1] + max_new_tokens) as dec:
            return decode_text(
                dec,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                stops=stops,
                masked=(self.vocab.base, self.vocab.size) if suppress_image_tokens else None,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=self._generator(seed),
            )

    def _decode_text(self, new_ids: list[list[int]]) -> list[str]:
        return [self.text_tokenizer.decode(r, skip_special_tokens=True).strip() for r in new_ids]

    def generate_text(self, prompts: list[str], images=None, *, codes=None, chat: bool = True, **kwargs) -> list[str]:
        """Interleaved prompts (text with `<image>` placeholders; images[i] is the list of prompt
        i's images, in order) -> text answers. kwargs as in `generate_ids`."""
        prompts = _as_list(prompts, "prompts")
        groups = self._images_per_prompt(images, codes, len(prompts), "generate_text")
        rows = [
            self.encode_turn(p, g, chat=chat, where=f"prompts[{i}]") for i, (p, g) in enumerate(zip(prompts, groups))
        ]
        return self._decode_text(self.generate_ids(rows, **kwargs))

    def _one_image_each(self, images, codes):
        """caption / answer take one image per row, in any form SeedTokenizer.encode takes (PIL
        images or paths, a (B, 3, H, W) tensor or array, ...): encoded here to (B, 32) codes."""
        if images is not None and codes is not None:
            raise InputError("give images or codes, not both")
        if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
            return codes if images is None else images
        return self.image_codes(images)

    def caption(self, images=None, prompt: str | None = None, *, codes=None, **kwargs) -> list[str]:
        """One caption per image (any form SeedTokenizer.encode takes, or codes=). prompt: the
        captioning turn (default: the template's); an `<image>` placeholder in it says where the
        image goes (else the image comes first)."""
        codes = self._one_image_each(images, codes)
        images = None
        groups = codes
        n = _count(groups, "images")
        turn = (
            self.template.caption
            if prompt is None
            else (prompt if IMAGE_PLACEHOLDER in prompt else IMAGE_PLACEHOLDER + prompt)
        )
        return self.generate_text([turn] * n, _one_each(images), codes=_one_each(codes), **kwargs)

    def answer(self, images=None, questions=None, *, codes=None, **kwargs) -> list[str]:
        """Visual question answering: questions[i] about images[i] (any form SeedTokenizer.encode
        takes, or codes=); one question string is asked of every image."""
        codes = self._one_image_each(images, codes)
        images = None
        groups = codes
        n = _count(groups, "images")
        if isinstance(questions, str):
            questions = [questions] * n
        questions = _as_list(questions, "questions")
        if len(questions) != n:
            raise InputError(f"answer: {n} image(s) but {len(questions)} question(s)")
        turns = [q if IMAGE_PLACEHOLDER in q else self.template.answer.format(question=q) for q in questions]
        return self.generate_text(turns, _one_each(images), codes=_one_each(codes), **kwargs)

    # ------------------------------------------------------------------ text -> image codes
    def image_prompt_ids(self, text: str, codes=None, *, where: str = "texts") -> list[int]:
        """A generation request -> ids ending with `<img>`."""
        if not text.strip() and codes is None:
            raise InputError(f"{where} is empty")
        return self.encode_turn(self.template.generate.format(text=text), codes, where=where) + [self.vocab.boi]

    def unconditional_ids(self) -> list[int]:
        """The prompt `<img>` alone (LaVIT-style guidance and SEED's negative embedding)."""
        return unconditional_ids(self.template, self.vocab, self.text_tokenizer.bos_token_id)

    @torch.no_grad()
    def generate_codes_from_ids(
        self,
        rows: list[list[int]],
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        cfg_scale: float = 1.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Prompts ending with `<img>` -> (B, 32) codes. Decoding sees only the image tokens, for
        exactly 32 steps, so every result is a valid image.

        cfg_scale > 1: LLM-side classifier-free guidance (LaVIT): logits = u + s * (c - u), u from
        the prompt `<img>` alone. num_beams > 1: beam search on the (guided) log-probabilities.
        """
        if not rows:
            raise InputError("no prompts given")
        if any(not r or r[-1] != self.vocab.boi for r in rows):
            raise InputError("every image prompt must end with the <img> token id")
        check_sampling(temperature, top_k, top_p)
        if num_beams < 1:
            raise InputError(f"num_beams must be >= 1, got {num_beams}")
        if num_beams > 1 and do_sample:
            raise InputError("beam search is deterministic: use num_beams=1 with do_sample=True")
        check_cfg_scale(cfg_scale)
        b, nb, n_tok, lo = len(rows), num_beams, self.tokens_per_image, self.vocab.base
        all_rows = [r for r in rows for _ in range(nb)]
        if cfg_scale > 1.0:
            all_rows += [self.unconditional_ids()] * (b * nb)
        ids, mask = left_pad(all_rows, self.text_tokenizer.pad_token_id)
        with eval_mode(self.model), self._decoders.take(self.model, len(all_rows), ids.shape[1] + n_tok) as dec:
            codes = decode_image_codes(
                dec,
                ids,
                mask,
                prompts=b,
                code_ids=(lo, lo + self.vocab.num_codes),
                num_codes=n_tok,
                num_beams=nb,
                cfg_scale=cfg_scale,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=self._generator(seed),
            )
        return codes.cpu()

    def generate_image_codes(self, texts, *, images=None, codes=None, **kwargs) -> torch.Tensor:
        """Texts -> (B, 32) image codes in [0, 8192). kwargs: do_sample, temperature, top_k, top_p,
        num_beams, cfg_scale, seed (see `generate_codes_from_ids`). images / codes: optional input
        images per text, placed at `<image>` placeholders (editing / interleaved prompts)."""
        texts = _as_list(texts, "texts")
        groups = self._images_per_prompt(images, codes, len(texts), "generate_image_codes")
        rows = [self.image_prompt_ids(t, g, where=f"texts[{i}]") for i, (t, g) in enumerate(zip(texts, groups))]
        return self.generate_codes_from_ids(rows, **kwargs)

    def negative_codes(self) -> torch.Tensor:
        """(1, 32) greedy codes for the prompt `<img>` alone: SEED's negative image for guidance."""
        return self.generate_codes_from_ids([self.unconditional_ids()])

    def generate_image_embeddings(
        self, texts, *, negative: bool = True, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Texts -> (generation embeddings (B, D), negative embedding (1, D) or None). Needs the
        image tokenizer but no diffusion pipeline."""
        if self.tokenizer is None:
            raise InputError("this SeedLLM has no image tokenizer: it cannot turn codes into embeddings")
        codes = self.generate_image_codes(texts, **kwargs)
        emb = self.tokenizer.decode(codes)
        neg = self.tokenizer.decode(self.negative_codes()) if negative else None
        return emb, neg

    def generate_images(
        self,
        texts,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 10.0,
        image_seed: int | None = None,
        progress: bool = True,
        **kwargs,
    ):
        """Texts -> PIL images: codes -> generation embedding -> the unCLIP pipeline, with the
        `<img>`-only generation as the negative embedding. kwargs go to `generate_image_codes`."""
        if self.diffusion is None:
            raise InputError(
                "no diffusion pipeline is loaded: pass diffusion=... (a StableUnCLIPImg2ImgPipeline or its folder) "
                "to SeedLLM, or use generate_image_codes / generate_image_embeddings (tokens-only)"
            )
        from ..decoders.unclip import embeddings_to_images

        emb, neg = self.generate_image_embeddings(texts, negative=guidance_scale > 1.0, **kwargs)
        return embeddings_to_images(
            self.diffusion,
            emb,
            negative_image_embeds=neg,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            seed=image_seed,
            progress=progress,
        )


def _load_diffusion(folder: Path, dtype):
    """A saved pipeline folder: seed_fast's image decoder or a Stable unCLIP pipeline, by its model_index.json."""
    import json

    index = folder / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name == "SeedImageDecoderPipeline":
        from ..decoders.image_decoder import load_image_decoder

        return load_image_decoder(folder, dtype=dtype)
    from ..decoders.unclip import load_unclip_pipeline

    return load_unclip_pipeline(folder, dtype=dtype)


def _as_list(x, name: str) -> list:
    if isinstance(x, str):
        x = [x]
    if x is None or len(x) == 0:
        raise InputError(f"{name} is empty: give at least one")
    return list(x)


def _count(groups, name: str) -> int:
    if groups is None:
        raise InputError(f"no {name} given (pass images or codes=)")
    n = len(groups)
    if n == 0:
        raise InputError(f"{name} is empty: give at least one")
    return n


def _is_code_block(g, codes) -> bool:
    """A (n, 32) code tensor for one prompt: n images."""
    return codes is not None and isinstance(g, torch.Tensor) and g.dim() == 2


def _one_each(groups):
    """B images (or a (B, 32) code tensor) -> B groups of one."""
    if groups is None:
        return None
    if isinstance(groups, torch.Tensor):
        return [g[None] for g in groups]
    return [[g] for g in groups]


def _default_template(model) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", "")
    return {"llama": "seed-llama-8b", "opt": "seed-opt"}.get(kind, "plain")


def tiny_causal_lm(preset: str, vocab_size: int, overrides: dict | None = None) -> nn.Module:
    """A randomly initialised small transformers LM: "tiny-llama" / "tiny-opt" (tests), or
    "mini-llama" (the embedded default model's LM: 256 wide, 4 layers, about 3 M parameters).

    overrides: transformers config fields to change from the preset's, e.g. {"num_hidden_layers": 6};
    a name the config class does not have is an error."""
    common = dict(
        vocab_size=vocab_size,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    overrides = dict(overrides or {})
    if "vocab_size" in overrides:
        raise ValueError("tiny_causal_lm: vocab_size is set by the vocabulary, not by overrides")
    if preset in ("tiny-llama", "mini-llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        mini = preset == "mini-llama"
        cfg = LlamaConfig(
            hidden_size=256 if mini else 64,
            intermediate_size=512 if mini else 128,
            num_hidden_layers=4 if mini else 2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **common,
        )
        return LlamaForCausalLM(_override(cfg, overrides, preset))
    if preset == "tiny-opt":
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64, **common)
        return OPTForCausalLM(_override(cfg, overrides, preset))
    raise ValueError(f"unknown LM preset {preset!r}; choose 'tiny-llama', 'tiny-opt' or 'mini-llama'")


def _override(cfg, overrides: dict, preset: str):
    known = type(cfg)().to_dict()
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"{preset}: unknown config field(s) {unknown} for {type(cfg).__name__}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
