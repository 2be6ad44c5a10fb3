#!/usr/bin/env python
"""First probe of a latent decoder (version 7's design): version 6's UNet levels (32, 64, 128) denoising
the 16 x 16 x 4 latents of a 32 px AutoencoderKL (autoencoder_probe.py --size 32 --channels 16,32
--steps 800 --out AE), conditioned on the generation embeddings of a stage-II tokenizer, written outside
the training loop (warmup 30 then cosine, AdamW lr 1e-3, batch 64, 10% null embeddings, grad clip 1).
It saves unet/, scheduler/ and vae/ (with the latents' scaling factor) into OUT: the decoder/ folder
of a model that `seed-fast eval --checkpoint` reads once assembled with the other parts.

    python experiments/latent_unet_probe.py --tokenizer STAGE2/tokenizer --ae AE --out OUT [--steps 1200]
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from seed_fast.models import SeedTokenizer
from seed_fast.synthetic import sample_images
from seed_fast.train.decoder import embeddings_from_pixels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--ae", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", default="32,64,128")
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    tok = SeedTokenizer.from_pretrained(a.tokenizer).float().eval()
    ae = AutoencoderKL.from_pretrained(a.ae).eval()
    ims, _ = sample_images(8192, seed=0, size=64)
    px = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255 for im in ims])
    with torch.no_grad():
        emb = torch.cat([embeddings_from_pixels(tok, px[i : i + 256]) for i in range(0, len(px), 256)])
        x32 = F.interpolate(px, size=(32, 32), mode="area") * 2 - 1
        lat = torch.cat([ae.encode(x32[i : i + 512]).latent_dist.mean for i in range(0, len(px), 512)])
    scale = 1.0 / lat.std().item()
    lat = lat * scale
    ch = tuple(int(c) for c in a.channels.split(","))
    torch.manual_seed(0)
    n = len(ch)
    unet = UNet2DConditionModel(
        sample_size=lat.shape[-1],
        in_channels=4,
        out_channels=4,
        block_out_channels=ch,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=16,
        cross_attention_dim=emb.shape[1],
        attention_head_dim=16,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=emb.shape[1],
    )
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    unet.set_attn_processor(AttnProcessor())
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(lat), generator=g), 0
    t0 = time.time()
    for s in range(1, a.steps + 1):
        if pos + a.batch > len(perm):
            perm, pos = torch.randperm(len(lat), generator=g), 0
        idx = perm[pos : pos + a.batch]
        pos += a.batch
        x0, e = lat[idx], emb[idx]
        t = torch.randint(0, 1000, (a.batch,))
        e = e * (torch.rand(a.batch) >= 0.1).float()[:, None]
        pred = unet(
            sched.add_noise(x0, torch.randn(x0.shape), t), t, encoder_hidden_states=e[:, None], class_labels=e
        ).sample
        loss = F.mse_loss(pred, x0)
        for group in opt.param_groups:
            group["lr"] = a.lr * s / 30 if s < 30 else a.lr * 0.5 * (1 + math.cos(math.pi * (s - 30) / (a.steps - 30)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if s % 100 == 0:
            print(f"step {s} loss {loss.item():.4f} {time.time() - t0:.0f} s", flush=True)
    print(f"train {time.time() - t0:.0f} s")
    unet.save_pretrained(a.out + "/unet")
    sched.save_pretrained(a.out + "/scheduler")
    ae.register_to_config(scaling_factor=scale)
    ae.save_pretrained(a.out + "/vae")


if __name__ == "__main__":
    main()
