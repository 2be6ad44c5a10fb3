"""A torch-free runtime for the exported SEED stack: numpy + onnxruntime (+ `tokenizers` for text,
Pillow for image files). Nothing here imports torch.

    from seed_fast.export.runtime import SeedRuntime
    rt = SeedRuntime("onnx/")                       # written by `seed-fast export onnx`
    codes = rt.encode(images)                       # (B, 32) int64
    rt.caption(codes=codes); rt.answer(questions=["what color is the shape on the right?"], codes=codes)
    images = rt.generate_images(["one red circle left of a blue square"])   # (B, S, S, 3) float in [0, 1]

The methods carry the torch API's names and argument order: `encode` / `decode` as
SeedTokenizer's, `caption(images, prompt)`, `answer(images, questions)`, `generate_image_codes`,
`generate_images`, `encode_turn`, `generate_ids` as SeedLLM's. The names of 0.1 (`tokenize`,
`embed`, `generate_codes`, `text_to_image`) still work and warn.

Execution providers: TensorRT, then CUDA, then CPU, among those the installed onnxruntime offers
(onnxruntime-gpu brings the first two); `providers=[...]` overrides.
Greedy decoding only (what the parity tests pin down); the torch API adds sampling and beams.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from ..images import check_batch_shape, check_pixel_range, non_finite_pixels, pil_to_chw
from ..prompt import (
    IMAGE_PLACEHOLDER,
    ImageVocab,
    PromptError,
    check_codes_dtype,
    check_codes_range,
    check_codes_shape,
    encode_prompt,
    get_template,
    unconditional_ids,
)

MANIFEST = "seed_fast_onnx.json"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class RuntimeInputError(ValueError):
    """Bad input to the runtime, or a model folder it cannot use."""


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in have] or ["CPUExecutionProvider"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, attention mask), both int64 (B, longest), padded on the left."""
    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), n), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return ids, mask


