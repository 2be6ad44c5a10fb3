"""Decoder stage: train the diffusion decoder on generation embeddings from codes.

unCLIP's decoder is trained on CLIP image embeddings and SEED feeds it the embedding its
de-tokenizer rebuilds from 32 codes. The embedded model's decoder is small enough to be trained on
exactly what it will receive: image -> frozen tokenizer -> codes -> generation embedding, and the
target is the same image at `decoder.image_size` pixels (in [-1, 1]). With probability
`decoder.null_prob` the embedding is replaced by zeros, the null that classifier-free guidance uses.
With `decoder.vae` (a vae stage's `vae/` folder) the UNet learns the frozen autoencoder's scaled latents
of that image instead, and the saved pipeline holds the autoencoder too.

    seed-fast train decoder --config run.json     (tokenizer: a stage-II tokenizer folder)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.preprocess import normalize
from .config import ConfigError, TrainConfig
from .data import make_collate
from .sources import make_source
from .task import Task, load_tokenizer


def embeddings_from_pixels(tok, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, S, S) in [0, 1] -> generation embeddings through the codes (B, D), float32."""

    x = normalize(pixels.to(tok.device), tok.config.image_mean, tok.config.image_std).to(tok.dtype)
    codes = tok.quantizer.lookup(tok.causal_embeddings(x))
    return tok.generation_embedding(codes).float()


def decoder_targets(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """pixels in [0, 1] -> the decoder's training images at `size` in [-1, 1] (area down-sampling)."""
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="area")
    return pixels.float() * 2 - 1


