"""Decoding for SeedLLM: a static KV cache, prefill + one-token steps, and the sampling rules.

`KVDecoder` drives any transformers causal LM through a `transformers.StaticCache`: every decode
step has the same shapes (one token per row, a full-length attention mask), so the step can be
compiled once and replayed as a CUDA graph (`compile=True`, mode "reduce-overhead"). Prompts of
different lengths are left-padded; position ids come from the attention mask, as transformers'
`generate` computes them, so greedy tokens match `generate` (tests check it).
"""

from __future__ import annotations

import torch

from ..hf_compat import with_cache
from ..preprocess import InputError


class KVDecoder:
    """One batch of sequences decoded together: `prefill` once, then `step` per new token.

    max_len bounds prompt + generated tokens (the cache is allocated for it up front).
    """

    def __init__(self, model, *, max_len: int, compile: bool = False):
        from transformers import StaticCache

        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise InputError(f"prompt + new tokens = {max_len} exceeds the model's max_position_embeddings ({limit})")
        self.model = model
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.t = 0  # next cache position (shared by all rows: prompts are left-padded)
        self.mask: torch.Tensor | None = None  # (B, max_len) 1 where a real token sits
        self.pos: torch.Tensor | None = None  # (B,) position id of the last token fed
        self._step = self._forward_one
        if compile:
            self._step = torch.compile(self._forward_one, mode="reduce-overhead", dynamic=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward_one(self, tokens, mask, pos, cache_position):
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos,
            **with_cache(self.cache),
            cache_position=cache_position,
            use_cache=True,
        )
        return out.logits[:, -1].float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded prompts -> next-token logits (B, V) in fp32."""
        b, length = input_ids.shape
        if length >= self.max_len:
            raise InputError(f"prompt length {length} leaves no room in a cache of {self.max_len} tokens")
        dev = self.device
        self.mask = torch.zeros(b, self.max_len, dtype=torch.long, device=dev)
        self.mask[:, :length] = attention_mask.to(dev)
        pos = (self.mask[:, :length].cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids.to(dev),
            attention_mask=self.mask,
            position_ids=pos,
            **with_cache(self.cache),
            cache_position=torch.arange(length, device=dev),
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: a (B, L, V) tensor is wasted memory
        )
        self.t = length
        self.pos = pos[:, -1].clone()
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) -> next-token logits (B, V) in fp32."""
        if self.mask is None:
            raise RuntimeError("KVDecoder.step called before prefill")
        if self.t >= self.max_len:
            raise InputError(f"the KV cache is full ({self.max_len} tokens)")
        self.mask[:, self.t] = 1
        self.pos += 1
        cache_position = torch.full((1,), self.t, dtype=torch.long, device=self.mask.device)
        logits = self._step(tokens.view(-1, 1), self.mask, self.pos.view(-1, 1), cache_position)
        self.t += 1
        return logits.clone() if self._step is not self._forward_one else logits

    def reorder(self, index: torch.Tensor) -> None:
        """Rows <- rows[index] in place (beam search); keeps the cache's static addresses."""
        for layer in self.cache.layers:
            # a layer holds its tensors once the prefill has run; test them, not a flag some releases lack
            if isinstance(getattr(layer, "keys", None), torch.Tensor):
                layer.keys.copy_(layer.keys.index_select(0, index))
                layer.values.copy_(layer.values.index_select(0, index))
        self.mask.copy_(self.mask.index_select(0, index))
        self.pos.copy_(self.pos.index_select(0, index))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), both (B, max length), padded on the left."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, n - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, n - len(r) :] = 1
    return ids, mask


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not 0 < temperature < float("inf"):  # also refuses NaN
        raise InputError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must lie in (0, 1] (or None), got {top_p}")


def check_cfg_scale(cfg_scale: float) -> None:
    """Classifier-free guidance scale: finite and >= 1 (1 disables guidance). NaN would turn guidance off
    silently and inf would score every code NaN."""
    if not 1.0 <= cfg_scale < float("inf"):
        raise InputError(f"cfg_scale must be a finite number >= 1 (1 disables guidance), got {cfg_scale}")


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf.
    The most likely token always survives, so a row never ends up all -inf."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token indices: argmax (ties: lowest index) or a sample."""
    if not do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
