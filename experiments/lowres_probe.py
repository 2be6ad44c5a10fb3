#!/usr/bin/env python
"""How much resolution does the embedded checker need?
python experiments/lowres_probe.py"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seed_fast.default_model import load_default
from seed_fast.default_model.demo import test_scenes

m = load_default()
images, caps, facts, _ = test_scenes(256)
x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).float() / 255 for im in images])
for size in (64, 32, 16, 8):
    for mode in ("nearest", "bilinear"):
        y = F.interpolate(
            F.interpolate(x, size=(size, size), mode="area"),
            size=(64, 64),
            mode=mode,
            **({} if mode == "nearest" else {"align_corners": False}),
        )
        ims = [Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for t in y]
        ok = sum(r["objects_ok"] for r in m.checker.judge(ims, facts)) / len(facts)
        print(f"{size:3d} px -> 64 ({mode}): checker objects_ok {ok:.1%}")