class EmbeddingCache:
    """Generation embeddings of training samples, computed once: the decoder stage's tokenizer is
    frozen and in eval mode, so a sample's embedding is the same in every epoch. Entries are keyed by
    the sample's key and checked against a fingerprint of its pixels (a fixed random projection), so
    two sources that reuse a key cannot swap embeddings. Holds at most `limit` samples; later ones are
    computed every time."""

    def __init__(self, limit: int, compute=None):
        self.limit = int(limit)
        # (tok, pixels) -> (B, K) float32 rows to keep; default: the generation embeddings
        self.compute = compute or embeddings_from_pixels
        self.entries: dict[str, tuple[float, torch.Tensor]] = {}
        self._probe: torch.Tensor | None = None
        self.hits = self.misses = 0

    def _fingerprints(self, pixels: torch.Tensor) -> list[float]:
        flat = pixels.reshape(pixels.shape[0], -1).double().cpu()
        if self._probe is None or self._probe.numel() != flat.shape[1]:
            self._probe = torch.rand(flat.shape[1], generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        return (flat @ self._probe).tolist()

    def __call__(self, tok, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self.limit <= 0:
            return self.compute(tok, pixels)
        prints = self._fingerprints(pixels)
        rows: list[torch.Tensor | None] = []
        for key, fp in zip(keys, prints):
            hit = self.entries.get(key)
            # float64 sums of 10^4 terms: equal up to the summation order, which may follow the batch
            rows.append(hit[1] if hit is not None and abs(hit[0] - fp) <= 1e-9 * (1 + abs(fp)) else None)
        todo = [i for i, r in enumerate(rows) if r is None]
        self.hits += len(rows) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.compute(tok, pixels[todo])
            for j, i in enumerate(todo):
                rows[i] = fresh[j]
                if len(self.entries) < self.limit or keys[i] in self.entries:
                    self.entries[keys[i]] = (prints[i], fresh[j].detach().clone())
        return torch.stack(rows)


class DecoderModule(nn.Module):
    def __init__(self, tok, pipe, dcfg):
        super().__init__()
        self.tok, self.unet, self.dcfg = tok, pipe.unet, dcfg
        self.pipe = pipe
        # a latent decoder keeps each sample's latents (the autoencoder is frozen too) beside its embedding
        self.embeddings = EmbeddingCache(
            dcfg.embedding_cache, self._embedding_and_sample if pipe.vae is not None else None
        )
        # the exponential moving average of the UNet's weights (decoder.ema > 0): checkpointed with the
        # run, used for evaluation and export
        self.ema_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval() if dcfg.ema > 0 else None

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """ema = decay * ema + (1 - decay) * weights, decay warming up as (1 + step) / (10 + step)."""
        if self.ema_unet is None:
            return
        decay = min(self.dcfg.ema, (1 + step) / (10 + step))
        for e, p in zip(self.ema_unet.parameters(), self.unet.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def _embedding_and_sample(self, tok, pixels: torch.Tensor) -> torch.Tensor:
        emb = embeddings_from_pixels(tok, pixels)
        samples = self.pipe.encode_images(decoder_targets(pixels, self.dcfg.image_size).to(emb.device)).float()
        return torch.cat([emb, samples.flatten(1)], dim=1)

    def embeddings_and_samples(self, pixels: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation embeddings (B, D) and the clean samples the UNet learns (pixels in [-1, 1], or the
        autoencoder's scaled latents), from the cache where it holds them."""
        rows = self.embeddings(self.tok, pixels, keys)
        if self.pipe.vae is None:
            return rows, decoder_targets(pixels, self.dcfg.image_size).to(rows.device)
        d, c, size = self.pipe.image_embedding_dim, self.pipe.sample_channels, self.pipe.sample_size
        return rows[:, :d], rows[:, d:].reshape(-1, c, size, size)

    def inference_pipe(self):
        """The pipeline evaluation and export use: the EMA weights when there are some."""
        if self.ema_unet is None:
            return self.pipe
        from ..models.decoders.image_decoder import SeedImageDecoderPipeline

        pipe = SeedImageDecoderPipeline(unet=self.ema_unet, scheduler=self.pipe.scheduler, vae=self.pipe.vae)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def forward(self, batch) -> dict:
        from ..models.decoders.image_decoder import decoder_training_loss

        if len(batch) == 0:
            zero = sum(p.sum() * 0 for p in self.unet.parameters())
            return {"loss": zero}
        # the frozen tokenizer runs in full precision even under bf16 autocast (`precision: bf16`): the
        # decoder is conditioned on what inference gives it, and the cache keeps one exact copy
        with torch.no_grad(), torch.autocast(batch.pixels.device.type, enabled=False):
            emb, images = self.embeddings_and_samples(batch.pixels, batch.keys)
        # timesteps, noise and nulls from torch's global generator: the loop checkpoints it, so a resumed
        # run draws exactly what the uninterrupted one would have
        loss = decoder_training_loss(self.pipe, images, emb, null_prob=self.dcfg.null_prob)
        return {"loss": loss}


class DecoderTask(Task):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        from ..models.decoders.image_decoder import mini_image_decoder

        self.cfg = cfg
        tok = load_tokenizer(cfg)
        if tok.config.detokenizer.kind != "mlp" or tok.config.detokenizer.rq_queries != 1:
            raise ConfigError(
                "the decoder stage needs a tokenizer whose generation embedding is one vector (detokenizer kind 'mlp')"
            )
        tok = tok.to(device).eval().requires_grad_(False)
        d = cfg.decoder
        self.tok = tok
        vae = None
        if d.vae is not None:
            from diffusers import AutoencoderKL
            from diffusers.configuration_utils import FrozenDict

            vae = AutoencoderKL.from_pretrained(d.vae, local_files_only=True, torch_dtype=torch.float32)
            # from_pretrained records the folder it read in the config (`_name_or_path`), which the exported
            # decoder would then carry: a path on the training machine, meaningless to anyone loading it
            vae._internal_dict = FrozenDict({k: v for k, v in vae.config.items() if k != "_name_or_path"})
            vae = vae.to(device).eval().requires_grad_(False)
        self.pipe = mini_image_decoder(
            tok.config.detokenizer.out_dim,
            d.image_size,
            seed=cfg.seed,
            channels=tuple(d.channels),
            patch=d.patch,
            attention_levels=d.attention_levels,
            vae=vae,
        )
        self.pipe.unet.to(device)
        self.module = DecoderModule(tok, self.pipe, d)
        if d.attention == "math":
            # training only: the processors are not part of the saved folder, so what is exported and
            # loaded for inference runs diffusers' default attention
            from diffusers.models.attention_processor import AttnProcessor

            self.pipe.unet.set_attn_processor(AttnProcessor())
        self.image_size = tok.config.vision.image_size

    def keeps(self, key: str) -> bool:
        return key.startswith(("unet.", "ema_unet."))

    def on_step_end(self, step: int, batch, out: dict) -> None:
        self.module.update_ema(step)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.pipe.unet.parameters())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out denoising loss at fixed timesteps and fixed noise (comparable across runs)."""
        ds = make_source(self.cfg, "val")
        n = min(len(ds), self.cfg.data.val_n)
        collate = make_collate(self.image_size)
        g = torch.Generator().manual_seed(1234)
        pipe = self.module.inference_pipe()
        sched = pipe.scheduler
        losses = {t: [] for t in (50, 300, 700)}
        for i in range(0, n, 64):
            batch = collate([ds[j] for j in range(i, min(n, i + 64))])
            if len(batch) == 0:
                continue
            emb = embeddings_from_pixels(self.tok, batch.pixels)
            images = pipe.encode_images(
                decoder_targets(batch.pixels, self.cfg.decoder.image_size).to(emb.device)
            ).float()
            for t, acc in losses.items():
                noise = torch.randn(images.shape, generator=g).to(images)
                tt = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
                pred = pipe._denoise(sched.add_noise(images, noise, tt), tt, emb)
                acc.append(F.mse_loss(pred.float(), images, reduction="sum").item() / images[0].numel())
        # a latent decoder's error is in its (unit-scale) latents, not comparable with a pixel decoder's
        name = "val_mse" if pipe.vae is None else "val_latent_mse"
        return {f"{name}_t{t}": sum(v) / max(1, n) for t, v in losses.items()}

    def export(self, run: Path) -> None:
        self.module.inference_pipe().save_pretrained(run / "decoder")
