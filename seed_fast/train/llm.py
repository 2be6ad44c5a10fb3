"""LLM stage: a causal LM learns SEED's image tokens next to its text (LoRA, as SEED-LLaMA).

Sequences (SEED_SPEC section 4), written through the model's prompt template so that training and
`SeedLLM.caption` / `generate_image_codes` see the same layout:
  image -> text:  template.caption with the image's `<img>` + 32 codes + `</img>`, then the caption, eos
  text -> image:  template.generate with the caption, `<img>` + 32 codes + `</img>`, eos
  question:       template.answer with the image and question, then the answer, eos   (mode "instruct")
With the "plain" template the first two are exactly SEED-LLaMA's pre-training pairs `image + caption`
and `caption + image`, chosen 50/50 (`image_first_ratio`) per sample and epoch. `loss_on` "all" puts
the loss on every token; "answers" only on what follows the prompt.

The frozen image tokenizer runs once per image: before the first step every rank encodes its share of
the dataset, rank 0 merges the shares into `<code_cache>/<split>.pt` (with a key made of the
tokenizer's weights and the data identity, so a changed tokenizer or dataset is re-encoded, never
reused by mistake), and training reads codes and text from there without touching an image again.

The loss is the mean over every answer token of the *global* batch (token counts are summed across
ranks), so N processes give the same loss and gradients as one process on the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models.llm.seed_llm import SeedLLM, seed_lora_config
from ..models.preprocess import images_to_tensor
from .config import LM_PRESETS, ConfigError, TrainConfig
from .sources import make_source
from .task import Task, load_tokenizer

IGNORE = -100
CACHE_FORMAT = 1


# ---------------------------------------------------------------------------- the code cache
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def tokenizer_fingerprint(tok) -> str:
    """A hash of the tokenizer's config and weights (a strided sample of every tensor: cheap for the
    full-size model, and any real change of weights shows)."""
    h = hashlib.sha256(json.dumps(asdict(tok.config), sort_keys=True, default=str).encode())
    for name, t in sorted(tok.state_dict().items()):
        flat = t.detach().flatten()
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def data_fingerprint(cfg: TrainConfig, split: str) -> str:
    d = asdict(cfg.data)
    d.pop("workers")
    ident = {"data": d, "split": split, "qa": cfg.llm.mode == "instruct"}
    files = ([d["index"]] if cfg.data.kind == "folder" else []) + (
        sorted(cfg.data.shards) if cfg.data.kind == "tar" else []
    )
    for f in files:
        p = Path(f)
        ident[str(p)] = [p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else None
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or damaged file: encode again
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
        return None
    return data


def build_code_cache(
    ds,
    tok,
    path: Path,
    key: str,
    *,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    collective: bool = True,
) -> dict:
    """Codes of every sample of `ds` (N, num_codes) int32 plus its texts, computed once and kept in
    `path`; `valid[i]` is False for a sample that could not be read. collective (every rank calls
    it): every rank encodes its share (i % world == rank); rank 0 merges and writes atomically; all
    ranks then read the file. Otherwise the calling process does all of it."""
    rank, world = _dist() if collective else (0, 1)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(ds), world))
    collate = _cache_collate(tok.config.vision.image_size)
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers)
    n_codes = tok.num_codes
    codes = torch.zeros(len(mine), n_codes, dtype=torch.int32)
    valid = torch.zeros(len(mine), dtype=torch.bool)
    texts: list[list[str | None]] = [[None, None, None] for _ in mine]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ds), desc=f"encode images -> {path.name}", unit="img")
    for k, (n_batch, good, pixels, rows) in enumerate(loader):
        if good:
            c = tok.encode(pixels).to(torch.int32).cpu()
            for j, (i, row) in enumerate(zip(good, rows)):
                codes[k * batch_size + i], valid[k * batch_size + i], texts[k * batch_size + i] = c[j], True, row
        if bar is not None:
            bar.update(n_batch * world)
    if bar is not None:
        bar.close()
    part = {"codes": codes, "valid": valid, "texts": texts, "index": torch.tensor(mine, dtype=torch.long)}
    if world == 1:
        merged = _merge([part], len(ds), n_codes, key)
        _atomic_save(merged, path)
        return merged
    tmp = path.with_name(f"{path.name}.rank{rank}.part")
    _atomic_save(part, tmp)
    dist.barrier()
    if rank == 0:
        parts = [torch.load(path.with_name(f"{path.name}.rank{r}.part"), weights_only=True) for r in range(world)]
        _atomic_save(_merge(parts, len(ds), n_codes, key), path)
        for r in range(world):
            path.with_name(f"{path.name}.rank{r}.part").unlink(missing_ok=True)
    dist.barrier()
    data = _read_cache(path, key)
    if data is None:
        raise RuntimeError(f"the code cache {path} was not written (is the run folder shared by every rank?)")
    return data


def _merge(parts: list[dict], n: int, n_codes: int, key: str) -> dict:
    codes = torch.zeros(n, n_codes, dtype=torch.int32)
    valid = torch.zeros(n, dtype=torch.bool)
    texts: list[list[str | None]] = [[None, None, None] for _ in range(n)]
    for p in parts:
        idx = p["index"]
        codes[idx], valid[idx] = p["codes"], p["valid"]
        for i, t in zip(idx.tolist(), p["texts"]):
            texts[i] = list(t)
    return {"format": CACHE_FORMAT, "key": key, "codes": codes, "valid": valid, "texts": texts}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cache_collate(image_size: int):
    """samples -> (batch size, positions of the readable samples, their pixels, their texts
    [caption, question, answer])."""

    def collate(samples):

        good = [(j, s) for j, s in enumerate(samples) if s is not None]
        if not good:
            return len(samples), [], torch.zeros(0, 3, image_size, image_size), []
        pixels = images_to_tensor([s.image for _, s in good], image_size)
        return len(samples), [j for j, _ in good], pixels, [[s.caption, s.question, s.answer] for _, s in good]

    return collate


# ---------------------------------------------------------------------------- sequences
@dataclass
class CodedSample:
    codes: torch.Tensor  # (num_codes,)
    caption: str | None
    question: str | None
    answer: str | None
    epoch: int
    index: int


class CachedPairs(torch.utils.data.Dataset):
    """Codes and texts from the cache, indexed by (epoch, i) (see BatchLoader)."""

    by_epoch = True

    def __init__(self, cache: dict):
        self.codes, self.valid, self.texts = cache["codes"], cache["valid"], cache["texts"]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, item) -> CodedSample | None:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        if not bool(self.valid[i]):
            return None
        caption, question, answer = self.texts[i]
        return CodedSample(self.codes[i].long(), caption, question, answer, epoch, i)


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, L), right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE where no loss
    kinds: list[str]  # i2t | t2i | qa per row
    skipped: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.kinds)


class SequenceBuilder:
    """CodedSamples -> TokenBatch through the SeedLLM's template and image vocabulary."""

    KINDS = ("i2t", "t2i", "qa")

    def __init__(self, llm, cfg, seed: int = 0):
        self.llm, self.cfg, self.seed = llm, cfg, seed
        tt = llm.text_tokenizer
        if tt.eos_token_id is None:
            raise ConfigError("the LLM's text tokenizer has no eos token; sequences need one to end")
        self.eos = tt.eos_token_id
        self.pad = tt.pad_token_id if tt.pad_token_id is not None else self.eos

    def choose(self, s: CodedSample) -> str | None:
        rng = random.Random(f"{self.seed}-{s.epoch}-{s.index}")
        has_qa = s.question is not None and s.answer is not None
        if self.cfg.mode == "instruct" and has_qa and (s.caption is None or rng.random() < self.cfg.qa_ratio):
            return "qa"
        if s.caption is None:
            return None
        return "i2t" if rng.random() < self.cfg.image_first_ratio else "t2i"

    def parts(self, s: CodedSample, kind: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one sample as `kind`."""
        llm, t = self.llm, self.llm.template
        codes = s.codes[None]
        if kind == "i2t":
            return llm.encode_turn(t.caption, codes), llm._text_ids(s.caption) + [self.eos]
        if kind == "t2i":
            return llm.image_prompt_ids(s.caption), llm.vocab.image_ids(s.codes)[1:] + [self.eos]
        if kind == "qa":
            return llm.encode_turn(t.answer.format(question=s.question), codes), llm._text_ids(s.answer) + [self.eos]
        raise ValueError(f"unknown sequence kind {kind!r}; one of {self.KINDS}")

    def batch(self, samples: list[CodedSample | None], kinds: list[str | None] | None = None) -> TokenBatch:
        rows, kept, skipped, truncated = [], [], 0, 0
        max_len = self.cfg.max_len
        for j, s in enumerate(samples):
            kind = None if s is None else (kinds[j] if kinds is not None else self.choose(s))
            if kind is None:
                skipped += 1
                continue
            prompt, answer = self.parts(s, kind)
            if len(prompt) >= max_len:
                skipped += 1
                truncated += 1
                continue
            if len(prompt) + len(answer) > max_len:
                answer = answer[: max_len - len(prompt)]
                truncated += 1
            labels = ([IGNORE] * len(prompt) if self.cfg.loss_on == "answers" else list(prompt)) + answer
            rows.append((prompt + answer, labels))
            kept.append(kind)
        n = max((len(r[0]) for r in rows), default=1)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, (r, lb) in enumerate(rows):
            ids[i, : len(r)], lab[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
        return TokenBatch(ids, mask, lab, kept, skipped, truncated)

    def __call__(self, samples) -> TokenBatch:
        return self.batch(samples)


# ---------------------------------------------------------------------------- the module
class LLMModule(nn.Module):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def token_losses(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss (B, L-1) with 0 where no label, the shifted labels)."""
        dev = self.llm.device
        ids, mask, labels = batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.labels.to(dev)
        logits = self.llm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        target = labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        return ce, target

    def forward(self, batch: TokenBatch) -> dict:
        if len(batch) == 0:
            zero = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
            return {"loss": zero, "text_loss": zero.detach(), "image_loss": zero.detach(), "tokens": 0.0}
        ce, target = self.token_losses(batch)
        has = target != IGNORE
        n_local = has.sum()
        n_global, world = n_local.clone(), 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(n_global)
        loss = ce.sum() / n_global.clamp(min=1) * world  # DDP averages over ranks: the global token mean
        vocab = self.llm.vocab
        image = has & (target >= vocab.base) & (target < vocab.size)
        text = has & ~image
        with torch.no_grad():
            parts = {
                "text_loss": (ce * text).sum() / text.sum().clamp(min=1),
                "image_loss": (ce * image).sum() / image.sum().clamp(min=1),
                "tokens": float(n_local),
                "truncated": float(batch.truncated),
            }
        return {"loss": loss, **parts}


def build_llm(cfg: TrainConfig, tok):
    """The stage's SeedLLM: the model of `cfg.llm.model` with the image vocabulary, LoRA (or every
    weight trainable), gradient checkpointing as configured."""

    m = cfg.llm
    if m.model in LM_PRESETS:
        llm = SeedLLM.from_config(
            m.model, seed=cfg.seed, tokenizer=tok, template=m.template, lm_overrides=m.lm_overrides
        )
    else:
        llm = SeedLLM.from_pretrained(m.model, tokenizer=tok, template=m.template, fused_lora=m.fused_lora)
    if llm.vocab.num_codes != tok.codebook_size:
        raise ConfigError(
            f"llm.model has {llm.vocab.num_codes} image tokens but the tokenizer has {tok.codebook_size} codes"
        )
    if not llm.has_lora:
        if m.lora_r > 0:
            llm.add_lora(
                seed_lora_config(llm.model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout), fused=m.fused_lora
            )
        else:
            llm.model.requires_grad_(True)
    base = llm.base_model
    base.config.use_cache = False
    if m.attention is not None:
        base.set_attn_implementation(m.attention)
    if m.gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"llm.gradient_checkpointing: {type(base).__name__} does not support it")
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5.25's name; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llm


class LLMTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.progress = True
        tok = load_tokenizer(cfg).requires_grad_(False).eval()
        llm = build_llm(cfg, tok).to(device)
        llm.tokenizer = None  # frozen and used only to fill the code cache: kept out of the DDP / FSDP module
        self.llm, self.tok = llm, tok
        self.module = LLMModule(llm)
        self.image_size = tok.config.vision.image_size
        self._trained = {"llm.model." + n for n, p in llm.model.named_parameters() if p.requires_grad}
        self._caches: dict[str, dict] = {}

    def shard(self) -> None:
        """FSDP2: every decoder layer is a unit, and the transformers model is the root (not this
        task's wrapper module), so evaluation's direct generate calls gather the weights too."""
        from torch.distributed.fsdp import fully_shard

        for unit in self.fsdp_units():
            fully_shard(unit)
        fully_shard(self.llm.base_model)
        self.sharded = True

    def fsdp_units(self) -> list[nn.Module]:
        """One FSDP unit per transformer block (LLaMA / OPT decoder layers); the root holds the rest."""
        units = [m for m in self.llm.base_model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
        if not units:
            raise ConfigError(f"strategy fsdp: no decoder layers found in {type(self.llm.base_model).__name__}")
        return units

    @property
    def workers(self) -> int:
        return 0  # batches come from the in-memory code cache

    def keeps(self, key: str) -> bool:
        return key in self._trained

    def cache(self, split: str) -> dict:
        if split not in self._caches:
            m = self.cfg.llm
            folder = Path(m.code_cache) if m.code_cache else Path(self.cfg.out) / "codes"
            key = tokenizer_fingerprint(self.tok) + "-" + data_fingerprint(self.cfg, split)
            ds = make_source(self.cfg, split)
            self._caches[split] = build_code_cache(
                ds,
                self.tok,
                folder / f"{split}.pt",
                key,
                batch_size=m.encode_batch,
                workers=self.cfg.data.workers,
                progress=self.progress,
            )
        return self._caches[split]

    def dataset(self):
        self.cache("val")  # every rank helps now; evaluation later runs on rank 0 alone
        return CachedPairs(self.cache("train"))

    def collate(self):
        return SequenceBuilder(self.llm, self.cfg.llm, seed=self.cfg.seed)

    def evaluate(self) -> dict[str, float]:
        m = self.cfg.llm
        data = CachedPairs(self.cache("val"))
        idx = [i for i in range(len(data)) if data[i] is not None][: max(m.eval_n, 0)]
        samples = [data[i] for i in idx]
        if not samples:
            return {}
        build = SequenceBuilder(self.llm, replace(m, loss_on="answers"), seed=self.cfg.seed)
        out: dict[str, float] = {}
        capd = [s for s in samples if s.caption is not None]
        qad = [s for s in samples if s.question is not None and s.answer is not None] if m.mode == "instruct" else []
        for kind, group in (("i2t", capd), ("t2i", capd), ("qa", qad)):
            if group:
                tot = cnt = 0.0
                for i in range(0, len(group), 16):
                    b = build.batch(group[i : i + 16], [kind] * len(group[i : i + 16]))
                    ce, target = self.module.token_losses(b)
                    tot, cnt = tot + float(ce.sum()), cnt + float((target != IGNORE).sum())
                out[f"val_{kind}_loss"] = tot / max(cnt, 1)
        llm = self.llm
        max_new = max((len(llm._text_ids(s.caption)) for s in capd), default=8) + 2
        hits = match = 0.0
        for i in range(0, len(capd), 16):
            group = capd[i : i + 16]
            codes = torch.stack([s.codes for s in group])
            preds = llm.caption(codes=codes, max_new_tokens=max_new)
            hits += sum(_norm(p) == _norm(s.caption) for p, s in zip(preds, group))
            gen = llm.generate_image_codes([s.caption for s in group])
            match += float((gen.cpu() == codes).float().mean(1).sum())
        if capd:
            out["val_caption_exact"] = hits / len(capd)
            out["val_code_match"] = match / len(capd)
        if qad:
            right = 0
            for i in range(0, len(qad), 16):
                group = qad[i : i + 16]
                preds = llm.answer(
                    codes=torch.stack([s.codes for s in group]), questions=[s.question for s in group], max_new_tokens=8
                )
                right += sum(_norm(p) == _norm(s.answer) for p, s in zip(preds, group))
            out["val_answer_exact"] = right / len(qad)
        return out

    def export(self, run: Path) -> None:
        """`run/llm`: a SeedLLM folder. A sharded model is gathered (every rank calls this) and rank 0
        writes it through an unsharded copy."""
        if not self.sharded:
            self.llm.tokenizer = self.tok
            try:
                self.llm.save_pretrained(run / "llm")
            finally:
                self.llm.tokenizer = None
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            copy = LLMModule(build_llm(self.cfg, self.tok))
            copy.llm.tokenizer = None
            copy.load_state_dict(full)
            copy.llm.tokenizer = self.tok
            copy.llm.save_pretrained(run / "llm")
        dist.barrier()


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())
