"""vae stage: a small autoencoder for a latent image decoder.

Stable unCLIP, SEED's decoder, denoises the latents of a KL autoencoder. The embedded model's latent
decoder does the same at a CPU's size: this stage trains a diffusers ``AutoencoderKL``
(`seed_fast.models.decoders.image_decoder.mini_autoencoder`) on the training images, area-down-sampled to
`vae.image_size` pixels in [-1, 1], with the pixel MSE of the decoded posterior sample plus
`vae.kl_weight` times the KL to a unit normal (summed over a sample's latents, averaged over the batch).
Its export, `vae/`, sets `scaling_factor` to 1 / the
standard deviation of the training latents' means (as Stable Diffusion's 0.18215 does for its own), so
the decoder stage's UNet sees unit-scale latents: give that folder as `decoder.vae`.

    seed-fast train vae --config run.json
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import make_collate
from .decoder import decoder_targets
from .sources import make_source
from .task import Task

# training images encoded at export to measure the latents' scale
SCALE_SAMPLES = 2048


def vae_loss(vae, images: torch.Tensor, kl_weight: float) -> dict[str, torch.Tensor]:
    """images (B, 3, S, S) in [-1, 1] -> {"loss", "mse", "kl"}; the posterior is sampled with torch's
    global generator (checkpointed by the loop, so a resumed run draws what an unbroken one would)."""
    post = vae.encode(images).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, dtype=post.mean.dtype).to(post.mean.device)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec.float(), images.float())
    kl = post.kl().mean()  # summed over a sample's latent values, averaged over the batch
    return {"loss": mse + kl_weight * kl, "mse": mse.detach(), "kl": kl.detach()}


class VaeModule(nn.Module):
    def __init__(self, vae, cfg):
        super().__init__()
        self.vae, self.vcfg = vae, cfg

    def forward(self, batch) -> dict:

        if len(batch) == 0:
            return {"loss": sum(p.sum() * 0 for p in self.vae.parameters())}
        images = decoder_targets(batch.pixels, self.vcfg.image_size)
        return vae_loss(self.vae, images.to(next(self.vae.parameters()).device), self.vcfg.kl_weight)


class VaeTask(Task):
    def __init__(self, cfg, device: torch.device):
        from ..models.decoders.image_decoder import mini_autoencoder

        self.cfg = cfg
        v = cfg.vae
        self.vae = mini_autoencoder(v.image_size, tuple(v.channels), v.latent_channels, seed=cfg.seed).to(device)
        self.module = VaeModule(self.vae, v)
        # the loader renders the synthetic scenes at the data's size; the targets are down-sampled from it
        self.image_size = cfg.data.image_size

    def keeps(self, key: str) -> bool:
        return key.startswith("vae.")

    @torch.no_grad()
    def _images(self, split: str, n: int):

        ds = make_source(self.cfg, split, head=n)
        n = min(len(ds), n)
        collate = make_collate(self.image_size)
        for i in range(0, n, 128):
            batch = collate([ds[j] for j in range(i, min(n, i + 128))])
            if len(batch):
                yield decoder_targets(batch.pixels, self.cfg.vae.image_size).to(next(self.vae.parameters()).device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out reconstruction MSE (in [-1, 1]) from the latent means, and the latents' std."""
        self.vae.eval()
        sq, count, lat = 0.0, 0, []
        for x in self._images("val", self.cfg.data.val_n):
            mean = self.vae.encode(x).latent_dist.mean
            sq += F.mse_loss(self.vae.decode(mean).sample.float(), x.float(), reduction="sum").item()
            count += x.numel()
            lat.append(mean.float())
        self.vae.train()
        if not count:
            return {}
        return {"val_mse": sq / count, "val_latent_std": torch.cat(lat).std().item()}

    @torch.no_grad()
    def latent_scale(self) -> float:
        """1 / the standard deviation of the latent means of up to SCALE_SAMPLES training images."""
        was = self.vae.training
        self.vae.eval()
        lat = torch.cat([self.vae.encode(x).latent_dist.mean.float() for x in self._images("train", SCALE_SAMPLES)])
        self.vae.train(was)
        std = lat.std().item()
        if not std > 0:
            raise RuntimeError(f"vae stage: the latents' standard deviation is {std}; cannot scale them")
        return 1.0 / std

    def export(self, run: Path) -> None:
        import shutil

        self.vae.register_to_config(scaling_factor=self.latent_scale())
        tmp, final = run / "vae.tmp", run / "vae"
        shutil.rmtree(tmp, ignore_errors=True)
        self.vae.eval().save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a finished folder or none: the decoder stage never reads a half-written one
