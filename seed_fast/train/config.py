"""Training configuration: one JSON (or TOML) file, checked in full before any work starts."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.related.lavit import LAVIT_PRESETS
from ..prompt import TEMPLATES

LM_PRESETS = ("tiny-llama", "tiny-opt", "mini-llama")
TRACKERS = {"auto": None, "tensorboard": "tensorboard", "wandb": "wandb", "none": None}  # name -> its package


class ConfigError(ValueError):
    """A training config that cannot run; the message names the field."""


STREAMING_KINDS = ("webdataset", "hf")  # the data kinds read as streams (seed_fast/train/streaming.py)


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | folder | tar | webdataset | hf (the last two stream)
    n: int = 2048  # synthetic: number of training pairs
    val_n: int = 128  # synthetic: held-out pairs for evaluation; webdataset / hf: samples evaluated
    seed: int = 0  # synthetic pairs and the shuffling order
    index: str | None = None  # folder: JSONL / CSV caption index
    # tar: shard paths (globs allowed); webdataset: shard URLs: paths, globs, brace ranges
    # (shard-{000..127}.tar), pipe:<command>, http(s)://
    shards: list[str] = field(default_factory=list)
    # hf: a Hugging Face dataset streamed by `datasets`: a Hub id, or a builder (parquet, imagefolder,
    # webdataset, ...) with data files; its split, held-out split and columns
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_data_files: list[str] = field(default_factory=list)
    hf_split: str = "train"
    hf_val_split: str | None = None
    hf_revision: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    # webdataset / hf: samples in the shuffle buffer (0 or 1: stream order)
    shuffle_buffer: int = 1000
    # the held-out split for evaluation: an index (folder) / shards (tar, webdataset) / a split (hf,
    # hf_val_split) of its own, or a fraction of the training samples (chosen by a hash of their
    # position, or of their key when streaming, and `seed`, so the same ones every run) kept out of
    # training; none: evaluation runs on the training data (it then measures fit)
    val_index: str | None = None
    val_shards: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    image_size: int = 224
    workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: int = 0  # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables


@dataclass
class Stage1Config:
    init: str | None = (
        None  # a BLIP-2 checkpoint (LAVIS .pth or transformers file / folder): Q-Former, text branch, projections
    )
    text_tokenizer: str | None = (
        None  # a transformers tokenizer folder (BLIP-2: bert-base-uncased); default: a word tokenizer
    )
    train_vit: bool = (
        False  # also train the ViT (CLIP-style, for a stack with no pretrained ViT); SEED keeps EVA-CLIP frozen
    )


@dataclass
class Stage2Config:
    vq_weight: float = 5.0
    cos_weight: float = 2.0
    mse_weight: float = 0.5
    itc_weight: float = 0.0  # > 0: also match stage I's retrieval feature from codes (needs itc_heads)
    # > 0: also stage I's image-text contrastive loss on the retrieval feature rebuilt from codes, against
    # stage I's frozen text branch and temperature (needs itc_heads): the codes must tell captions apart
    itc_text_weight: float = 0.0
    # > 0: the image -> text side of that loss also ranks the codes' feature against the text features
    # of this many earlier captions (a queue; the text branch is frozen, so they never go stale), minus
    # any with the sample's own caption: negatives that differ in one word appear far more often
    itc_text_queue: int = 0
    # "pixels" (a fixed random projection of the downsampled image), "itc" (stage I's image feature; needs
    # itc_heads) or a CLIP vision folder
    target: str = "pixels"
    codebook_init: str = "uniform"  # uniform (as released) | kmeans (from the first batch's z)
    restart_dead_every: int = 0  # steps; 0 disables dead-code restarts
    itc_heads: str | None = None  # a stage-I run folder: evaluation then also measures retrieval with codes
    # the quantizer is first trained here, so its shape may be set here (None: the tokenizer's); a new shape
    # starts the quantizer from seeded random weights
    codebook_size: int | None = None
    code_dim: int | None = None


@dataclass
class LLMConfig:
    model: str = "tiny-llama"  # tiny-llama | tiny-opt (seeded random) | a SeedLLM or transformers folder
    template: str | None = None  # a prompt template name (default: the model's)
    mode: str = "pretrain"  # pretrain: caption+image / image+caption | instruct: also question -> answer
    loss_on: str = "all"  # all tokens | answers (the part after the prompt)
    image_first_ratio: float = 0.5  # share of image -> caption sequences (the rest caption -> image)
    qa_ratio: float = 0.5  # instruct: share of samples with a question that become a QA turn
    lora_r: int = 16  # 0: no LoRA, every weight is trained
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    fused_lora: bool = False  # True: the adapters through seed_fast's lora_linear; False: peft's own layers
    gradient_checkpointing: bool = False
    max_len: int = 256  # longer sequences are cut (and counted)
    code_cache: str | None = None  # folder for the cached image codes (default: <out>/codes)
    encode_batch: int = 32  # images per tokenizer call while filling the cache
    eval_n: int = 32  # held-out samples captioned / generated at evaluation
    # the LM's attention kernel while training: None keeps the model's (transformers picks SDPA), "eager"
    # is transformers' matmul-softmax-matmul. On the 2-core CPU machine, for the embedded model's LM
    # (256 wide, ~47 tokens, batch 32, bf16 autocast) a bare step takes 0.16 s with eager against 0.22 with
    # SDPA, whose CPU flash-attention backward is slow at these sizes (the whole stage: 612 s against 642).
    # On a GPU keep SDPA.
    attention: str | None = None
    # preset models only: transformers config fields changed from the preset's, e.g. {"num_hidden_layers": 6}
    lm_overrides: dict = field(default_factory=dict)


@dataclass
class DecoderConfig:
    image_size: int = 32  # the decoder's output pixels (square)
    null_prob: float = 0.1  # share of zero embeddings (the classifier-free guidance null)
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # UNet levels, full resolution first
    ema: float = 0.0  # EMA decay of the UNet weights used for evaluation and export (e.g. 0.999); 0: off
    attention_levels: int = 1  # coarsest levels with self- and cross-attention (the mid block always has them)
    patch: int = 1  # pixels per UNet cell along a side (space-to-depth): 2 draws 64 px at a 32 px UNet's cost
    # the tokenizer is frozen, so each sample's generation embedding is computed once and kept (by the
    # sample's key, checked against a fingerprint of its pixels); at most this many samples; 0: off
    embedding_cache: int = 131072
    # the UNet's attention while training: "sdpa" (diffusers' default processor) or "math" (diffusers'
    # AttnProcessor: baddbmm, softmax, bmm). The inference copy that is saved keeps the default. On the
    # 2-core CPU machine a step of the embedded decoder (batch 64, bf16 autocast) takes 0.74 s with "math"
    # against 1.19 s with "sdpa", whose CPU flash-attention backward is slow at 8 x 8 cells.
    attention: str = "sdpa"
    # a trained autoencoder folder (the vae stage's `vae/`): the UNet then denoises its latents, a latent
    # decoder as Stable unCLIP is, and image_size is the autoencoder's (and the output's) pixels
    vae: str | None = None


@dataclass
class VaeConfig:
    """The vae stage: a small diffusers AutoencoderKL for a latent image decoder."""

    image_size: int = 32  # pixels it encodes and draws (the training images are area-down-sampled to it)
    channels: list[int] = field(default_factory=lambda: [16, 32])  # one level each; each after the first halves
    latent_channels: int = 4
    kl_weight: float = 1e-6  # weight of the KL (summed over a sample's latents) next to the pixel MSE (in [-1, 1])


@dataclass
class LavitTrainConfig:
    preset: str = "tiny-lavit"  # seed_fast.models.related.lavit.LAVIT_PRESETS
    vit_from: str | None = None  # a SeedTokenizer folder whose (trained) ViT the tokenizer reads; else random, frozen
    keep_ratio: float | None = None  # target fraction of patches kept (default: the preset's, 1/3)
    keep_weight: float | None = None  # weight of the keep-ratio loss (default: the preset's, 2)
    vq_weight: float = 1.0  # codebook + 0.25 x commitment, on l2-normalized vectors
    tau: float = 1.0  # Gumbel-softmax temperature
    codebook_init: str = (
        "kmeans"  # kmeans (cosine, from the first batch's vectors) | random (as released: normalized randn)
    )
    restart_dead_every: int = 10  # steps; 0 disables dead-code restarts


@dataclass
class FlamingoTrainConfig:
    lm: str | None = (
        None  # frozen LM: a SeedLLM / transformers causal-LM folder (required; e.g. the embedded model's llm/)
    )
    vit_from: str | None = None  # frozen SeedTokenizer folder giving the media (required; e.g. its tokenizer/)
    media: str = "vit"  # vit: ViT patch features | qformer: the 32 causal Q-Former embeddings (pre-quantization)
    every: int = 1  # a gated cross-attention block before every `every`-th LM layer
    num_latents: int = 32  # Perceiver Resampler outputs
    resampler_depth: int = 2
    prompt: str | None = None  # text before the caption (default: the LM template's caption turn without the image)
    eval_n: int = 64  # held-out images captioned at evaluation
    max_new_tokens: int = 16


@dataclass
class VwlmmTrainConfig:
    lm: str | None = (
        None  # frozen LM: a SeedLLM / transformers causal-LM folder (required; e.g. the embedded model's llm/)
    )
    vit_from: str | None = None  # frozen SeedTokenizer folder giving the image features (required; e.g. its tokenizer/)
    media: str = (
        "vit"  # vit: the ViT's patch features (class token dropped) | qformer: the 32 causal Q-Former embeddings
    )
    variant: str = "vw"  # vw: the LM reads the projected patches | pif: it reads softmax(vm_head(patch)) @ E_text
    projector: str = "mlp"  # mlp (Linear-GELU-Linear, as LLaVA-1.5) | linear
    kl_weight: float = 1.0  # weight of KL(visual word of the next patch || LM) next to the caption loss (upstream: 1)
    prompt: str | None = None  # the caption turn with one <image> (default: the LM template's caption turn)
    eval_n: int = 64  # held-out images captioned at evaluation
    max_new_tokens: int = 16


def _stage(section):
    """A TrainConfig field holding a stage's own settings; the field's name is the stage's name."""
    return field(default_factory=section, metadata={"stage": True})


