"""An independent judge of synthetic scenes: a small CNN that reads the facts back from pixels.

It is trained on real rendered scenes only (never on our tokenizer's or decoder's outputs), and it
sees 32 x 32 pixels, the decoder's resolution, so that generated and real images are judged alike.
It predicts the left group's color, shape and count and the right shape's color and shape.
`judge(images, facts)` says, per image, whether the color and shape of every object are right.

    checker = train_checker(steps=600)          # about a minute on 2 CPU cores
    ok = checker.judge(pil_images, facts)        # list of dicts with per-fact and overall verdicts
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..models.preprocess import images_to_tensor
from ..synthetic import COLORS, COUNTS, SHAPES, make_scene

HEADS = {
    "left_color": list(COLORS),
    "left_shape": list(SHAPES),
    "count": [COUNTS[k] for k in sorted(COUNTS)],
    "right_color": list(COLORS),
    "right_shape": list(SHAPES),
}
OBJECT_FACTS = ("left_color", "left_shape", "right_color", "right_shape")
INPUT_SIZE = 32


def _fact_value(facts: dict, name: str) -> str:
    v = facts[name]
    return COUNTS[v] if name == "count" and isinstance(v, int) else v


def to_checker_input(images) -> torch.Tensor:
    """PIL images or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, 32, 32) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        x = images_to_tensor(list(images), max(INPUT_SIZE, max(im.size[0] for im in images)))
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"checker: expected (B, 3, H, W) images, got {tuple(x.shape)}")
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return x * 2 - 1


class SceneChecker(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        c = width

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
            )

        self.body = nn.Sequential(block(3, c), nn.MaxPool2d(2), block(c, 2 * c), nn.MaxPool2d(2), block(2 * c, 4 * c))
        # the scene's layout is fixed (group left, single shape right): keep a coarse 4 x 4 map
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.heads = nn.ModuleDict({k: nn.Linear(4 * c * 16, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.pool(self.body(x)).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> list[dict]:
        self.eval()
        logits = self(to_checker_input(images).to(next(self.parameters()).device))
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        n = len(next(iter(idx.values())))
        return [{k: HEADS[k][idx[k][i]] for k in HEADS} for i in range(n)]

    def judge(self, images, facts: list[dict]) -> list[dict]:
        """Per image: each fact right or wrong, and `objects_ok` (color and shape of every object)."""
        preds = self.predict(images)
        if len(preds) != len(facts):
            raise ValueError(f"checker.judge: {len(preds)} images but {len(facts)} fact sets")
        out = []
        for p, f in zip(preds, facts):
            row = {k: p[k] == _fact_value(f, k) for k in HEADS if k in f}
            row["objects_ok"] = all(row.get(k, False) for k in OBJECT_FACTS)
            row["predicted"] = p
            out.append(row)
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "SceneChecker":
        from safetensors.torch import load_file

        m = cls()
        missing, unexpected = m.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not a SceneChecker state (missing {missing[:4]}, unexpected {unexpected[:4]})")
        return m.eval()


def render_batch(rng: random.Random, n: int, size: int = 64) -> tuple[torch.Tensor, list[dict]]:

    scenes = [make_scene(rng, size) for _ in range(n)]
    return images_to_tensor([s[0] for s in scenes], size), [s[2] for s in scenes]


def train_checker(
    steps: int = 600, batch: int = 64, seed: int = 7, lr: float = 2e-3, progress: bool = True
) -> SceneChecker:
    """Train on freshly rendered scenes (a seed of its own: not the tokenizer's data stream).
    Light noise and blur make it robust to the decoder's softer pixels without seeing any."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SceneChecker()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train checker", unit="step")
    model.train()
    for _ in it:
        pixels, facts = render_batch(rng, batch)
        x = to_checker_input(pixels)
        if torch.rand((), generator=g) < 0.5:  # blur: an average with the 2x down-up sampled image
            soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
            x = 0.5 * (x + soft)
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        logits = model(x)
        loss = sum(
            F.cross_entropy(logits[k], torch.tensor([HEADS[k].index(_fact_value(f, k)) for f in facts])) for k in HEADS
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            it.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def checker_accuracy(model: SceneChecker, n: int = 512, seed: int = 99) -> dict[str, float]:
    """Accuracy on fresh real scenes (per fact, and all four object facts at once)."""
    pixels, facts = render_batch(random.Random(seed), n)
    rows = model.judge(pixels, facts)
    out = {k: sum(r[k] for r in rows) / n for k in HEADS}
    out["objects_ok"] = sum(r["objects_ok"] for r in rows) / n
    return out


# The embedded model's scenes are a few flat-colored shapes on a plain background: at 32 x 32 with
# each channel cut into 16 levels, the most common color covers 0.85 or more of the image in every
# one of 256 held-out scenes (median 0.90), and 0.64 or less in each of 18 scikit-image samples
# (photographs, textures, text, a color wheel; median 0.24). Below PLAIN_SHARE_MIN an image is unlike
# anything the embedded model was trained on.
PLAIN_SHARE_MIN = 0.75


def plain_share(image) -> float:
    """The share of a PIL image's pixels (at 32 x 32, 16 levels per channel) in its most common color."""
    small = image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BOX)
    a = np.asarray(small).reshape(-1, 3).astype(np.int64) // 16
    _, counts = np.unique(a[:, 0] * 256 + a[:, 1] * 16 + a[:, 2], return_counts=True)
    return float(counts.max()) / len(a)


def unlike_training_scenes(images) -> list[bool]:
    """Per PIL image: True when it looks unlike the embedded model's training scenes (see
    PLAIN_SHARE_MIN), so that its codes and captions mean little."""
    return [plain_share(im) < PLAIN_SHARE_MIN for im in images]
