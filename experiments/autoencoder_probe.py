#!/usr/bin/env python
"""Can a small diffusers AutoencoderKL keep what the checker needs at 16 x 16 x 4 latents, and what
does it cost on 2 CPU cores? A probe for a latent decoder (not part of the recipe).

    python experiments/autoencoder_probe.py [--steps 600] [--channels 16,32,64]
        [--size 64] [--out DIR]

--size 32 --channels 16,32 --steps 800 is the 32 px autoencoder the first latent-decoder probe used
(latent_unet_probe.py); --out keeps the trained autoencoder (diffusers save_pretrained).
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from seed_fast.default_model import load_default
from seed_fast.default_model.demo import test_scenes
from seed_fast.synthetic import sample_images


def to_tensor(images, size: int = 64):
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255 for im in images])
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] != size else x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--train-n", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=64, help="pixels the autoencoder encodes (area down-sampled from 64)")
    p.add_argument("--out", default=None, help="save the trained autoencoder here")
    args = p.parse_args()
    torch.manual_seed(0)
    ch = tuple(int(c) for c in args.channels.split(","))
    ae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=ch,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=args.size,
    )
    print("parameters", sum(q.numel() for q in ae.parameters()))
    images, _ = sample_images(args.train_n, seed=0, size=64)
    x = to_tensor(images, args.size) * 2 - 1
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        xb = x[torch.randint(0, len(x), (args.batch,), generator=g)]
        post = ae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = ae.decode(z).sample
        loss = F.mse_loss(rec, xb) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.5f} {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0
    ae.eval()
    if args.out:
        ae.save_pretrained(args.out)
    m = load_default()
    test, _, facts, _ = test_scenes(256)
    xt = to_tensor(test, args.size) * 2 - 1
    with torch.no_grad():
        lat = ae.encode(xt).latent_dist.mean
        rec = ae.decode(lat).sample
    ims = [Image.fromarray(((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).mul(255).round().byte().numpy()) for t in rec]
    ok = sum(r["objects_ok"] for r in m.checker.judge(ims, facts)) / len(facts)
    print(
        f"latents {tuple(lat.shape[1:])}; train {train_s:.0f} s for {args.steps} steps of {args.batch}; "
        f"test MSE {F.mse_loss(rec, xt).item():.5f}; checker finds every object in {ok:.1%} of 256 reconstructions"
    )


if __name__ == "__main__":
    main()