@dataclass
class TrainConfig:
    stage: str
    out: str
    steps: int
    global_batch: int
    seed: int = 0
    tokenizer: str = "tiny"  # a preset (random init, seeded) or a SeedTokenizer checkpoint folder
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    strategy: str = "ddp"  # ddp | fsdp (llm stage; used when launched on several processes)
    log_every: int = 1
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    # experiment trackers, besides metrics.jsonl: "auto" (TensorBoard when installed), "tensorboard",
    # "wandb" (only when asked for), "none"
    report_to: list[str] = field(default_factory=lambda: ["auto"])
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # one section per stage, named as the stage: these fields are the list of stages (STAGES)
    stage1: Stage1Config = _stage(Stage1Config)
    stage2: Stage2Config = _stage(Stage2Config)
    llm: LLMConfig = _stage(LLMConfig)
    vae: VaeConfig = _stage(VaeConfig)
    decoder: DecoderConfig = _stage(DecoderConfig)
    lavit: LavitTrainConfig = _stage(LavitTrainConfig)
    flamingo: FlamingoTrainConfig = _stage(FlamingoTrainConfig)
    vwlmm: VwlmmTrainConfig = _stage(VwlmmTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        cfg = _build(cls, data, "config")
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text()
        try:
            if p.suffix.lower() == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"{p}: cannot parse: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be an object")
        return cls.from_dict(data)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        need(bool(self.out), "out (the run folder) must be set")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}")
        need(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}")
        need(self.strategy in ("ddp", "fsdp"), f"strategy must be ddp or fsdp, got {self.strategy!r}")
        need(
            self.strategy != "fsdp" or self.stage == "llm",
            f"strategy 'fsdp' is for the llm stage; {self.stage} trains the tokenizer, "
            "small enough to replicate: use ddp",
        )
        for name in ("log_every", "ckpt_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        bad = [t for t in self.report_to if t not in TRACKERS]
        need(not bad, f"report_to takes {list(TRACKERS)}, got {bad}")
        for name in ("tensorboard", "wandb"):
            need(
                name not in self.report_to or importlib.util.find_spec(TRACKERS[name]) is not None,
                f"report_to {name!r} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}",
            )
        d = self.data
        kinds = ("synthetic", "folder", "tar", *STREAMING_KINDS)
        need(d.kind in kinds, f"data.kind must be one of {', '.join(kinds)}, got {d.kind!r}")
        if d.kind == "synthetic":
            need(d.n >= self.global_batch, f"data.n ({d.n}) must be >= global_batch ({self.global_batch})")
            need(d.val_n >= 1, f"data.val_n must be >= 1, got {d.val_n}")
        if d.kind == "folder":
            need(
                d.index is not None and Path(d.index).is_file(),
                f"data.index must be an existing JSONL / CSV file, got {d.index!r}",
            )
        if d.kind in ("tar", "webdataset"):
            need(bool(d.shards), f"data.shards must list at least one {d.kind} shard")
        if d.kind == "hf":
            need(bool(d.hf_dataset), "data.hf_dataset must name a Hugging Face dataset (a Hub id or a builder)")
        need(d.kind == "hf" or not d.hf_val_split, "data.hf_val_split is for hf data")
        for kind, module in (("webdataset", "webdataset"), ("hf", "datasets")):
            need(
                d.kind != kind or importlib.util.find_spec(module) is not None,
                f"data.kind {kind} needs the {module} package: pip install 'seed_fast[data]'",
            )
        need(d.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
        need(
            d.kind not in STREAMING_KINDS or self.stage != "llm",
            f"data.kind {d.kind}: the llm stage encodes every image once into a code cache before step 1, "
            "so it needs indexed data (synthetic, folder or tar)",
        )
        need(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        given = [n for n in ("val_index", "val_shards", "hf_val_split", "val_fraction") if getattr(d, n)]
        need(len(given) <= 1, f"data: give one held-out split, got {given}")
        need(d.kind != "synthetic" or not given, f"data.{given[0] if given else ''}: synthetic data has val_n")
        need(not d.val_index or d.kind == "folder", "data.val_index is for folder data")
        need(not d.val_shards or d.kind in ("tar", "webdataset"), "data.val_shards is for tar or webdataset data")
        need(
            d.val_index is None or Path(d.val_index).is_file(),
            f"data.val_index must be an existing JSONL / CSV file, got {d.val_index!r}",
        )
        need(
            d.image_size >= (48 if d.kind == "synthetic" else 14),
            f"data.image_size must be >= 48 (synthetic) / 14, got {d.image_size}",
        )
        need(d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
        o = self.optim
        need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        need(
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            f"optim.betas must be two numbers in [0, 1), got {o.betas}",
        )
        need(0 <= o.warmup < self.steps or o.warmup == 0, f"optim.warmup must be in [0, steps), got {o.warmup}")
        need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
        s = self.stage2
        need(
            s.codebook_init in ("uniform", "kmeans"),
            f"stage2.codebook_init must be uniform or kmeans, got {s.codebook_init!r}",
        )
        need(
            s.target in ("pixels", "itc") or Path(s.target).is_dir(),
            f"stage2.target must be 'pixels', 'itc' or a CLIP vision model folder, got {s.target!r}",
        )
        need(
            s.target != "itc" or s.itc_heads is not None,
            "stage2.target 'itc' needs stage2.itc_heads (a stage-I run folder)",
        )
        need(
            min(s.vq_weight, s.cos_weight, s.mse_weight, s.itc_weight, s.itc_text_weight) >= 0,
            "stage2 loss weights must be >= 0",
        )
        need(
            s.itc_weight == 0 or s.itc_heads is not None,
            "stage2.itc_weight needs stage2.itc_heads (a stage-I run folder)",
        )
        need(
            s.itc_text_weight == 0 or s.itc_heads is not None,
            "stage2.itc_text_weight needs stage2.itc_heads (a stage-I run folder)",
        )
        need(
            isinstance(s.itc_text_queue, int) and s.itc_text_queue >= 0,
            "stage2.itc_text_queue must be a number of captions (>= 0)",
        )
        need(s.itc_text_queue == 0 or s.itc_text_weight > 0, "stage2.itc_text_queue needs stage2.itc_text_weight > 0")
        need(s.restart_dead_every >= 0, f"stage2.restart_dead_every must be >= 0, got {s.restart_dead_every}")
        need(
            s.itc_heads is None or (Path(s.itc_heads) / "itc_heads.safetensors").is_file(),
            f"stage2.itc_heads must be a stage-I run folder holding itc_heads.safetensors, got {s.itc_heads!r}",
        )
        s1 = self.stage1
        need(
            s1.init is None or Path(s1.init).exists(),
            f"stage1.init must be an existing BLIP-2 checkpoint file or folder, got {s1.init!r}",
        )
        need(
            s1.text_tokenizer is None or Path(s1.text_tokenizer).is_dir(),
            f"stage1.text_tokenizer must be a tokenizer folder, got {s1.text_tokenizer!r}",
        )
        lv = self.lavit

        need(lv.preset in LAVIT_PRESETS, f"lavit.preset must be one of {sorted(LAVIT_PRESETS)}, got {lv.preset!r}")
        need(
            lv.vit_from is None or Path(lv.vit_from).is_dir(),
            f"lavit.vit_from must be a SeedTokenizer folder, got {lv.vit_from!r}",
        )
        need(
            lv.codebook_init in ("kmeans", "random"),
            f"lavit.codebook_init must be kmeans or random, got {lv.codebook_init!r}",
        )
        need(
            lv.keep_ratio is None or 0 < lv.keep_ratio <= 1, f"lavit.keep_ratio must be in (0, 1], got {lv.keep_ratio}"
        )
        need(
            min(lv.vq_weight, lv.keep_weight or 0.0) >= 0 and lv.tau > 0,
            "lavit: vq_weight, keep_weight must be >= 0 and tau > 0",
        )
        need(lv.restart_dead_every >= 0, f"lavit.restart_dead_every must be >= 0, got {lv.restart_dead_every}")
        fl = self.flamingo
        need(fl.media in ("vit", "qformer"), f"flamingo.media must be vit or qformer, got {fl.media!r}")
        _frozen_parts(need, "flamingo", fl, self.stage == "flamingo")
        need(
            fl.every >= 1 and fl.num_latents >= 1 and fl.resampler_depth >= 1,
            "flamingo.every, num_latents and resampler_depth must be >= 1, "
            f"got {fl.every}, {fl.num_latents}, {fl.resampler_depth}",
        )
        need(fl.eval_n >= 0 and fl.max_new_tokens >= 1, "flamingo.eval_n must be >= 0 and flamingo.max_new_tokens >= 1")
        vc = self.vwlmm
        need(vc.media in ("vit", "qformer"), f"vwlmm.media must be vit or qformer, got {vc.media!r}")
        need(vc.variant in ("vw", "pif"), f"vwlmm.variant must be vw or pif, got {vc.variant!r}")
        need(vc.projector in ("mlp", "linear"), f"vwlmm.projector must be mlp or linear, got {vc.projector!r}")
        need(
            isinstance(vc.kl_weight, (int, float)) and not isinstance(vc.kl_weight, bool) and vc.kl_weight >= 0,
            f"vwlmm.kl_weight must be a number >= 0, got {vc.kl_weight!r}",
        )
        _frozen_parts(need, "vwlmm", vc, self.stage == "vwlmm")
        need(
            vc.prompt is None or (isinstance(vc.prompt, str) and vc.prompt.count("<image>") == 1),
            f"vwlmm.prompt must hold exactly one <image>, got {vc.prompt!r}",
        )
        need(vc.eval_n >= 0 and vc.max_new_tokens >= 1, "vwlmm.eval_n must be >= 0 and vwlmm.max_new_tokens >= 1")
        for name in ("codebook_size", "code_dim"):
            v = getattr(self.stage2, name)
            need(
                v is None or (isinstance(v, int) and v >= 1),
                f"stage2.{name} must be a positive integer or null, got {v!r}",
            )
        dc = self.decoder
        need(isinstance(dc.patch, int) and dc.patch >= 1, f"decoder.patch must be a positive integer, got {dc.patch!r}")
        down = 2 ** (len(dc.channels) - 1) * dc.patch
        if dc.vae is not None:
            vae_cfg = Path(dc.vae) / "config.json"
            need(
                vae_cfg.is_file(),
                f"decoder.vae must be an autoencoder folder (the vae stage's vae/, with config.json), got {dc.vae!r}",
            )
            try:
                vae_json = json.loads(vae_cfg.read_text())
                blocks, vae_size = vae_json["block_out_channels"], int(vae_json["sample_size"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"decoder.vae: {vae_cfg} is not a diffusers AutoencoderKL config") from None
            need(
                dc.image_size == vae_size,
                f"decoder.image_size ({dc.image_size}) must be the size the autoencoder in "
                f"decoder.vae was trained at ({vae_size})",
            )
            down *= 2 ** (len(blocks) - 1)  # the UNet runs on latents, down-sampled once per level after the first
        need(
            len(dc.channels) >= 2 and all(isinstance(c, int) and c >= 8 and c % 8 == 0 for c in dc.channels),
            f"decoder.channels must be 2 or more multiples of 8, got {dc.channels}",
        )
        need(
            dc.image_size >= down and dc.image_size % down == 0,
            f"decoder.image_size must be a multiple of {down} (decoder.patch times one halving per level after the "
            f"first{', times the autoencoder' + chr(39) + 's down-sampling' if dc.vae is not None else ''}), "
            f"got {dc.image_size}",
        )
        vc = self.vae
        need(
            len(vc.channels) >= 1 and all(isinstance(c, int) and c >= 8 and c % 8 == 0 for c in vc.channels),
            f"vae.channels must be 1 or more multiples of 8, got {vc.channels}",
        )
        vdown = 2 ** (len(vc.channels) - 1)
        need(
            vc.image_size >= vdown and vc.image_size % vdown == 0,
            f"vae.image_size must be a multiple of {vdown} (one halving per level after the first), "
            f"got {vc.image_size}",
        )
        need(vc.latent_channels >= 1, f"vae.latent_channels must be >= 1, got {vc.latent_channels}")
        need(vc.kl_weight >= 0, f"vae.kl_weight must be >= 0, got {vc.kl_weight}")
        need(0 <= dc.null_prob < 1, f"decoder.null_prob must be in [0, 1), got {dc.null_prob}")
        need(0 <= dc.ema < 1, f"decoder.ema must be in [0, 1), got {dc.ema}")
        need(
            isinstance(dc.embedding_cache, int)
            and not isinstance(dc.embedding_cache, bool)
            and dc.embedding_cache >= 0,
            f"decoder.embedding_cache must be a number of samples >= 0 (0: off), got {dc.embedding_cache!r}",
        )
        need(
            isinstance(dc.attention_levels, int)
            and not isinstance(dc.attention_levels, bool)
            and 1 <= dc.attention_levels <= len(dc.channels),
            f"decoder.attention_levels must be an integer from 1 to the {len(dc.channels)} levels of decoder.channels, "
            f"got {dc.attention_levels!r}",
        )
        if isinstance(dc.attention_levels, int) and 1 <= dc.attention_levels <= len(dc.channels):
            attn = dc.channels[len(dc.channels) - dc.attention_levels :]
            need(
                all(c % 16 == 0 for c in attn),
                "decoder.channels of the attention levels (the last decoder.attention_levels) "
                f"must be multiples of 16, got {attn}",
            )
        need(dc.attention in ("sdpa", "math"), f"decoder.attention must be 'sdpa' or 'math', got {dc.attention!r}")
        m = self.llm
        need(
            m.attention in (None, "eager", "sdpa"),
            f"llm.attention must be null, 'eager' or 'sdpa', got {m.attention!r}",
        )
        need(
            not m.lm_overrides or m.model in LM_PRESETS,
            f"llm.lm_overrides applies to the preset models {LM_PRESETS} only; llm.model is {m.model!r}",
        )
        need(
            m.model in LM_PRESETS or Path(m.model).is_dir(),
            f"llm.model must be one of {LM_PRESETS} or a model folder, got {m.model!r}",
        )
        need(m.mode in ("pretrain", "instruct"), f"llm.mode must be pretrain or instruct, got {m.mode!r}")
        need(m.loss_on in ("all", "answers"), f"llm.loss_on must be all or answers, got {m.loss_on!r}")
        for name in ("image_first_ratio", "qa_ratio", "lora_dropout"):
            need(0 <= getattr(m, name) <= 1, f"llm.{name} must be in [0, 1], got {getattr(m, name)}")
        need(
            m.lora_r >= 0 and m.lora_alpha >= 1,
            f"llm.lora_r must be >= 0 and llm.lora_alpha >= 1, got {m.lora_r}, {m.lora_alpha}",
        )
        need(m.max_len >= 40, f"llm.max_len must be >= 40 (an image alone takes 34 tokens), got {m.max_len}")
        need(m.encode_batch >= 1 and m.eval_n >= 0, "llm.encode_batch must be >= 1 and llm.eval_n >= 0")
        if m.template is not None:
            need(m.template in TEMPLATES, f"llm.template must be one of {sorted(TEMPLATES)}, got {m.template!r}")


def _frozen_parts(need, section: str, c, required: bool) -> None:
    """A connector stage's frozen LM (`lm`) and image-feature tokenizer (`vit_from`): folders, set
    when the stage runs (the embedded model's are its `llm/` and `tokenizer/`)."""
    parts = (
        ("lm", "a SeedLLM or transformers causal-LM folder", "llm"),
        ("vit_from", "a SeedTokenizer folder", "tokenizer"),
    )
    for name, what, embedded in parts:
        v = getattr(c, name)
        if required and v is None:
            need(
                False,
                f"{section}.{name} must be set: {what} "
                f"(the embedded model's is seed_fast.default_model.DEFAULT_DIR / {embedded!r})",
            )
        need(v is None or Path(v).is_dir(), f"{section}.{name} must be a folder, got {v!r}")


STAGES = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("stage"))


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        value = data[name]
        # a field whose default is a config dataclass (data, optim, each stage's section) is read as one
        sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, f.type, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value: Any, annotation: str, where: str) -> Any:
    ann = str(annotation)
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "str | None": lambda v: v is None or isinstance(v, str),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "list[float]": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) for x in v),
        "dict": lambda v: isinstance(v, dict),
    }.get(ann)
    if ok is not None and not ok(value):
        raise ConfigError(f"{where} must be {ann}, got {value!r}")
    return float(value) if ann == "float" else value