class DDIM:
    """diffusers' DDIMScheduler (eta 0) from its exported config, in numpy."""

    def __init__(self, cfg: dict):
        if cfg.get("thresholding"):
            raise RuntimeInputError(
                "the exported scheduler uses dynamic thresholding, which this runtime does not implement"
            )
        if cfg.get("prediction_type") not in ("epsilon", "sample", "v_prediction"):
            raise RuntimeInputError(f"unknown scheduler prediction_type {cfg.get('prediction_type')!r}")
        self.cfg = cfg
        self.ac = np.asarray(cfg["alphas_cumprod"], dtype=np.float64)
        self.final = float(cfg["final_alpha_cumprod"])
        self.T = int(cfg["num_train_timesteps"])

    def timesteps(self, n: int) -> np.ndarray:
        if not 1 <= n <= self.T:
            raise RuntimeInputError(f"steps must lie in [1, {self.T}], got {n}")
        spacing, off = self.cfg.get("timestep_spacing", "leading"), int(self.cfg.get("steps_offset", 0))
        if spacing == "leading":
            return (np.arange(0, n) * (self.T // n)).round()[::-1].astype(np.int64) + off
        if spacing == "trailing":
            return np.round(np.arange(self.T, 0, -self.T / n)).astype(np.int64) - 1
        if spacing == "linspace":
            return np.linspace(0, self.T - 1, n).round()[::-1].astype(np.int64)
        raise RuntimeInputError(f"unknown timestep_spacing {spacing!r}")

    def step(self, out: np.ndarray, t: int, x: np.ndarray, n: int) -> np.ndarray:
        prev = t - self.T // n
        a_t = self.ac[t]
        a_prev = self.ac[prev] if prev >= 0 else self.final
        b_t = 1.0 - a_t
        kind = self.cfg["prediction_type"]
        if kind == "epsilon":
            x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
        elif kind == "sample":
            x0 = out
            eps = (x - a_t**0.5 * x0) / b_t**0.5
        else:
            x0 = a_t**0.5 * x - b_t**0.5 * out
            eps = a_t**0.5 * out + b_t**0.5 * x
        if self.cfg.get("clip_sample"):
            r = float(self.cfg.get("clip_sample_range", 1.0))
            x0 = np.clip(x0, -r, r)
        return (a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps).astype(np.float32)


def _read_manifest(man: Path) -> dict:
    """The export manifest, its outline checked: a damaged or hand-edited file is named, not a traceback."""
    try:
        data = json.loads(man.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RuntimeInputError(f"{man} is not valid JSON ({e}); export the model again") from None
    if not isinstance(data, dict):
        raise RuntimeInputError(f"{man} holds a JSON {type(data).__name__}, not the export manifest's object")
    if data.get("format") not in (1, 2):  # 1: seed_fast 0.1's names; 2: optimum's LLM layout
        raise RuntimeInputError(f"{man}: manifest format {data.get('format')!r}, this runtime reads formats 1 and 2")
    parts = data.get("parts", {})
    if not isinstance(parts, dict) or not all(
        isinstance(info, dict) and isinstance(info.get("file"), str) for info in parts.values()
    ):
        raise RuntimeInputError(f"{man}: `parts` must map each part to an object with a `file` name")
    return data


class SeedRuntime:
    """The exported parts of one model folder, each loaded on first use."""

    def __init__(self, folder: str | os.PathLike, *, providers: list[str] | None = None):
        self.folder = Path(folder)
        man = self.folder / MANIFEST
        if not self.folder.is_dir():
            raise RuntimeInputError(f"model folder {str(self.folder)!r} does not exist")
        if not man.is_file():
            raise RuntimeInputError(
                f"{self.folder} has no {MANIFEST}: export the model first (seed-fast export onnx --out {self.folder})"
            )
        self.manifest = _read_manifest(man)
        self.parts = self.manifest.get("parts", {})
        for part, info in self.parts.items():
            if not (self.folder / info["file"]).is_file():
                raise RuntimeInputError(
                    f"{self.folder}: the manifest lists {info['file']} for part {part!r} but the file is missing"
                )
        if providers:
            import onnxruntime as ort

            have = ort.get_available_providers()
            missing = [name for name in providers if name not in have]
            if missing:
                raise RuntimeInputError(
                    f"onnxruntime provider(s) {missing} are not available in this onnxruntime (it has {have}); "
                    "onnxruntime-gpu brings CUDA and TensorRT"
                )
        self.providers = list(providers) if providers else default_providers()
        self._sessions: dict = {}
        self._text = None
        self._ddim = None

    # ------------------------------------------------------------------------------------ plumbing
    def _need(self, part: str) -> dict:
        if part not in self.parts:
            raise RuntimeInputError(
                f"{self.folder} has no exported {part!r} (has {sorted(self.parts)}): "
                f"seed-fast export onnx --part {part} --out {self.folder}"
            )
        return self.parts[part]

    def session(self, part: str, key: str = "file"):
        """The onnxruntime session of a part's file (`key`: the manifest entry naming it)."""
        name = part if key == "file" else f"{part}:{key}"
        if name not in self._sessions:
            import onnxruntime as ort

            path = self.folder / self._need(part)[key]
            if not path.is_file():
                raise RuntimeInputError(f"{self.folder}: the manifest lists {path.name} but the file is missing")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            # idle worker threads must not spin: they would steal the cores from the caller's own work
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[name] = ort.InferenceSession(str(path), opts, providers=self.providers)
        return self._sessions[name]

    @property
    def active_providers(self) -> list[str]:
        """The providers the loaded sessions really run on, in order (onnxruntime assigns each node to
        the first provider that can run it; these are the ones it kept). Empty before any part loads."""
        seen: list[str] = []
        for sess in self._sessions.values():
            for name in sess.get_providers():
                if name not in seen:
                    seen.append(name)
        return seen

    @property
    def text_tokenizer(self):
        if self._text is None:
            info = self._need("llm")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise RuntimeInputError("text needs the `tokenizers` package: pip install tokenizers") from None
            self._text = Tokenizer.from_file(str(self.folder / info["text_tokenizer"]))
        return self._text

    # ------------------------------------------------------------------------------------ images
    def _images(self, images) -> np.ndarray:
        info = self._need("tokenizer")
        s, want = info["image_size"], info["image_dtype"]
        if isinstance(images, (list, tuple)):
            if not images:
                raise RuntimeInputError("images is an empty list")
            arrs = [self._load_image(im, s, i) for i, im in enumerate(images)]
            x = np.stack(arrs)  # uint8 (B, 3, S, S)
        else:
            x = np.asarray(images) if not isinstance(images, np.ndarray) else images
            check_batch_shape(x.shape, RuntimeInputError)
            if x.dtype == np.uint8:
                pass
            elif x.dtype in (np.float16, np.float32, np.float64):
                finite = np.isfinite(x)
                if not finite.all():
                    items = np.flatnonzero(~finite.reshape(len(x), -1).all(1)).tolist()
                    raise non_finite_pixels(int((~finite).sum()), items, RuntimeInputError)
                check_pixel_range(float(x.min()), float(x.max()), RuntimeInputError)
                x = np.clip(x.astype(np.float32), 0.0, 1.0)
            else:
                raise RuntimeInputError(f"images must be uint8 or float, got dtype {x.dtype}")
            if x.shape[2:] != (s, s):
                if x.dtype != np.uint8:
                    x = np.round(x * 255.0).astype(np.uint8)
                x = np.stack([self._resize(a, s) for a in x])
        if want == "uint8":
            if x.dtype != np.uint8:
                x = np.round(x * 255.0).astype(np.uint8)
        elif x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        return np.ascontiguousarray(x)

    @staticmethod
    def _resize(chw: np.ndarray, s: int) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.fromarray(chw.transpose(1, 2, 0)).resize((s, s), Image.BICUBIC)).transpose(2, 0, 1)

    @staticmethod
    def _load_image(im, s: int, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if isinstance(im, (str, os.PathLike)):
            if not Path(im).is_file():
                raise RuntimeInputError(f"images[{i}]: no such file {str(im)!r}")
            try:
                with Image.open(im) as f:
                    return pil_to_chw(f, s, f"images[{i}]", RuntimeInputError)
            except (UnidentifiedImageError, OSError) as e:  # not an image, or a truncated one
                raise RuntimeInputError(f"images[{i}]: cannot read {str(im)!r} as an image: {e}") from None
        if not isinstance(im, Image.Image):
            raise RuntimeInputError(f"images[{i}] is a {type(im).__name__}; a list must hold PIL images or file paths")
        return pil_to_chw(im, s, f"images[{i}]", RuntimeInputError)

    def _codes(self, codes) -> np.ndarray:
        info = self.parts.get("detokenizer") or self.parts.get("tokenizer") or {}
        llm = self.parts.get("llm", {}).get("image_vocab", {})
        n = info.get("num_codes", llm.get("tokens_per_image", 32))
        k = info.get("codebook_size", llm.get("num_codes"))
        c = np.asarray(codes)
        check_codes_dtype(c.dtype, c.dtype.kind in "iu", RuntimeInputError)
        check_codes_shape(c.shape, n, RuntimeInputError)
        if k is not None:
            check_codes_range(
                int(c.min()), int(c.max()), k, lambda: np.argwhere((c < 0) | (c >= k))[0], RuntimeInputError
            )
        return c.astype(np.int64)

    # ------------------------------------------------------------------------------------ tokenizer
    def encode(self, images) -> np.ndarray:
        """Images (list of PIL images / paths, or (B, 3, H, W) uint8 or float in [0, 1]) -> codes (B, 32)
        int64, as SeedTokenizer.encode."""
        return self.session("tokenizer").run(None, {"images": self._images(images)})[0]

    def decode(self, codes) -> np.ndarray:
        """Codes (B, 32) -> generation embeddings (B, D) float32, as SeedTokenizer.decode."""
        return self.session("detokenizer").run(None, {"codes": self._codes(codes)})[0]

    def tokenize(self, images) -> np.ndarray:
        """The 0.1 name of `encode`."""
        _renamed("tokenize", "encode")
        return self.encode(images)

    def embed(self, codes) -> np.ndarray:
        """The 0.1 name of `decode`."""
        _renamed("embed", "decode")
        return self.decode(codes)

    # ------------------------------------------------------------------------------------ LLM
    @property
    def _llm(self) -> dict:
        return self._need("llm")

    def _text_ids(self, text: str) -> list[int]:
        return self.text_tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode_turn(self, text: str, codes=None, *, chat: bool = True) -> list[int]:
        """A prompt with `<image>` placeholders (one per row of codes) -> token ids, as SeedLLM.encode_turn."""
        info = self._llm
        try:
            return encode_prompt(
                text,
                codes,
                template=get_template(info["template"]),
                vocab=ImageVocab(**info["image_vocab"]),
                text_ids=self._text_ids,
                bos_id=info["bos_id"],
                chat=chat,
            )
        except PromptError as e:
            raise RuntimeInputError(str(e)) from None

    def _past(self, batch: int) -> dict[str, np.ndarray]:
        info = self._llm
        dt = np.float16 if info["kv_dtype"] == "float16" else np.float32
        empty = np.zeros((batch, info["kv_heads"], 0, info["head_dim"]), dtype=dt)
        return {name: empty for name in info["inputs"][3:]}

    def _lm_step(self, ids, mask, pos, past) -> tuple[np.ndarray, dict]:
        """One LM call -> (last position's logits (B, V), the next call's past)."""
        out = self.session("llm").run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
        # the cache's outputs, in the order of its inputs (optimum's present.i.key -> past_key_values.i.key)
        present = dict(zip(self._llm["inputs"][3:], out[1:]))
        logits = out[0]
        return (logits[:, -1] if logits.ndim == 3 else logits), present

    def _prefill(self, rows: list[list[int]], new_tokens: int):
        """Left-padded ids, mask and positions; refuses prompts that leave no room for new_tokens within
        the model's positions (as SeedLLM does)."""
        ids, mask = left_pad(rows, self._llm["pad_id"] if self._llm["pad_id"] is not None else 0)
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        limit = self._llm.get("max_positions")
        if limit is not None and ids.shape[1] + new_tokens > limit:
            raise RuntimeInputError(
                f"prompt + new tokens = {ids.shape[1] + new_tokens} exceeds the model's {limit} positions"
            )
        return ids, mask, pos

    def generate_ids(
        self, rows: list[list[int]], *, max_new_tokens: int = 32, suppress_image_tokens: bool = True
    ) -> list[list[int]]:
        """Greedy text continuation of token-id prompts (stops after EOS), through the KV-cache graph."""
        if not rows or any(len(r) == 0 for r in rows):
            raise RuntimeInputError("generate_ids needs at least one non-empty prompt")
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        info = self._llm
        voc = info["image_vocab"]
        ids, mask, pos = self._prefill(rows, max_new_tokens)
        logits, past = self._lm_step(ids, mask, pos, self._past(len(rows)))
        eos = info["eos_id"]
        out = np.zeros((len(rows), max_new_tokens), dtype=np.int64)
        done = np.zeros(len(rows), dtype=bool)
        last = pos[:, -1:]
        n = 0
        for t in range(max_new_tokens):
            if suppress_image_tokens:
                logits[:, voc["base"] : voc["base"] + voc["num_codes"] + 2] = -np.inf
            tok = logits.argmax(-1)
            out[:, t] = tok
            n = t + 1
            if eos is not None:
                done |= tok == eos
            if done.all() or t == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], 1)
            last = last + 1
            logits, past = self._lm_step(tok[:, None].astype(np.int64), mask, last, past)
        result = []
        for row in out[:, :n].tolist():
            cut = next((i for i, x in enumerate(row) if x == eos), None)
            result.append(row[: cut + 1] if cut is not None else row)
        return result

    def _decode(self, rows: list[list[int]]) -> list[str]:
        return [self.text_tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]

    def _image_codes(self, images, codes) -> np.ndarray:
        if (images is None) == (codes is None):
            raise RuntimeInputError("give images or codes (exactly one)")
        return self.encode(images) if images is not None else self._codes(codes)

    def caption(self, images=None, prompt: str | None = None, *, codes=None, max_new_tokens: int = 32) -> list[str]:
        """One caption per image (greedy), as SeedLLM.caption."""
        c = self._image_codes(images, codes)
        turn = self._llm["template"]["caption"] if prompt is None else prompt
        if IMAGE_PLACEHOLDER not in turn:
            turn = IMAGE_PLACEHOLDER + turn
        rows = [self.encode_turn(turn, c[i : i + 1]) for i in range(len(c))]
        return self._decode(self.generate_ids(rows, max_new_tokens=max_new_tokens))

    def answer(self, images=None, questions=None, *, codes=None, max_new_tokens: int = 32) -> list[str]:
        """questions[i] about image i (one string: asked of every image), as SeedLLM.answer: images
        first (0.1 took the questions first)."""
        if questions is None:
            raise RuntimeInputError("give the questions: answer(images, questions) or answer(questions=..., codes=...)")
        c = self._image_codes(images, codes)
        if isinstance(questions, str):
            questions = [questions] * len(c)
        if len(questions) != len(c):
            raise RuntimeInputError(f"{len(c)} image(s) but {len(questions)} question(s)")
        tpl = self._llm["template"]["answer"]
        rows = [
            self.encode_turn(q if IMAGE_PLACEHOLDER in q else tpl.format(question=q), c[i : i + 1])
            for i, q in enumerate(questions)
        ]
        return self._decode(self.generate_ids(rows, max_new_tokens=max_new_tokens))

    def generate_codes(self, texts, *, cfg_scale: float = 1.0) -> np.ndarray:
        """The 0.1 name of `generate_image_codes`."""
        _renamed("generate_codes", "generate_image_codes")
        return self.generate_image_codes(texts, cfg_scale=cfg_scale)

    def generate_image_codes(self, texts, *, cfg_scale: float = 1.0) -> np.ndarray:
        """Texts -> (B, 32) image codes, greedy over the image vocabulary only; cfg_scale > 1 adds
        LLM-side classifier-free guidance against the prompt `<img>` alone. As
        SeedLLM.generate_image_codes."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise RuntimeInputError("texts must be a non-empty list of non-empty strings")
        if not 1.0 <= cfg_scale < float("inf"):  # NaN and inf too
            raise RuntimeInputError(f"cfg_scale must be a finite number >= 1, got {cfg_scale}")
        info = self._llm
        voc, tpl = ImageVocab(**info["image_vocab"]), get_template(info["template"])
        lo, hi = voc.base, voc.base + voc.num_codes
        rows = [self.encode_turn(tpl.generate.format(text=t)) + [voc.boi] for t in texts]
        guided = cfg_scale > 1.0
        if guided:
            rows += [unconditional_ids(tpl, voc, info["bos_id"])] * len(texts)
        ids, mask, pos = self._prefill(rows, voc.tokens_per_image)
        logits, past = self._lm_step(ids, mask, pos, self._past(len(rows)))
        b, n_tok = len(texts), voc.tokens_per_image
        codes = np.zeros((b, n_tok), dtype=np.int64)
        last = pos[:, -1:]
        for t in range(n_tok):
            scores = logits[:, lo:hi]
            if guided:
                cond, uncond = scores[:b], scores[b:]
                scores = uncond + cfg_scale * (cond - uncond)
            tok = scores.argmax(-1)
            codes[:, t] = tok
            if t < n_tok - 1:
                step = np.concatenate([tok, tok]) if guided else tok
                mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], 1)
                last = last + 1
                logits, past = self._lm_step((step + lo)[:, None].astype(np.int64), mask, last, past)
        return codes

    # ------------------------------------------------------------------------------------ decoder
    def render(
        self,
        embeddings,
        *,
        steps: int = 20,
        guidance: float = 1.5,
        seed: int = 0,
        noise=None,
        negative=None,
        **unclip_kwargs,
    ) -> np.ndarray:
        """Generation embeddings (B, D) -> images (B, S, S, 3) float32 in [0, 1] through the
        exported UNet and a numpy DDIM loop. noise: the starting sample (B, C, S, S) (default: a
        seeded numpy normal draw). guidance > 1 uses `negative` (B, D) or the decoder's zero null; the
        default, 1.5, is the embedded decoder's (its generation.json, which this module does not read).
        A Stable unCLIP decoder also takes noise_level (default 0) and embed_noise (B, D): the
        noise of the embedding's augmentation (default: the next draw of the same seeded generator)."""
        info = self._need("decoder")
        if self._ddim is None:
            self._ddim = DDIM(info["scheduler"])
        e = np.asarray(embeddings, dtype=np.float32)
        # a latent decoder's loop runs on latent_size latents; a pixel decoder's on the image itself
        d, c, s = info["embed_dim"], info["in_channels"], info.get("latent_size", info["image_size"])
        if e.ndim != 2 or e.shape[1] != d or e.shape[0] == 0:
            raise RuntimeInputError(f"embeddings must be (B, {d}), got shape {e.shape}")
        if not np.isfinite(e).all():
            raise RuntimeInputError("embeddings contain NaN/inf")
        if info.get("kind") == "unclip":
            return self._render_unclip(
                info, e, steps=steps, guidance=guidance, seed=seed, noise=noise, negative=negative, **unclip_kwargs
            )
        if unclip_kwargs:
            raise RuntimeInputError(f"{sorted(unclip_kwargs)}: only a Stable unCLIP decoder takes these")
        b = e.shape[0]
        if noise is None:
            x = np.random.default_rng(seed).standard_normal((b, c, s, s)).astype(np.float32)
        else:
            x = np.asarray(noise, dtype=np.float32)
            if x.shape != (b, c, s, s):
                raise RuntimeInputError(f"noise must have shape {(b, c, s, s)}, got {x.shape}")
        use_cfg = guidance > 1.0
        if use_cfg:
            neg = np.zeros_like(e) if negative is None else np.asarray(negative, dtype=np.float32)
            if neg.shape != e.shape:
                raise RuntimeInputError(f"negative must have shape {e.shape}, got {neg.shape}")
            e = np.concatenate([neg, e])
        sess = self.session("decoder")
        for t in self._ddim.timesteps(steps):
            inp = np.concatenate([x, x]) if use_cfg else x
            out = sess.run(None, {"sample": inp, "timestep": np.full(len(inp), t, np.int64), "embedding": e})[0]
            if use_cfg:
                uncond, cond = out[:b], out[b:]
                out = uncond + guidance * (cond - uncond)
            x = self._ddim.step(out, int(t), x, steps)
        if info.get("vae_file"):
            x = self.session("decoder", "vae_file").run(None, {"latents": x})[0]
        return np.clip(x.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)

    def _render_unclip(
        self,
        info: dict,
        e: np.ndarray,
        *,
        steps: int,
        guidance: float,
        seed: int,
        noise,
        negative,
        noise_level: int = 0,
        embed_noise=None,
    ) -> np.ndarray:
        """StableUnCLIPImg2ImgPipeline's loop (empty prompt, DDIM eta 0) over the exported UNet and VAE."""
        b, d = e.shape
        c, h = info["in_channels"], info["latent_size"]
        ac = np.asarray(info["noising_alphas_cumprod"], dtype=np.float64)
        if not 0 <= noise_level < len(ac):
            raise RuntimeInputError(f"noise_level must lie in [0, {len(ac)}), got {noise_level}")
        rng = np.random.default_rng(seed)
        if noise is None:
            x = rng.standard_normal((b, c, h, h)).astype(np.float32)
        else:
            x = np.asarray(noise, dtype=np.float32)
            if x.shape != (b, c, h, h):
                raise RuntimeInputError(f"noise must have shape {(b, c, h, h)}, got {x.shape}")
        if embed_noise is None:
            embed_noise = rng.standard_normal((b, d)).astype(np.float32)
        embed_noise = np.asarray(embed_noise, dtype=np.float32)
        if embed_noise.shape != (b, d):
            raise RuntimeInputError(f"embed_noise must have shape {(b, d)}, got {embed_noise.shape}")
        labels = unclip_class_labels(e, embed_noise, noise_level, info, ac)
        use_cfg = guidance > 1.0
        prompt = self._unclip_prompt(info)
        states = np.repeat(prompt["positive"], b, axis=0)
        if use_cfg:
            if negative is None:
                neg = np.zeros_like(labels)  # diffusers' unconditional half: zeros for the whole class label
            else:
                neg_e = np.asarray(negative, dtype=np.float32)
                if neg_e.shape != e.shape:
                    raise RuntimeInputError(f"negative must have shape {e.shape}, got {neg_e.shape}")
                neg = unclip_class_labels(neg_e, rng.standard_normal((b, d)).astype(np.float32), noise_level, info, ac)
            labels = np.concatenate([neg, labels])
            states = np.concatenate([np.repeat(prompt["negative"], b, axis=0), states])
        sess = self.session("decoder")
        for t in self._ddim.timesteps(steps):
            inp = np.concatenate([x, x]) if use_cfg else x
            out = sess.run(
                None,
                {
                    "sample": inp,
                    "timestep": np.full(len(inp), t, np.int64),
                    "encoder_hidden_states": states,
                    "class_labels": labels,
                },
            )[0]
            if use_cfg:
                uncond, cond = out[:b], out[b:]
                out = uncond + guidance * (cond - uncond)
            x = self._ddim.step(out, int(t), x, steps)
        images = self.session("decoder", "vae_file").run(None, {"latents": x})[0]
        return np.clip(images.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)

    def _unclip_prompt(self, info: dict) -> dict:
        path = self.folder / info["prompt_file"]
        if not path.is_file():
            raise RuntimeInputError(f"{self.folder}: the manifest lists {info['prompt_file']} but the file is missing")
        with np.load(path) as z:
            return {"positive": z["positive"].astype(np.float32), "negative": z["negative"].astype(np.float32)}

    def generate_images(self, texts, *, cfg_scale: float = 1.0, **render_kwargs) -> np.ndarray:
        """Texts -> codes -> embeddings -> images (B, S, S, 3) in [0, 1], as SeedLLM.generate_images
        (which returns PIL images; `to_pil` converts)."""
        return self.render(self.decode(self.generate_image_codes(texts, cfg_scale=cfg_scale)), **render_kwargs)

    def text_to_image(self, texts, *, cfg_scale: float = 1.0, **render_kwargs) -> np.ndarray:
        """The 0.1 name of `generate_images`."""
        _renamed("text_to_image", "generate_images")
        return self.generate_images(texts, cfg_scale=cfg_scale, **render_kwargs)


def _renamed(old: str, new: str) -> None:
    warnings.warn(
        f"SeedRuntime.{old} is now SeedRuntime.{new} (the torch API's name); {old} will be removed",
        DeprecationWarning,
        stacklevel=3,
    )


def timestep_embedding(t: np.ndarray, dim: int, max_period: float = 10000.0) -> np.ndarray:
    """diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0 (cos first)."""
    half = dim // 2
    # float32 in torch's order of operations, so that large arguments round the same way
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent).astype(np.float32)
    arg = np.asarray(t, dtype=np.float32)[:, None] * freqs[None]
    emb = np.concatenate([np.cos(arg), np.sin(arg)], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def unclip_class_labels(e: np.ndarray, noise: np.ndarray, level: int, info: dict, ac: np.ndarray) -> np.ndarray:
    """StableUnCLIPImg2ImgPipeline.noise_image_embeddings in numpy: normalize, noise to `level`,
    unnormalize, then append the level's timestep embedding -> (B, 2D)."""
    mean = np.asarray(info["normalizer_mean"], dtype=np.float32)
    std = np.asarray(info["normalizer_std"], dtype=np.float32)
    z = (e - mean) / std
    z = (np.sqrt(ac[level]) * z + np.sqrt(1.0 - ac[level]) * noise).astype(np.float32)
    z = z * std + mean
    return np.concatenate([z, timestep_embedding(np.full(len(e), level), e.shape[1])], axis=1).astype(np.float32)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in images]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="seed-fast ort-run", description="run an exported SEED stack with onnxruntime (no torch)"
    )
    p.add_argument("--model", required=True, metavar="DIR", help="a folder written by `seed-fast export onnx`")
    p.add_argument("images", nargs="*", help="image files: print codes and captions")
    p.add_argument("--question", help="also answer this question about each image")
    p.add_argument("--generate", nargs="+", metavar="TEXT", help="prompts to draw (PNG files in --out)")
    p.add_argument("--out", default="ort_out", help="folder for generated images (default: ort_out)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument(
        "--guidance", type=float, default=1.5, help="decoder guidance scale (default: 1.5, the embedded decoder's)"
    )
    p.add_argument(
        "--providers",
        nargs="+",
        help=f"onnxruntime providers (default: the first available of {list(PREFERRED_PROVIDERS)})",
    )
    args = p.parse_args(argv)
    try:
        rt = SeedRuntime(args.model, providers=args.providers)
        if args.images:
            codes = rt.encode(list(args.images))
            caps = rt.caption(codes=codes) if "llm" in rt.parts else [None] * len(codes)
            answers = (
                rt.answer(questions=args.question, codes=codes)
                if args.question and "llm" in rt.parts
                else [None] * len(codes)
            )
            for path, c, cap, ans in zip(args.images, codes, caps, answers):
                print(f"{path}: codes {' '.join(map(str, c.tolist()))}")
                if cap is not None:
                    print(f"  caption: {cap}")
                if ans is not None:
                    print(f"  answer: {ans}")
        if args.generate:
            imgs = rt.generate_images(args.generate, steps=args.steps, guidance=args.guidance)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for i, (text, im) in enumerate(zip(args.generate, to_pil(imgs))):
                path = out / f"generated_{i}.png"
                im.save(path)
                print(f"{text!r} -> {path}")
        if not args.images and not args.generate:
            p.error("give image files and/or --generate TEXT")
        print(f"providers used: {rt.active_providers}")
    except RuntimeInputError as e:
        print(f"seed-fast ort-run: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
