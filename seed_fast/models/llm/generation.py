"""Generation for `SeedLLM`, apart from the model class: the pool of static-cache decoders, eval mode
while generating, the text decoding loop, and the image-code loop (sampling, beam search, LLM-side
classifier-free guidance). `SeedLLM` validates inputs and builds the prompts; these run them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

from ..preprocess import InputError
from .decoding import KVDecoder, pick


class DecoderPool:
    """Static-cache decoders of one model, kept idle between calls by (batch, cache length).

    A call takes one out for its own use (`take`), so calls from several threads never share a cache;
    it goes back to the pool when the call ends. `drop()` forgets every idle decoder and those in use
    when their calls end (the model changed). compile: new decoders compile their one-token step.
    """

    def __init__(self, *, max_idle: int = 4, bucket: int = 64):
        self.max_idle = max_idle  # each idle decoder holds a full-length KV cache
        self.bucket = bucket  # cache lengths are rounded up to it, so a compiled step is reused
        self.compile = False
        self._idle: dict[tuple[int, int], list[KVDecoder]] = {}
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by drop(): decoders of an older epoch are not kept

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy of a SeedLLM, pickling) starts empty: idle decoders hold caches and
        # compiled steps bound to the original model, and the lock cannot be copied
        return {"max_idle": self.max_idle, "bucket": self.bucket, "compile": self.compile}

    def __setstate__(self, state: dict) -> None:
        self.__init__(max_idle=state["max_idle"], bucket=state["bucket"])
        self.compile = state["compile"]

    @property
    def num_idle(self) -> int:
        with self._lock:
            return sum(map(len, self._idle.values()))

    @contextlib.contextmanager
    def take(self, model: nn.Module, batch: int, max_len: int) -> Iterator[KVDecoder]:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise InputError(f"prompt + new tokens = {max_len} exceeds the model's max_position_embeddings ({limit})")
        max_len = -(-max_len // self.bucket) * self.bucket
        if limit is not None:
            max_len = min(max_len, limit)
        key = (batch, max_len)
        with self._lock:
            idle = self._idle.get(key)
            dec = idle.pop() if idle else None
            epoch = self._epoch
        if dec is None:
            dec = KVDecoder(model, max_len=max_len, compile=self.compile)
        else:
            dec.cache.reset()
        try:
            yield dec
        finally:
            with self._lock:
                if epoch == self._epoch:
                    if sum(map(len, self._idle.values())) >= self.max_idle:
                        self._idle.clear()
                    self._idle.setdefault(key, []).append(dec)

    def drop(self) -> None:
        with self._lock:
            self._idle.clear()
            self._epoch += 1


_EVAL_LOCK = threading.Lock()
_EVAL_CALLS: dict[int, tuple[int, bool]] = {}  # id(model) -> (generations running, mode before the first)


class eval_mode:
    """Eval mode for the duration of a generation (dropout off), restoring the previous mode when the
    last of the generations running at once (from several threads) ends."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        with _EVAL_LOCK:
            calls, was_training = _EVAL_CALLS.get(id(self.model), (0, self.model.training))
            _EVAL_CALLS[id(self.model)] = (calls + 1, was_training)
            self.model.eval()

    def __exit__(self, *exc):
        with _EVAL_LOCK:
            calls, was_training = _EVAL_CALLS.pop(id(self.model))
            if calls > 1:
                _EVAL_CALLS[id(self.model)] = (calls - 1, was_training)
            else:
                self.model.train(was_training)


def decode_text(
    dec: KVDecoder,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stops: set[int],
    masked: tuple[int, int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Left-padded prompts -> new tokens per row, up to max_new_tokens, each row cut after its first
    stop token. masked: a [lo, hi) id range never picked (the image vocabulary, for a text answer)."""
    logits = dec.prefill(ids, mask)
    rows = ids.shape[0]
    out = torch.empty(rows, max_new_tokens, dtype=torch.long, device=dec.device)
    done = torch.zeros(rows, dtype=torch.bool, device=dec.device)
    stop_t = torch.tensor(sorted(stops), dtype=torch.long, device=dec.device)
    n = 0
    for t in range(max_new_tokens):
        if masked is not None:
            logits[:, masked[0] : masked[1]] = float("-inf")
        tok = pick(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        out[:, t] = tok
        n = t + 1
        done |= torch.isin(tok, stop_t)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = dec.step(tok)
    result = []
    for row in out[:, :n].tolist():
        cut = next((i for i, x in enumerate(row) if x in stops), None)
        result.append(row[: cut + 1] if cut is not None else row)
    return result


def decode_image_codes(
    dec: KVDecoder,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    prompts: int,
    code_ids: tuple[int, int],
    num_codes: int,
    num_beams: int = 1,
    cfg_scale: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompts ending with `<img>` (each repeated num_beams times, then, when cfg_scale > 1, as many
    unconditional rows) -> (prompts, num_codes) codes: decoding sees only the image ids [lo, hi), for
    exactly num_codes steps. cfg_scale > 1: logits = u + s * (c - u). num_beams > 1: beam search on
    the (guided) log-probabilities, the best beam returned."""
    b, nb, (lo, hi) = prompts, num_beams, code_ids
    guided = cfg_scale > 1.0
    logits = dec.prefill(ids, mask)
    dev = dec.device
    codes = torch.zeros(b * nb, num_codes, dtype=torch.long, device=dev)
    beam_scores = torch.zeros(b, nb, device=dev)
    beam_scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first
    for t in range(num_codes):
        scores = logits[:, lo:hi]
        if guided:
            cond, uncond = scores.chunk(2)
            scores = uncond + cfg_scale * (cond - uncond)
        if nb == 1:
            tok = pick(
                scores, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
        else:
            logp = torch.log_softmax(scores / temperature, -1).view(b, nb, -1)
            total = (beam_scores[..., None] + logp).view(b, -1)
            beam_scores, flat = total.topk(nb, dim=-1)  # (B, nb), best first
            src = (flat // logp.shape[-1] + torch.arange(b, device=dev)[:, None] * nb).view(-1)
            tok = (flat % logp.shape[-1]).view(-1)
            codes = codes.index_select(0, src)
            if t < num_codes - 1:
                dec.reorder(torch.cat([src, src + b * nb]) if guided else src)
        codes[:, t] = tok
        if t < num_codes - 1:
            step_tok = tok + lo
            logits = dec.step(torch.cat([step_tok, step_tok]) if guided else step_tok)
    return codes.view(b, nb, num_codes)[:, 0]
